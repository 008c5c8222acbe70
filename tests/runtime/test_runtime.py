"""The int4/int8 CPU runtimes compute what the dequantized linears compute; W8A8 stays close."""

from __future__ import annotations

import copy

import pytest
import torch

from secateur.engine.sequential import prune_layerwise
from secateur.errors import SecateurError
from secateur.formats.packed_runtime import load_packed
from secateur.formats.packed_save import round_kept_tensors, save_packed
from secateur.methods.w8a8 import W8A8, W8A8Config, smoothing_scales
from secateur.models import adapter_for
from secateur.params import count_parameters
from secateur.runtime import (
    Int4Linear,
    Int8Linear,
    W8A8Linear,
    apply_runtime,
    avx2,
    fuse,
    runtime_weight_bytes,
)
from secateur.runtime.fuse import FusedOutput
from secateur.runtime.half import Float16Embedding, Float16Linear, float16_gemm_available
from secateur.runtime.head import Int8Embedding
from secateur.runtime.int8 import fake_quantize_tokens
from tests.formats.test_packed import IDS, logits, quantize_tiny, rtn, scattered_g_idx
from tests.tiny_models import tiny_model

# fp32 kernels against fp32 dequantized matmuls: only summation order differs
ATOL = 1e-4


@pytest.fixture(params=["avx2", "aten"])
def backend(request, monkeypatch):
    """Every runtime test runs on secateur's AVX2 kernels and on torch's own."""
    if request.param == "aten":
        monkeypatch.setattr(avx2, "kernels", lambda: None)
    elif avx2.kernels() is None:
        pytest.skip("no AVX2 kernels on this machine")
    return request.param


def one_linear(out_f: int, in_f: int, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f, bias=bias)


@pytest.mark.parametrize("bits,group,sym,runtime,cls", [
    (4, 32, True, "int4", Int4Linear),
    (4, 64, False, "int4", Int4Linear),
    (4, 96, False, "int4", Int4Linear),  # runs as kernel groups of 32
    (4, 128, True, "int4", Int4Linear),  # 192 = 128 + a partial group of 64
    (3, -1, False, "int4", Int4Linear),  # per channel, 3 bits on the 4-bit kernel
    (8, -1, True, "int8", Int8Linear),
    (8, -1, False, "int8", Int8Linear),  # zero points off 128: the x.sum() correction
    (4, -1, False, "int8", Int8Linear),
])
def test_runtime_linear_matches_dequantized(bits, group, sym, runtime, cls, backend):
    lin = one_linear(40, 192)  # 40 rows: torch's int4 packer pads to a multiple of 16
    rtn(lin, bits, group, sym)
    batches = [torch.randn(1, 192), torch.randn(3, 192), torch.randn(3, 5, 192)]  # 15 > 8 rows
    want = [lin(x) for x in batches]
    model = apply_runtime(torch.nn.Sequential(lin), runtime)
    assert type(model[0]) is cls
    if cls is Int4Linear:
        assert model[0].backend == backend
    for x, w in zip(batches, want, strict=True):
        got = model(x)
        assert got.shape == w.shape and (got - w).abs().max() < ATOL


def test_int4_runs_scattered_act_order_by_gathering_columns(backend):
    lin = one_linear(32, 128)
    rtn(lin, 4, 32, False, scattered_g_idx(128, 32), actorder="group")
    x = torch.randn(4, 128)
    want = lin(x)
    model = apply_runtime(torch.nn.Sequential(lin), "int4")
    assert model[0].perm is not None
    assert (model(x) - want).abs().max() < ATOL


@pytest.mark.parametrize("runtime,bits,group", [("int4", 4, 32), ("int8", 8, -1)])
def test_runtime_model_logits_match(runtime, bits, group, backend):
    model = quantize_tiny(bits, group, symmetric=False)
    want = logits(model)
    apply_runtime(model, runtime)
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    assert (logits(model) - want).abs().max() < ATOL
    out = model.generate(torch.tensor(IDS), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(IDS[0]) + 4)


