"""Depth pruning: the block-search engine, layer/branch surgery, ShortGPT, SLEB, BlockPruner."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from secateur.api import CalibrationConfig, calibration_data, prune
from secateur.engine.block_search import BlockSearch
from secateur.errors import SecateurError
from secateur.formats.loader import load
from secateur.methods import build_method
from secateur.models import adapter_for
from secateur.models.loading import Loaded
from secateur.surgery.depth import Block, remove_blocks, remove_layers, total_parameters
from tests.tiny_models import make_step, model_nll, tiny_loaded, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "gemma3_text", "opt", "gpt2", "gpt_neox"]


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n: int = 5, seqlen: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


def deep(model):
    m = copy.deepcopy(model)
    return m, adapter_for(m)


# -- the engine: its cheap scores equal the real model's loss ------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_search_scores_equal_loss_of_really_pruned_model(family):
    model = tiny_model(family)
    wins = windows()
    search = BlockSearch(model, adapter_for(model), wins, batch_size=2, progress=False)
    base = search.loss()
    assert base == pytest.approx(model_nll(model, wins), rel=1e-5)
    candidates = [Block(0, "mlp"), Block(1, "attn"), Block(2, "layer")]
    scores = search.score(candidates)
    for c in candidates:
        pruned, adapter = deep(model)
        remove_blocks(pruned, adapter, [c], in_memory_only=True)
        assert scores[c] == pytest.approx(model_nll(pruned, wins), rel=1e-5), c
        # random tiny weights: a removal moves the loss a little, but it must move it
        assert abs(scores[c] - base) > 1e-5, f"{c} changed nothing"
    # the search never modifies the model it scores
    assert search.loss() == pytest.approx(base, rel=1e-6)


def test_search_with_removed_blocks_and_cost_accounting():
    model = tiny_model("llama")
    wins = windows()
    search = BlockSearch(model, adapter_for(model), wins, batch_size=3, progress=False)
    search.remove(Block(1, "mlp"))
    scores = search.score([Block(0, "attn"), Block(2, "mlp")])
    pruned, adapter = deep(model)
    remove_blocks(pruned, adapter, [Block(1, "mlp"), Block(2, "mlp")])
    assert scores[Block(2, "mlp")] == pytest.approx(model_nll(pruned, wins), rel=1e-5)
    cost = search.summary()
    # layer 0's candidate runs 3 layers, layer 2's runs 1, the shared walk runs layers 0 and 1
    assert cost["candidates"] == 2 and cost["layer_forwards"] == 3 + 1 + 2
    assert cost["head_forwards"] == 2 and cost["windows"] == 5
    with pytest.raises(ValueError):
        search.remove(Block(1, "mlp"))


def test_shortlist_screens_on_a_quarter_and_scores_finalists_on_every_window():
    model = tiny_model("llama")
    wins = windows(8)
    candidates = [Block(i, part) for i in range(3) for part in ("attn", "mlp")]
    exact = BlockSearch(model, adapter_for(model), wins, batch_size=2, progress=False)
    full = exact.score(candidates)
    quick = BlockSearch(model, adapter_for(model), wins, batch_size=2, progress=False)
    scores = quick.score(candidates, shortlist=2)
    screen = BlockSearch(model, adapter_for(model), wins[:2], batch_size=2, progress=False)
    screened = screen.score(candidates)  # the first quarter of the 4 batches: 2 windows
    finalists = sorted(candidates, key=lambda c: screened[c])[:2]
    # only finalists come back, with their all-window scores: a screening score is on other
    # text, and a caller taking the min over a mix would pick by an estimate
    assert set(scores) == set(finalists)
    assert set(quick.screening) == set(candidates) - set(finalists)
    for c in candidates:
        got = scores[c] if c in finalists else quick.screening[c]
        want = full[c] if c in finalists else screened[c]
        assert got == pytest.approx(want, rel=1e-6), c
    # screening all 6 on 1/4 of the windows and 2 on the other 3/4: 6/4 + 2*3/4 = 3 head passes
    cost = quick.summary()
    assert cost["head_forwards"] == pytest.approx(3.0)
    assert cost["naive_forward_passes"] == 6 and cost["candidates"] == 8
    # a shortlist as long as the candidate list is the exact search
    assert BlockSearch(model, adapter_for(model), wins, batch_size=2, progress=False).score(
        candidates, shortlist=6) == pytest.approx(full)


def test_trace_sees_every_layer_input_and_output():
    model = tiny_model("llama")
    wins = windows(3)
    search = BlockSearch(model, adapter_for(model), wins, progress=False)
    seen: dict[int, torch.Tensor] = {}
    search.trace(lambda i, x, y: seen.setdefault(i, y))
    with torch.no_grad():
        ref = model(input_ids=torch.cat(wins), output_hidden_states=True).hidden_states
    for i in range(2):  # the last entry of hidden_states has the final norm applied
        assert torch.allclose(seen[i], ref[i + 1], atol=1e-5)


# -- surgery ---------------------------------------------------------------------------------
def test_remove_layers_fixes_config_layer_types_and_cache_indices(tmp_path):
    model = tiny_model("gemma3_text")
    adapter = adapter_for(model)
    ids = torch.randint(0, 256, (1, 20))
    expected_types = [model.config.layer_types[0], model.config.layer_types[2]]
    search = BlockSearch(model, adapter, [ids], progress=False)
    expected = search.score([Block(1, "layer")])[Block(1, "layer")]
    keep = remove_layers(model, adapter, [1])
    assert keep == [0, 2]
    assert model.config.num_hidden_layers == 2 and len(adapter.layers) == 2
    assert model.config.layer_types == expected_types
    assert [layer.self_attn.layer_idx for layer in adapter.layers] == [0, 1]
    assert model_nll(model, [ids]) == pytest.approx(expected, rel=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    assert model_nll(reloaded, [ids]) == pytest.approx(expected, rel=1e-5)
    # generation with a KV cache must match recomputing everything (cache indices are right)
    out = reloaded.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    no_cache = reloaded.generate(ids[:, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)


@pytest.mark.reload
def test_branch_removal_saves_without_the_weights_and_reloads_without_secateur(tmp_path):
    model = tiny_model("llama")
    wins = windows(3)
    search = BlockSearch(model, adapter_for(model), wins, progress=False)
    search.remove(Block(0, "attn"))
    search.remove(Block(2, "layer"))
    expected = search.score([Block(1, "mlp")])[Block(1, "mlp")]
    dense_params = total_parameters(model)
    adapter = adapter_for(model)
    record = remove_blocks(model, adapter, [Block(0, "attn"), Block(2, "layer"), Block(1, "mlp")])
    assert record == {"layers_removed": [2], "branches_removed": ["0.attn", "1.mlp"],
                      "config": "secateur"}
    assert model_nll(model, wins) == pytest.approx(expected, rel=1e-5)
    assert total_parameters(model) < dense_params
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["secateur_removed"] == {"model.layers.0.self_attn": {"kind": "attention"},
                                          "model.layers.1.mlp": {"kind": "mlp"}}
    assert config["base_model_type"] == "llama" and config["num_hidden_layers"] == 2
    assert config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_secateur_flex.PrunedLlamaForCausalLM"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith("model.layers.0.self_attn") for k in keys)
    assert not any(k.startswith("model.layers.1.mlp") for k in keys)
    assert not any(k.startswith("model.layers.2.") for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert model_nll(reloaded, wins) == pytest.approx(expected, rel=1e-5)
    ids = wins[0][:, :8]
    assert torch.equal(reloaded.generate(ids, max_new_tokens=5, do_sample=False),
                       reloaded.generate(ids, max_new_tokens=5, do_sample=False,
                                         use_cache=False))


@pytest.mark.reload
@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_branch_removal_saves_in_every_family(family, tmp_path):
    """GPT-2's attention takes hidden states positionally and OPT's MLP is two projections on
    the layer: both stand-ins must run, save, and reload with a working KV cache."""
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1, 10))
    kept = copy.deepcopy(model)
    record = remove_blocks(kept, adapter_for(kept), [Block(0, "attn"), Block(1, "attn"),
                                                     Block(1, "mlp")], in_memory_only=True)
    assert record["layers_removed"] == [1] and record["config"] == "in-memory only"
    record = remove_blocks(model, adapter_for(model), [Block(0, "attn"), Block(2, "mlp")])
    assert record["config"] == "secateur"
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, want, atol=1e-5)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=5, do_sample=False),
                       reloaded.generate(ids, max_new_tokens=5, do_sample=False,
                                         use_cache=False))


def test_surgery_rejects_bad_blocks():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    with pytest.raises(SecateurError, match="layers 0..2"):
        remove_blocks(model, adapter, [Block(3, "mlp")])
    with pytest.raises(SecateurError, match="at least one must remain"):
        remove_layers(model, adapter, [0, 1, 2])
    with pytest.raises(ValueError):
        Block(0, "ffn")


# -- methods through the API -------------------------------------------------------------------
CALIB = CalibrationConfig("wiki", nsamples=4, seqlen=32, seed=0)
EXACT = {"search_dtype": "float32"}  # tests compare the search's numbers with fp32 models


@pytest.mark.parametrize("method,flag", [("blockpruner", "blocks"), ("sleb", "layers"),
                                         ("shortgpt", "layers")])
def test_methods_remove_the_count_asked_and_report_the_curve(method, flag):
    loaded = tiny_loaded()
    dense = total_parameters(loaded.model)
    curve = {"curve": True} if method == "shortgpt" else {}  # the greedy ones always have it
    run = prune(loaded, make_step(method=method, **EXACT, **curve, **{flag: 2}), CALIB,
                progress=False)
    s = run.summary
    assert len(s["removed"]) == 2 and len(s["calibration_perplexity"]) == 3
    assert s["ratio"]["achieved"] == pytest.approx(1 - total_parameters(loaded.model) / dense)
    assert "embeddings" in s["ratio"]["counts"]
    if method != "blockpruner":
        assert loaded.model.config.num_hidden_layers == 1
    # the last curve point is the calibration perplexity of the model as saved
    wins = calibration_data(loaded, CALIB)[0]
    assert s["calibration_perplexity"][-1] == pytest.approx(
        torch.tensor(model_nll(loaded.model, wins)).exp().item(), rel=1e-4)


def test_greedy_methods_pick_the_best_candidate():
    loaded = tiny_loaded()
    reference = copy.deepcopy(loaded.model)
    run = prune(loaded, make_step(method="blockpruner", blocks=1, **EXACT), CALIB,
                progress=False)
    wins = calibration_data(tiny_loaded(), CALIB)[0]
    losses = {}
    for layer in range(3):
        for part in ("attn", "mlp"):
            m, a = deep(reference)
            remove_blocks(m, a, [Block(layer, part)])
            losses[f"{layer}.{part}"] = model_nll(m, wins)
    assert run.summary["removed"] == [min(losses, key=losses.get)]


def test_blockpruner_prunes_a_model_it_already_pruned():
    loaded = tiny_loaded()
    remove_blocks(loaded.model, loaded.adapter, [Block(0, "attn")])
    again = Loaded(loaded.model, loaded.tokenizer, adapter_for(loaded.model), "flex", "")
    run = prune(again, make_step(method="blockpruner", blocks=2, **EXACT), CALIB,
                progress=False)
    assert "0.attn" not in run.summary["removed"] and "0.attn" not in run.summary[
        "block_parameters"]
    wins = calibration_data(again, CALIB)[0]
    assert run.summary["calibration_perplexity"][-1] == pytest.approx(
        torch.tensor(model_nll(again.model, wins)).exp().item(), rel=1e-4)


@pytest.mark.parametrize("amount", [{"layers": 2}, {"ratio": 0.3}])
def test_shortgpt_without_the_curve_removes_the_same_layers_in_one_pass(amount):
    with_curve = tiny_loaded()
    on = prune(with_curve, make_step(method="shortgpt", curve=True, **EXACT, **amount), CALIB,
               progress=False).summary
    without = tiny_loaded()
    off = prune(without, make_step(method="shortgpt", **EXACT, **amount), CALIB,
                progress=False).summary
    assert off["removed"] == on["removed"] and len(off["removed"]) >= 1
    assert off["block_influence"] == on["block_influence"]
    assert "calibration_perplexity" not in off and len(on["calibration_perplexity"]) == len(
        on["removed"]) + 1
    # off: only the influence trace, one pass over the layers; on: a loss pass per point
    assert off["search"]["head_forwards"] == 0 and on["search"]["head_forwards"] == len(
        on["calibration_perplexity"])
    assert off["search"]["layer_forwards"] == tiny_loaded().adapter.num_layers
    for a, b in zip(with_curve.model.state_dict().values(), without.model.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_shortgpt_job_without_the_curve_prints_the_order_and_draws_no_plot(tiny_dir, tmp_path):
    from io import StringIO

    from rich.console import Console

    from secateur.jobs import EvalSpec, prune_job
    from secateur.report.depth import print_depth

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox." for i in range(40)))
    js = tmp_path / "result.json"
    result = prune_job(str(tiny_dir("llama")), make_step(method="shortgpt", layers=1),
                       CalibrationConfig(str(text), 2, 32, 0), EvalSpec(None), tmp_path / "out",
                       js, progress=False)
    assert result.step.config["curve"] is False and result.removal_plot is None
    assert "removal_plot" not in json.loads(js.read_text())
    assert not js.with_suffix(".png").exists()
    printed = StringIO()
    print_depth(Console(file=printed, width=200), result.to_json())
    assert "not computed" in printed.getvalue() and result.step.summary["removed"][0] in (
        printed.getvalue())


def test_shortgpt_block_influence_is_one_minus_cosine():
    loaded = tiny_loaded()
    ref = copy.deepcopy(loaded.model)
    run = prune(loaded, make_step(method="shortgpt", layers=1, **EXACT), CALIB,
                progress=False)
    wins = torch.cat(calibration_data(tiny_loaded(), CALIB)[0])
    with torch.no_grad():
        hs = ref(input_ids=wins, output_hidden_states=True).hidden_states
    # hidden_states[-1] has the final norm applied; compare the first layers only
    for i in range(2):
        bi = 1 - F.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1).mean()
        assert run.summary["block_influence"][i] == pytest.approx(bi.item(), rel=1e-5)
    lowest = min(range(3), key=lambda i: run.summary["block_influence"][i])
    assert run.summary["removed"] == [f"{lowest}.layer"]


def test_ratio_is_at_least_the_target_and_says_what_was_achieved():
    loaded = tiny_loaded()
    run = prune(loaded, make_step(method="sleb", ratio=0.1), CALIB, progress=False)
    ratio = run.summary["ratio"]
    assert ratio["achieved"] >= 0.1 and "statement" in ratio
    assert len(run.summary["removed"]) == 1  # one tiny layer is ~20% of the parameters


@pytest.mark.parametrize("options,match", [
    (dict(method="blockpruner"), "exactly one of blocks"),
    (dict(method="blockpruner", blocks=2, ratio=0.1), "exactly one of blocks"),
    (dict(method="shortgpt", layers=0), r"ShortGPTConfig.layers: .*greater than or equal to 1"),
    (dict(method="sleb", ratio=1.5), r"SLEBConfig.ratio: Input should be less than 1"),
    (dict(method="sleb", layers=1, sparsity=0.5), "SLEBConfig.sparsity: not a field"),
    (dict(method="blockpruner", blocks=1, search_shortlist=0), "search_shortlist"),
    (dict(method="shortgpt", layers=1, search_shortlist=2), "search_shortlist: not a field"),
])
def test_bad_flags_fail_before_loading(options, match):
    with pytest.raises(SecateurError, match=match):
        build_method(make_step(**options))


@pytest.mark.parametrize("options,match", [
    (dict(method="shortgpt", layers=3), "at most 2"),
    (dict(method="blockpruner", blocks=6), "at most 5"),
    (dict(method="sleb", ratio=0.95), "cannot be met"),
    (dict(method="blockpruner", blocks=1, search_samples=9), "exceeds the 4"),
])
def test_impossible_requests_fail_clearly(options, match):
    with pytest.raises(SecateurError, match=match):
        prune(tiny_loaded(), make_step(**options), CALIB, progress=False)


def test_blockpruner_prunes_any_family_into_secateurs_class():
    loaded = tiny_loaded("opt")
    run = prune(loaded, make_step(method="blockpruner", blocks=1), CALIB, progress=False)
    assert run.summary["surgery"]["config"] == "secateur"
    assert loaded.model.config.base_model_type == "opt"


# -- the real model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_blockpruner_saves_smaller_and_reloads(smollm2_copy, tmp_path):
    loaded = smollm2_copy
    calib = CalibrationConfig("c4-sample", nsamples=1, seqlen=64, seed=0)
    run = prune(loaded, make_step(method="blockpruner", blocks=1, search_dtype="bfloat16"),
                calib, progress=False)
    assert len(run.summary["removed"]) == 1 and run.summary["search"]["candidates"] == 60
    assert run.summary["search"]["dtype"] == "bfloat16"
    curve = run.summary["calibration_perplexity"]
    assert curve[1] < 1.2 * curve[0]  # the best of 60 blocks costs little
    loaded.model.save_pretrained(tmp_path / "pruned")
    ids = torch.randint(0, 49152, (1, 16))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, loaded.model(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_smollm2_whole_layer_removal_is_a_stock_smaller_checkpoint(smollm2_copy, tmp_path):
    loaded = smollm2_copy
    dense = total_parameters(loaded.model)
    remove_layers(loaded.model, loaded.adapter, [25, 26, 27])
    pruned = total_parameters(loaded.model)
    assert 0.07 < 1 - pruned / dense < 0.09  # three of 30 layers; embeddings are ~21%
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    reloaded = load(str(tmp_path))
    assert type(reloaded.model).__name__ == "LlamaForCausalLM"
    assert reloaded.model.config.num_hidden_layers == 27
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        assert torch.allclose(reloaded.model(ids).logits, loaded.model(ids).logits, atol=1e-4)
    # fp32 weights on disk, tied embeddings stored once: the file shrank with the parameters
    size = (tmp_path / "model.safetensors").stat().st_size
    assert 4 * pruned <= size < 4 * pruned * 1.01


@pytest.mark.parametrize("method,flag", [("shortgpt", "layers"), ("blockpruner", "blocks")])
def test_prune_job_saves_reloadable_model_json_and_plot(tiny_dir, tmp_path, method, flag):
    from secateur.jobs import EvalSpec, prune_job

    src = tiny_dir("llama")
    out, js = tmp_path / "out", tmp_path / "result.json"
    # a small local text: tokenizing all of `wiki` byte by byte would dominate the test
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog "
                                  f"{i} times, then rests." for i in range(40)))
    curve = {"curve": True} if method == "shortgpt" else {}  # the plot draws the curve
    result = prune_job(str(src), make_step(method=method, **curve, **{flag: 2}),
                       CalibrationConfig(str(text), 2, 32, 0), EvalSpec(str(text), 32, 2), out,
                       js, progress=False)
    saved = json.loads(js.read_text())
    for key in ("perplexity", "dense_perplexity", "parameters", "timings", "summary", "options"):
        assert key in saved
    assert len(saved["summary"]["removed"]) == 2
    assert js.with_suffix(".png").stat().st_size > 1000 and (out / "removals.png").is_file()
    assert result.parameters["pruned"]["parameters"] < result.parameters["dense"]["parameters"]
    # blockpruner's two blocks may be one whole layer (stock) or two branches (own class)
    stock = saved["summary"]["surgery"]["config"] == "stock"
    assert stock == (method == "shortgpt" or len(saved["summary"]["surgery"]["branches_removed"])
                     == 0)
    config = json.loads((out / "config.json").read_text())
    assert ("auto_map" not in config) == stock
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not stock)
    assert total_parameters(reloaded) == result.parameters["pruned"]["parameters"]


def test_auto_search_dtype_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    import secateur.methods.layers as layers

    monkeypatch.setattr(layers, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert layers.search_dtype("auto") == torch.float32
    monkeypatch.setattr(layers, "cpu_has_bf16", lambda: True)
    assert layers.search_dtype("auto") == torch.bfloat16
    assert layers.search_dtype("float32") == torch.float32


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_layerwise_pruning_of_a_model_with_removed_branches_in_memory_and_streamed(
        family, tiny_dir, tmp_path):
    """Wanda after BlockPruner-style surgery: the removed branches have no matrices to prune,
    and streaming the saved model (secateur's class) gives the in-memory result."""
    from secateur.engine.streamed import prune_streamed
    from secateur.formats.hf import save_model
    from secateur.formats.streaming import load_streamed
    from secateur.methods import WandaConfig

    loaded = load(tiny_dir(family))
    remove_blocks(loaded.model, loaded.adapter, [Block(0, "attn"), Block(2, "mlp")])
    assert set(loaded.adapter.linears(loaded.adapter.layers[1])) == {
        *loaded.adapter.attn_in, loaded.adapter.attn_out, *loaded.adapter.mlp_in,
        loaded.adapter.mlp_out}
    assert not any("attn" in p for p in loaded.adapter.linears(loaded.adapter.layers[0]))
    save_model(loaded.model, loaded.tokenizer, tmp_path / "cut")
    wins = windows(4, 32)
    config = WandaConfig(sparsity=0.5)
    prune(loaded, config, wins, progress=False)
    streamed, weights = load_streamed(tmp_path / "cut")
    prune_streamed(streamed, weights, build_method(config), wins, tmp_path / "out",
                   progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(reloaded(wins[0]).logits, loaded.model(wins[0]).logits)
