"""secateur's GGUF outputs in llama.cpp itself (llama-cpp-python, which the set-up installs).

A tiny random Llama: its quantized GGUF loads and generates in llama.cpp, llama.cpp's
perplexity matches transformers on the same (dequantized) weights, and llama.cpp's own
quantizer gives every tensor the type secateur's preset table gives it.
"""

from __future__ import annotations

import gguf
import pytest
import torch

from secateur.api import quantize
from secateur.formats.export import export_model
from secateur.formats.gguf import gguf_tensor_types, read_gguf_layout
from secateur.methods.gguf import GGUFConfig
from secateur.quant.ggml import ggml_states
from secateur.runtime import llama_cpp as runtime
from tests.formats.test_export import bpe_tokenizer, tiny_llama


def windows(n: int = 4, seqlen: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


def transformers_perplexity(model: torch.nn.Module, wins: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(w).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum")
            total, count = total + float(nll), count + w.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def quantized_in_both(tmp_path, model, tokenizer, preset, calibration, wins):
    """A gguf quantize step at `preset`, its GGUF written; (file, llama.cpp's perplexity,
    transformers' perplexity of the same weights) on `wins`."""
    torch.set_num_threads(1)
    quantize(model, GGUFConfig(preset=preset), calibration, progress=False)
    out = tmp_path / "m.gguf"
    export_model(model, tokenizer, "gguf", out, outtype=preset,
                 quantized=ggml_states(model), has_imatrix=True)
    return out, runtime.perplexity(out, wins)["perplexity"], transformers_perplexity(model, wins)


@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "q3_k_s", "iq4_xs"])
def test_quantized_gguf_runs_in_llama_cpp_as_it_does_in_transformers(tmp_path, preset):
    wins = windows()
    out, theirs, ours = quantized_in_both(tmp_path, tiny_llama(3), bpe_tokenizer(), preset,
                                          windows(8, 64), wins)
    # llama.cpp rounds activations to 8 bits for quantized matmuls: close, not equal
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)
    speed = runtime.decode_speed(out, wins[0][0, :8].tolist(), new_tokens=8, rounds=1)
    assert speed["decode_tokens_per_second"]["median"] > 0


def compare_preset_tables(tmp_path, model, preset, with_imatrix, tokenizer=None):
    f32 = tmp_path / "f32.gguf"
    export_model(model, tokenizer or bpe_tokenizer(), "gguf", f32, outtype="f32")
    ours = gguf_tensor_types(read_gguf_layout(model, "m"), preset, with_imatrix)
    imatrix = None
    if with_imatrix:
        imatrix = {t.name: torch.ones(int(t.shape[0])) for t in gguf.GGUFReader(f32).tensors
                   if t.name.startswith("blk.") and t.name in ours}
    dst = tmp_path / "q.gguf"
    runtime.quantize(f32, dst, preset, imatrix)
    theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(dst).tensors if t.name in ours}
    assert theirs == ours
    return ours


@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "q5_k_m", "q6_k", "q3_k_s", "q3_k_m",
                                    "q3_k_l", "iq4_nl", "iq4_xs"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_preset_table_is_llama_cpps_own_choice(tmp_path, preset, with_imatrix):
    """64-wide rows (every 256-block type falls back) and 512-wide ffn_down."""
    compare_preset_tables(tmp_path, tiny_llama(4), preset, with_imatrix)