@pytest.mark.parametrize("runtime,bits,group", [("int4", 4, 32), ("int8", 8, -1)])
def test_load_packed_builds_the_runtime_model_from_disk(tmp_path, runtime, bits, group,
                                                       backend):
    model = quantize_tiny(bits, group, symmetric=False)
    save_packed(model, None, tmp_path / "m")
    round_kept_tensors(model)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    loaded = load_packed(tmp_path / "m", runtime)
    assert (logits(loaded) - logits(model)).abs().max() < ATOL
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    layer = loaded.model.layers[0]
    assert type(layer.mlp.down_proj) is (Int4Linear if runtime == "int4" else Int8Linear)
    if float16_gemm_available():  # the float16 head and embedding stay float16
        assert type(loaded.lm_head) is Float16Linear
        assert type(loaded.model.embed_tokens) is Float16Embedding
    # tiny widths: the two fp32 embedding matrices are 23% of this model
    assert runtime_weight_bytes(loaded) < (0.5 if runtime == "int4" else 0.6) * fp32_bytes


@pytest.mark.parametrize("runtime,bits,group", [("int4", 4, 32), ("int8", 8, -1)])
def test_packed_model_counts_its_logical_parameters(tmp_path, runtime, bits, group, backend):
    """A packed model has the parameters and zeros of the model it was saved from, though
    its weights are integer buffers (and a float16 table), not parameters."""
    model = quantize_tiny(bits, group, symmetric=False)
    layer = model.model.layers[0]
    layer.mlp.up_proj.weight.data[:, :32] = 0  # zeros that stay zero on any grid
    save_packed(model, None, tmp_path / "m")
    round_kept_tensors(model)
    want = count_parameters(model)
    loaded = load_packed(tmp_path / "m", runtime)
    got = count_parameters(loaded)
    assert got["parameters"] == want["parameters"] and got["nonzero"] == want["nonzero"]
    assert got["bytes_in_memory"] < 0.6 * want["bytes_in_memory"]


def test_int4_fuses_linears_that_share_an_input(monkeypatch):
    model = quantize_tiny(4, 32, symmetric=False)
    want = logits(model)
    dense_count = count_parameters(model)
    unfused = copy.deepcopy(model)
    apply_runtime(model, "int4")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert [type(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)] == \
        [FusedOutput, FusedOutput, FusedOutput, Int4Linear]
    assert type(mlp.gate_proj) is FusedOutput and type(mlp.down_proj) is Int4Linear
    # one kernel call per group: the first member runs it, the others take their rows
    calls = []
    attn.q_proj.fused.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 1, attn.q_proj.in_features)
    pieces = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    assert len(calls) == 1 and all(p.is_contiguous() for p in pieces)
    x.mul_(2)  # an input changed in place is a new input
    assert torch.allclose(attn.q_proj(x), 2 * pieces[0], atol=ATOL) and len(calls) == 2
    assert (logits(model) - want).abs().max() < ATOL
    # the same bytes and logical parameters as the unfused runtime
    monkeypatch.setattr(fuse, "fusable", lambda linears: False)
    apply_runtime(unfused, "int4")
    assert type(unfused.model.layers[0].self_attn.q_proj) is Int4Linear
    assert runtime_weight_bytes(model) == runtime_weight_bytes(unfused)
    for m in (model, unfused):
        count = count_parameters(m)
        assert (count["parameters"], count["nonzero"]) == (dense_count["parameters"],
                                                           dense_count["nonzero"])


def test_int4_runtime_generates_under_inference_mode():
    """Inference tensors keep no version counter; the fused linears must not need one."""
    model = quantize_tiny(4, 32, symmetric=False)
    apply_runtime(model, "int4")
    ids = torch.tensor(IDS)[:, :8]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        want_logits = model(ids).logits
    with torch.inference_mode():
        got = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        got_logits = model(ids).logits
    assert torch.equal(got, want)
    assert (got_logits - want_logits).abs().max() < ATOL


def test_w8a8_logits_close_to_fp32_and_int8_runtime_exact():
    dense = tiny_model("llama")
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    method = W8A8(W8A8Config(smoothquant_alpha=0.5))
    method.prepare(model, adapter, None)
    torch.manual_seed(0)
    calibration = [torch.randint(0, 256, (1, 32)) for _ in range(4)]
    reports = prune_layerwise(model, adapter, method, calibration, progress=False)
    assert len(reports) == 3 and all(r.relative_error < 0.05 for r in reports)
    want, got = logits(dense), logits(model)
    rel = (got - want).abs().max() / want.abs().max()
    assert 0 < rel < 0.05  # quantized, and close
    apply_runtime(model, "int8")
    assert type(model.model.layers[0].self_attn.q_proj) is W8A8Linear
    diff = (logits(model) - got).abs()  # see test_w8a8_saves_int_quantized_and_loads_on_int8
    assert diff.max() < 3e-3 and diff.median() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_smoothquant_alone_keeps_the_function(family):
    """Smoothing (scales folded into the norms) before any rounding changes nothing: RMSNorm,
    Gemma's (1 + weight) RMSNorm and LayerNorm with its bias."""
    dense = tiny_model(family)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    method = W8A8(W8A8Config(smoothquant_alpha=0.8))
    method.prepare(model, adapter, None)
    from secateur.stats.absmax import ColumnAbsMax

    layer = adapter.layers[0]
    stats = {}
    for p in adapter.linears(layer).values():
        s = ColumnAbsMax(p.in_features)
        s.add(torch.rand(10, p.in_features) * 5)
        stats[p.name] = {ColumnAbsMax.name: s}
    method._smooth(layer, 0, stats)
    assert method.smoothing[0]["max_scale"] != 1.0
    assert (logits(model) - logits(dense)).abs().max() < 1e-4


def test_w8a8_saves_int_quantized_and_loads_on_int8(tmp_path):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    method = W8A8(W8A8Config(smoothquant_alpha=None))
    method.prepare(model, adapter, None)
    prune_layerwise(model, adapter, method, [torch.randint(0, 256, (1, 16))], progress=False)
    save_packed(model, None, tmp_path / "w8a8")
    round_kept_tensors(model)
    loaded = load_packed(tmp_path / "w8a8", "int8")
    assert type(loaded.model.layers[2].mlp.up_proj) is W8A8Linear
    diff = (logits(loaded) - logits(model)).abs()
    # per-token rounding is discontinuous: where float summation order differs, a value on a
    # rounding boundary lands one int8 step apart, so a few logits move by ~1e-3; most agree
    assert diff.max() < 3e-3 and diff.median() < 1e-5
    with pytest.raises(SecateurError, match="W8A8.*runtime='int8'"):
        load_packed(tmp_path / "w8a8", "int4")
    with pytest.raises(SecateurError, match="W8A8.*runtime='int8'"):
        apply_runtime(model, "int4")
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing swapped


def test_fake_quantized_tokens_sit_on_their_int8_grid():
    x = torch.randn(3, 7, 64) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1)
    q = fake_quantize_tokens(x)
    scale = x.abs().amax(-1, keepdim=True) / 127
    codes = q / scale
    assert (codes - codes.round()).abs().max() < 1e-3 and codes.abs().max() <= 127.001
    assert ((q - x).abs() <= scale / 2 + 1e-6).all()


def test_smoothing_scales_leave_dead_columns_alone():
    act = torch.tensor([4.0, 0.0, 1.0])
    w = torch.tensor([[1.0, 2.0, 0.0]])
    s = smoothing_scales(act, [w], 0.5)
    assert s.tolist() == pytest.approx([2.0, 1.0, 1.0])