@pytest.mark.parametrize("preset", ["q3_k_m", "q3_k_l", "iq4_nl", "iq4_xs"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_preset_table_on_a_deeper_gqa_model_is_llama_cpps(tmp_path, preset, with_imatrix):
    """256-wide rows (no fallbacks), 16 layers (llama.cpp's n/16 and n/8 layer rules) and 4
    query heads per KV head (its IQ4 attn_v rule)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=256,
                      num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=64, bos_token_id=256,
                      eos_token_id=257)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ours = compare_preset_tables(tmp_path, model, preset, with_imatrix)
    assert ours["blk.0.attn_v.weight"] == "Q5_K" != ours["blk.0.attn_q.weight"]  # a bump


@pytest.mark.parametrize(("name", "with_imatrix"), [
    ("Q4_0", True), ("Q4_1", True), ("Q5_0", True), ("Q5_1", True), ("Q4_K", True),
    ("Q5_K", True), ("Q6_K", True),
    ("Q3_K", True), ("IQ4_NL", True), ("IQ4_NL", False), ("IQ4_XS", True), ("IQ4_XS", False)])
def test_nearest_rounding_is_llama_cpps_own_quantizer(name, with_imatrix):
    """secateur's RTN against ggml's own quantizer (`ggml_quantize_chunk`, what llama-quantize
    runs) with the same importance: the same bytes, block for block, but for near-ties of
    llama.cpp's scale search that its float32 arithmetic settles another way. (Q3_K without
    an imatrix is llama.cpp's older reference search, which secateur does not port.)"""
    from secateur.quant.ggml import TYPES, pack, rtn_ggml
    from tests.methods.test_ggml import problem

    w, h = problem(3, rows=64, cols=512)
    w[0] = 0  # a dead row
    w[1, 16:32] = 0  # a zero sub-block
    w[2, 32:48] *= 1e-3  # a sub-block whose 6-bit scale rounds to zero
    imatrix = torch.diag(h) / 4096 if with_imatrix else None
    deq, state = rtn_ggml(w, name, imatrix)
    ours, theirs = pack(state), runtime.quantize_rows(w, name, imatrix)
    t = TYPES[name]
    same = (ours.reshape(-1, t.nbytes) == theirs.reshape(-1, t.nbytes)).all(1)
    assert same.mean() >= 0.99, same.mean()
    # the corner cases exactly: the dead row, and the blocks holding the zero / tiny runs
    blocks = ours.reshape(w.shape[0], -1, t.nbytes), theirs.reshape(w.shape[0], -1, t.nbytes)
    assert (blocks[0][0] == blocks[1][0]).all()
    assert (blocks[0][1, 16 // t.block] == blocks[1][1, 16 // t.block]).all()
    assert (blocks[0][2, 32 // t.block] == blocks[1][2, 32 // t.block]).all()
    kind = getattr(gguf.GGMLQuantizationType, name)
    their_deq = torch.from_numpy(gguf.quants.dequantize(theirs, kind))
    mine, other = ((deq - w) ** 2).sum(), ((their_deq - w) ** 2).sum()
    assert abs(float(mine / other) - 1) < 1e-3


def test_cli_quantizes_into_gguf_and_evaluates_it_in_llama_cpp(tmp_path, monkeypatch, capsys):
    import json

    from tests.formats.test_export import save
    from tests.jobs.test_loading_and_cli import run_cli

    src = save(tiny_llama(6), tmp_path / "src")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the {w} thing" for w in range(600)))
    out = tmp_path / "m.gguf"
    code, _, err = run_cli(monkeypatch, capsys, "quantize", src, "--method", "gguf",
                           "--preset", "q4_0", "--calib", text, "--nsamples", "4", "--seqlen",
                           "32", "--eval", "none", "--out", out)
    assert code == 0, err
    assert gguf.GGUFReader(out).tensors[0].tensor_type.name in ("Q4_0", "Q4_1", "Q8_0", "Q6_K")
    code, _, err = run_cli(monkeypatch, capsys, "eval", out, "--data", text, "--seqlen", "32",
                           "--max-windows", "4", "--json", tmp_path / "e.json")
    assert code == 0, err
    record = json.loads((tmp_path / "e.json").read_text())
    assert record["runtime"] == "llama.cpp" and record["protocol"]["windows"] == 4
    assert record["tokens"] == 4 * 31 and 1 < record["perplexity"] < 2000


def test_cli_bench_times_gguf_files_in_llama_cpp(tmp_path, monkeypatch, capsys):
    import json

    from tests.jobs.test_loading_and_cli import run_cli

    model = tiny_llama(8)
    paths = []
    for outtype in ("f16", "q4_0"):
        paths.append(tmp_path / f"{outtype}.gguf")
        export_model(model, bpe_tokenizer(), "gguf", paths[-1], outtype=outtype)
    code, out, err = run_cli(monkeypatch, capsys, "bench", paths[0], "--vs", paths[1],
                             "--lengths", "16", "--decode-tokens", "4", "--repeats", "2",
                             "--warmup", "0", "--threads", "1", "--json", tmp_path / "b.json")
    assert code == 0, err
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["runtime"].startswith("llama.cpp")
    assert set(record["speedup_vs_baseline"][str(paths[1])]) == {"decode", "prefill 16"}
    assert record["models"][str(paths[1])]["tensor_types"].startswith("Q4_0")
    assert "vs" in out


def test_cli_frontier_measures_both_quantizers_and_resumes(tmp_path, monkeypatch, capsys):
    import json

    from tests.formats.test_export import save
    from tests.jobs.test_loading_and_cli import run_cli

    src = save(tiny_llama(9), tmp_path / "src")
    out = tmp_path / "frontier"
    args = ["frontier", src, "--out", out, "--presets", "q4_0", "--secateur-presets", "q4_0",
            "--roundings", "gptq", "--keep", "q4_0 gptq", "--nsamples", "4", "--seqlen", "32",
            "--windows", "2", "--eval-seqlen", "32"]
    code, printed, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    record = json.loads((out / "frontier.json").read_text())
    assert set(record["points"]) == {"f32", "llama.cpp q4_0", "llama.cpp q4_0 imatrix",
                                     "secateur q4_0 gptq"}
    ours = record["points"]["secateur q4_0 gptq"]
    theirs = record["points"]["llama.cpp q4_0 imatrix"]
    # the same tensor types, so the same bytes but for a few metadata keys
    assert abs(ours["mib"] / theirs["mib"] - 1) < 1e-3
    assert record["protocol"]["wiki"]["windows"] == 2
    for name in ("frontier.png", "imatrix.gguf", "secateur-q4_0-gptq.gguf"):
        assert (out / name).is_file(), name
    assert "beats every llama.cpp point" in printed
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")  # nothing left to measure
    assert code == 0, err
    assert json.loads((out / "frontier.json").read_text())["points"] == record["points"]
    code, _, err = run_cli(monkeypatch, capsys, *args[:-2], "--eval-seqlen", "16", "--resume")
    assert code == 2 and "other settings" in err


def test_recipe_with_a_gguf_step_saves_llama_cpp_blocks_and_benches_them(tmp_path):
    from secateur.recipe import Recipe, run_recipe
    from tests.formats.test_export import save

    src = save(tiny_llama(10), tmp_path / "src")
    recipe = Recipe(model=str(src),
                    calibration={"source": "c4-sample", "nsamples": 2, "seqlen": 32, "seed": 0},
                    steps=[{"method": "shortgpt", "layers": 1},
                           {"method": "gguf", "preset": "q4_0", "act_order": True}],
                    evaluate={"perplexity": [{"data": "wiki", "seqlen": 32, "max_windows": 2}]},
                    bench={"lengths": [16], "decode_tokens": 4, "repeats": 1, "threads": 1})
    result = run_recipe(recipe, tmp_path / "run", progress=False, say=lambda _: None)
    saved = tmp_path / "run" / "model" / "model.gguf"
    assert result.final.format == "gguf" and saved.is_file()
    reader = gguf.GGUFReader(saved)
    assert reader.fields["llama.block_count"].contents() == 3  # one layer cut before rounding
    assert {t.tensor_type.name for t in reader.tensors if ".attn_q." in t.name} == {"Q4_0"}
    bench = result.final.bench
    assert bench["runtime"].startswith("llama.cpp") and len(bench["models"]) == 2
    assert bench["baseline"] in bench["models"]
    from secateur.cli import _print_recipe  # what `secateur run` prints, GGUF bench included

    _print_recipe(result)
    # the README's main-job command again: --overwrite replaces the run it wrote
    again = run_recipe(recipe, tmp_path / "run", overwrite=True, progress=False,
                       say=lambda _: None)
    assert again.final.format == "gguf" and saved.is_file()
    # the file holds what the recipe evaluated: llama.cpp scores it as transformers did
    from secateur.data.sources import load_text
    from secateur.eval.gguf import gguf_perplexity

    ours = gguf_perplexity(saved, load_text("wiki", split="test"), 32, 2).perplexity
    assert abs(ours / result.final.first_perplexity - 1) < 0.02


def test_frontier_dwq_point_keeps_the_bytes_and_lowers_the_divergence(tmp_path, monkeypatch,
                                                                      capsys):
    import json

    from tests.formats.test_export import save
    from tests.jobs.test_loading_and_cli import run_cli

    src = save(tiny_llama(11), tmp_path / "src")
    out = tmp_path / "f"
    code, _, err = run_cli(monkeypatch, capsys, "frontier", src, "--out", out, "--presets",
                           "q4_0", "--secateur-presets", "q4_0", "--roundings", "rtn,rtn+dwq",
                           "--nsamples", "4", "--seqlen", "32", "--windows", "2",
                           "--eval-seqlen", "32", "--dwq-steps", "6")
    assert code == 0, err
    pts = json.loads((out / "frontier.json").read_text())["points"]
    plain, learnt = pts["secateur q4_0 rtn"], pts["secateur q4_0 rtn+dwq"]
    assert learnt["mib"] == plain["mib"]  # same types, same codes: same bytes
    assert learnt["wiki"] != plain["wiki"]  # the scales moved


def test_frontier_puts_pruned_models_on_the_unpruned_models_ladder(tmp_path):
    from secateur.api import CalibrationConfig, prune
    from secateur.errors import SecateurError
    from secateur.formats.loader import load
    from secateur.frontier import FrontierSpec, frontier
    from secateur.methods.layers import ShortGPTConfig
    from tests.formats.test_export import save

    src = save(tiny_llama(12), tmp_path / "src")
    calib = CalibrationConfig("c4-sample", 2, 32, 0)
    small = load(str(src))
    prune(small, ShortGPTConfig(layers=1), calib, progress=False)
    pruned = save(small.model, tmp_path / "shortgpt-1")
    spec = FrontierSpec(presets=("q4_0",), secateur_presets=(), calibration=calib, windows=2,
                        seqlen=32, pruned=(str(pruned),), pruned_presets=("q4_0",),
                        pruned_roundings=("rtn",))
    result = frontier(str(src), spec, tmp_path / "f", say=lambda _: None)
    ours = result["points"]["secateur shortgpt-1 q4_0 rtn"]
    dense = result["points"]["llama.cpp q4_0 imatrix"]
    assert ours["pruned_from"] == str(src) and ours["model"] == str(pruned)
    assert ours["parameters"] < sum(p.numel() for p in load(str(src)).model.parameters())
    assert ours["mib"] < dense["mib"] and ours["wiki"] > 1
    # which pruned models were measured is not a setting: adding one later resumes
    assert "pruned" not in result["settings"]
    bad = FrontierSpec(presets=("q4_0",), pruned=(str(tmp_path / "nothing"),))
    with pytest.raises(SecateurError, match="not a model folder"):
        frontier(str(src), bad, tmp_path / "g", say=lambda _: None)


def test_ladder_only_presets_go_below_q3_k_s_and_refuse_what_llama_cpp_refuses(tmp_path):
    """llama.cpp's Q2_K / IQ3_XXS rungs (secateur does not round to them) quantize through the
    same call, smaller than Q3_K_S on 256-wide rows; Q2_K_S without an imatrix is refused in
    one line before llama.cpp runs, and secateur's own rounding is not offered them."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from secateur.errors import SecateurError
    from secateur.frontier import FrontierSpec

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, bos_token_id=256, eos_token_id=257)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    f32 = tmp_path / "f32.gguf"
    export_model(model, bpe_tokenizer(), "gguf", f32, outtype="f32")
    imatrix = {t.name: torch.ones(int(t.shape[0])) for t in gguf.GGUFReader(f32).tensors
               if t.name.startswith("blk.")}
    size = {}
    for preset in ("q3_k_s", "q2_k", "iq3_xxs"):
        runtime.quantize(f32, tmp_path / f"{preset}.gguf", preset, imatrix)
        size[preset] = (tmp_path / f"{preset}.gguf").stat().st_size
        types = {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / f"{preset}.gguf").tensors
                 if t.name.startswith("blk.")}
        assert {"q2_k": "Q2_K", "iq3_xxs": "IQ3_XXS", "q3_k_s": "Q3_K"}[preset] in types
        assert runtime.perplexity(tmp_path / f"{preset}.gguf", windows())["perplexity"] > 1
    assert size["q2_k"] < size["q3_k_s"] and size["iq3_xxs"] < size["q3_k_s"]
    with pytest.raises(SecateurError, match="needs an importance matrix"):
        runtime.quantize(f32, tmp_path / "s.gguf", "q2_k_s")
    FrontierSpec(presets=("q2_k", "q2_k_s")).check()  # the ladder takes them
    with pytest.raises(SecateurError, match="unknown llama.cpp preset 'q2_k'"):
        FrontierSpec(presets=("q4_0",), secateur_presets=("q2_k",)).check()