# -- bad inputs --------------------------------------------------------------------------
def test_runtime_for_unquantized_model_is_refused():
    with pytest.raises(SecateurError, match="no quantized linears for the int4 runtime"):
        apply_runtime(tiny_model("llama"), "int4")


def test_unknown_runtime_is_refused():
    with pytest.raises(SecateurError, match="unknown runtime 'int3'"):
        apply_runtime(quantize_tiny(4, 32), "int3")


def test_int4_runtime_refuses_8_bit_weights_untouched():
    model = quantize_tiny(8, -1)
    with pytest.raises(SecateurError, match="8-bit weights.*runtime='int8'") as err:
        apply_runtime(model, "int4")
    assert "\n" not in str(err.value)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # nothing swapped


def test_int8_runtime_refuses_grouped_weights():
    with pytest.raises(SecateurError, match="groups per row.*runtime='int4'"):
        apply_runtime(quantize_tiny(4, 32), "int8")


def test_load_packed_of_a_plain_model_is_refused(tmp_path, tiny_dir):
    with pytest.raises(SecateurError, match="holds no quantized weights"):
        load_packed(tiny_dir("llama"), "int4")


def test_w8a8_refuses_an_already_quantized_model():
    model = quantize_tiny(4, 32)
    with pytest.raises(SecateurError, match="already quantized"):
        W8A8(W8A8Config()).prepare(model, adapter_for(model), None)


def test_w8a8_config_is_typed():
    from secateur.config import ConfigError

    assert W8A8Config.method == "w8a8" and W8A8Config.kind == "quantize"
    assert W8A8Config(smoothquant_alpha=None).smoothquant_alpha is None
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        W8A8Config(smoothquant_alpha=1.5)


@pytest.mark.slow
def test_smollm2_int4_g128_packed_size_and_runtime(smollm2_copy, tmp_path):
    """The issue's numbers on the real model: 4-bit g128 (576 = 4 x 128 + 64) on disk <= 30%
    of fp32, runtime weights <= 35%, and the runtime's logits those of the saved model."""
    model = smollm2_copy.model
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    for layer in smollm2_copy.adapter.layers:
        for proj in smollm2_copy.adapter.linears(layer).values():
            rtn(proj.module, 4, 128, symmetric=True)
    out = save_packed(model, smollm2_copy.tokenizer, tmp_path / "w4")
    on_disk = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    assert on_disk <= 0.30 * fp32_bytes
    round_kept_tensors(model)
    ids = smollm2_copy.tokenizer("The quick brown fox jumps over the lazy dog",
                                 return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(ids).logits
        loaded = load_packed(out, "int4")
        got = loaded(ids).logits
    assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert runtime_weight_bytes(loaded) <= 0.35 * fp32_bytes


def test_gptq_scattered_act_order_runs_on_int4(backend):
    from secateur.methods.gptq import GPTQConfig
    from tests.formats.test_packed import run_method

    model = tiny_model("llama")
    run_method(model, GPTQConfig(bits=4, group_size=32, act_order=True))
    want = logits(model)
    apply_runtime(model, "int4")
    assert model.model.layers[0].mlp.up_proj.perm is not None
    assert (logits(model) - want).abs().max() < ATOL


def _tied_tiny(family: str = "llama"):
    """A 4-bit tiny model whose head and embedding are one table (smollm2's case)."""
    model = quantize_tiny(4, 32, symmetric=False, family=family)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.get_input_embeddings().weight
    return model


# untied llama; tied llama (one int8 table for both); tied gemma (its scaled embedding keeps
# its own float table)
@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True),
                                         ("gemma3_text", True)])
def test_int8_head_rounds_the_head_per_row_and_halves_its_bytes(tmp_path, family, tied,
                                                               backend):
    model = _tied_tiny(family) if tied else quantize_tiny(4, 32, symmetric=False, family=family)
    save_packed(model, None, tmp_path / "m")
    f16 = load_packed(tmp_path / "m", "int4")
    int8 = load_packed(tmp_path / "m", "int4", head="int8")
    assert type(int8.lm_head) is Int8Linear
    # float16 where the runtime keeps it so (llama), else the float table it loaded (gemma's
    # scaled embedding stays a float32 module)
    stored = (f16.lm_head.logical_parameters()[0] if isinstance(f16.lm_head, Float16Linear)
              else f16.lm_head.weight)
    table = stored.float()
    scale = table.abs().amax(1, keepdim=True) / 127
    err = (int8.lm_head.dense_weight() - table).abs()
    assert bool((err <= scale / 2 + 1e-6).all())  # round to nearest, one scale per row
    assert err.max() > 0  # and it did round
    ids = torch.tensor(IDS)
    rows_f16, rows_int8 = f16.get_input_embeddings()(ids), int8.get_input_embeddings()(ids)
    shared = tied and family == "llama"
    if shared:  # the lookup reads the head's int8 rows: one table in memory
        assert type(int8.get_input_embeddings()) is Int8Embedding
        assert int8.get_input_embeddings().weight_int8 is int8.lm_head.weight_int8
        assert bool(((rows_int8 - rows_f16).abs() <= scale[ids[0]] / 2 + 1e-6).all())
    else:  # the embedding keeps its own table
        assert type(int8.get_input_embeddings()) is type(f16.get_input_embeddings())
        assert torch.equal(rows_int8, rows_f16)
    with torch.no_grad():
        if not tied:  # logits move by at most the head's rounding: |x| . (scale / 2)
            hidden = f16.model(ids).last_hidden_state
            bound = hidden.abs() @ (scale / 2).expand_as(table).t() + 1e-4
            assert bool(((int8.lm_head(hidden) - f16.lm_head(hidden)).abs() <= bound).all())
        assert torch.equal(logits(int8).argmax(-1), logits(f16).argmax(-1))
    head_16 = table.numel() * stored.element_size()
    head_int8 = table.numel() + table.shape[0] * 4  # codes and a float32 scale per row
    assert runtime_weight_bytes(f16) - runtime_weight_bytes(int8) == head_16 - head_int8
    # memory: the int8 table replaces the head's own table (untied) or the shared one, and
    # fbgemm's packed copy (aten backend); it is added beside a table the embedding keeps
    opaque = getattr(f16.lm_head, "opaque_bytes", lambda: 0)()
    released = opaque + (head_16 if shared or (not tied and not opaque) else 0)
    held_f16 = count_parameters(f16)["bytes_in_memory"]
    held_int8 = count_parameters(int8)["bytes_in_memory"]
    assert held_int8 - held_f16 == head_int8 - released
    assert count_parameters(int8)["parameters"] == count_parameters(f16)["parameters"] + (
        0 if shared or not tied else table.numel())  # a head of its own: untied now


def test_int8_head_in_memory_shares_one_table_with_a_tied_embedding(backend):
    model = _tied_tiny()
    table = model.get_input_embeddings().weight.detach().clone()
    want = logits(model)
    apply_runtime(model, "int4", head="int8")
    assert type(model.lm_head) is Int8Linear
    assert type(model.get_input_embeddings()) is Int8Embedding
    rows = model.get_input_embeddings()(torch.arange(table.shape[0]))
    scale = table.abs().amax(1, keepdim=True) / 127
    assert bool(((rows - table).abs() <= scale / 2 + 1e-6).all())
    got = logits(model)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    # generate through the decode path and the KV cache gives what full forwards give
    prompt = torch.tensor([IDS[0][:4]])
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] == 10 and torch.equal(cached, uncached)
    with pytest.raises(SecateurError, match="unknown head format 'int2'"):
        apply_runtime(quantize_tiny(4, 32), "int4", head="int2")
    # a head format without a runtime is refused before anything loads (no such model here)
    from secateur.formats.loader import load
    with pytest.raises(SecateurError, match="give runtime"):
        load("no/such-model", head="int8")
