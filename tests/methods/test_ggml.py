"""llama.cpp block types with secateur's rounding: exact bytes, llama.cpp's presets, GGUF files.

Dequantization is checked with the `gguf` package's own numpy reader, which follows ggml's
block layouts; llama.cpp itself reads the files in tests that need llama-cpp-python.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from secateur.api import quantize
from secateur.errors import SecateurError
from secateur.formats.export import export_model
from secateur.formats.gguf import _rotary_permute
from secateur.methods.gguf import GGUFConfig
from secateur.quant.ggml import TYPES, gptq_ggml, pack, rtn_ggml
from secateur.quant.ggml_presets import TensorSlot, tensor_types
from tests.formats.test_export import bpe_tokenizer, tiny_llama

ROLE_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def problem(seed: int = 0, rows: int = 48, cols: int = 512):
    """A weight and a Hessian from correlated inputs with uneven column scales, as real
    activations have (a few loud channels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(4096, cols, generator=g) @ mix * (torch.rand(cols, generator=g) * 4 + 0.1)
    return w, x.T @ x


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = w - q
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum())


@pytest.mark.parametrize("name", sorted(TYPES))
@pytest.mark.parametrize("rounding", ["rtn", "gptq", "gptq-act-order"])
def test_blocks_dequantize_exactly_to_the_weights_in_memory(name, rounding):
    w, h = problem()
    deq, state = (rtn_ggml(w, name, torch.diag(h)) if rounding == "rtn"
                  else gptq_ggml(w, h, name, act_order=rounding == "gptq-act-order"))
    raw = pack(state)
    t = TYPES[name]
    assert raw.shape == (w.shape[0], w.shape[1] // t.block * t.nbytes)
    back = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, name))
    assert np.array_equal(back, deq.numpy())
    assert int(state.codes.max()) <= t.maxq
    assert output_error(w, deq, h) < {8: 1e-3, 6: 3e-3, 5: 1e-2, 4: 3e-2, 3: 4e-2}[
        int(np.log2(t.maxq + 1))]


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K", "Q3_K", "IQ4_NL"])
def test_gptq_beats_nearest_rounding_on_the_same_grids(name):
    w, h = problem(1)
    rtn_err = output_error(w, rtn_ggml(w, name, torch.diag(h))[0], h)
    gptq_err = output_error(w, gptq_ggml(w, h, name)[0], h)
    act_err = output_error(w, gptq_ggml(w, h, name, act_order=True)[0], h)
    assert gptq_err < 0.9 * rtn_err
    assert act_err < gptq_err  # loud columns first, as GPTQ's act-order


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_importance_weighted_grids_beat_the_reference_quantizer(name):
    """llama.cpp's reference rounding (no imatrix; what gguf.quants.quantize does) against
    the importance-weighted search with the Hessian diagonal, on the output error."""
    w, h = problem(2)
    kind = getattr(gguf.GGMLQuantizationType, name)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), kind), kind))
    assert output_error(w, rtn_ggml(w, name, torch.diag(h))[0], h) < output_error(w, ref, h)


def test_rows_that_do_not_split_into_blocks_are_refused():
    with pytest.raises(SecateurError, match="Q4_K blocks of 256"):
        rtn_ggml(torch.randn(4, 576), "Q4_K")


def smollm2_slots(layers: int = 30) -> list[TensorSlot]:
    slots = [TensorSlot("token_embd.weight", "token_embd", 576)]
    for i in range(layers):
        for role in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            slots.append(TensorSlot(f"blk.{i}.{role}.weight", role, 576))
        slots.append(TensorSlot(f"blk.{i}.ffn_down.weight", "ffn_down", 1536))
    return slots


def test_q4_k_m_on_smollm2_is_what_llama_cpp_makes_of_it():
    """smollm2's 576-wide rows take llama.cpp's fallbacks: Q4_K -> Q5_0, Q6_K -> Q8_0 (the
    tied embedding too); its 1536-wide ffn_down keeps Q4_K, Q6_K in use_more_bits layers."""
    types = tensor_types("q4_k_m", smollm2_slots(), 30, has_imatrix=False)
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.5.attn_q.weight"] == "Q5_0"
    more = [i for i in range(30) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert {types[f"blk.{i}.ffn_down.weight"] for i in range(30) if i not in more} == {"Q4_K"}
    assert [types[f"blk.{i}.attn_v.weight"] for i in (0, 3, 5)] == ["Q8_0", "Q5_0", "Q8_0"]


def test_q3_k_m_on_smollm2_is_what_llama_cpp_makes_of_it():
    """Q3_K falls back to Q4_0 on 576-wide rows, the Q4_K/Q5_K bumps of attn_v, attn_output
    and ffn_down to Q5_0/Q5_1; the 1536-wide ffn_down keeps Q5_K in the first 30 // 16
    layers, Q4_K after."""
    types = tensor_types("q3_k_m", smollm2_slots(), 30, has_imatrix=True)
    assert types["token_embd.weight"] == "Q8_0"
    assert {types[f"blk.{i}.{r}.weight"] for i in range(30)
            for r in ("attn_q", "attn_k", "ffn_gate", "ffn_up")} == {"Q4_0"}
    assert [types[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == ["Q5_1", "Q5_1", "Q5_0"]
    assert {types[f"blk.{i}.attn_output.weight"] for i in range(30)} == {"Q5_0"}
    assert [types[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 29)] == ["Q5_K", "Q4_K", "Q4_K"]
    iq4 = tensor_types("iq4_nl", smollm2_slots(), 30, has_imatrix=False, n_gqa=3)
    assert [iq4[f"blk.{i}.ffn_down.weight"] for i in (0, 2, 3)] == ["Q5_K", "Q5_K", "IQ4_NL"]
    assert iq4["blk.0.attn_v.weight"] == "IQ4_NL" and iq4["token_embd.weight"] == "Q8_0"


def test_q4_0_with_an_imatrix_guards_the_first_ffn_down_layers():
    without = tensor_types("q4_0", smollm2_slots(), 30, has_imatrix=False)
    with_imatrix = tensor_types("q4_0", smollm2_slots(), 30, has_imatrix=True)
    assert without["blk.0.ffn_down.weight"] == "Q4_0"
    assert [with_imatrix[f"blk.{i}.ffn_down.weight"] for i in (0, 2, 3)] == [
        "Q4_1", "Q4_1", "Q4_0"]


def test_unknown_preset_fails_at_construction():
    with pytest.raises(ValueError, match="unknown llama.cpp preset"):
        GGUFConfig(preset="q3_x")


@pytest.mark.parametrize("preset", ["q4_k_m", "q4_0", "q3_k_s", "iq4_xs"])
def test_gguf_step_writes_its_own_codes_into_the_file(tmp_path, preset):
    torch.set_num_threads(1)
    model = tiny_llama(0)
    windows = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i))
               for i in range(8)]
    result = quantize(model, GGUFConfig(preset=preset), windows, progress=False)
    assert sum(result.summary["matrices_per_type"].values()) == 4 * 7
    from secateur.quant.ggml import ggml_states

    out = tmp_path / "m.gguf"
    written = export_model(model, bpe_tokenizer(), "gguf", out, outtype=preset,
                           quantized=ggml_states(model), has_imatrix=True)
    assert len(written["rounded_by_quantize_step"]) == 4 * 7
    reader = gguf.GGUFReader(out)
    sd = model.state_dict()
    checked = 0
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] != "blk" or parts[2] not in ROLE_TO_HF:
            continue
        assert t.tensor_type.name == written["tensor_types"][t.name]
        want = sd[f"model.layers.{parts[1]}.{ROLE_TO_HF[parts[2]]}.weight"]
        if parts[2] == "attn_q":
            want = _rotary_permute(want, 4)
        elif parts[2] == "attn_k":
            want = _rotary_permute(want, 2)
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), want.numpy())
        checked += 1
    assert checked == 4 * 7


def test_imatrix_file_holds_llama_cpps_sums_and_counts(tmp_path):
    from secateur.formats.imatrix import model_imatrix, write_imatrix

    model = tiny_llama(5)
    windows = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    quantize(model, GGUFConfig(preset="q4_0", rounding="rtn", sequential=False), windows,
             progress=False)
    means = model_imatrix(model)
    assert len(means) == 4 * 7
    out = tmp_path / "m.imatrix.gguf"
    write_imatrix(out, means, "c4-sample", 32, 4)
    r = gguf.GGUFReader(out)
    assert r.fields["general.type"].contents() == "imatrix"
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    mean, tokens = means["blk.0.ffn_down.weight"]
    assert tokens == 4 * 32
    assert tensors["blk.0.ffn_down.weight.counts"].reshape(-1).tolist() == [tokens]
    sums = tensors["blk.0.ffn_down.weight.in_sum2"].reshape(-1)
    assert sums.shape == (512,)
    np.testing.assert_allclose(sums, mean.double().numpy() * tokens, rtol=1e-6)
    # q, k and v read the same normed input: one imatrix between them, as llama.cpp's has
    assert torch.equal(means["blk.1.attn_q.weight"][0], means["blk.1.attn_v.weight"][0])


def test_gguf_step_keeps_its_blocks_in_the_state_dict_and_dense_saves_drop_them(tmp_path):
    """The codes, grids, packed fields and imatrix are buffers of each rounded linear (type
    as its scheme): a fresh model given the scheme loads them strictly and packs the same
    bytes; the dense savers leave them out."""
    from safetensors import safe_open

    from secateur.formats.hf import save_model
    from secateur.quant.ggml import ggml_scheme, ggml_states, set_ggml_scheme
    from secateur.quant.ggml_names import PREFIX
    from secateur.quant.state import weights_state_dict

    torch.set_num_threads(1)
    model = tiny_llama(0)
    windows = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    quantize(model, GGUFConfig(preset="q4_k_m"), windows, progress=False)
    states = ggml_states(model)
    sd = model.state_dict()
    name = "model.layers.0.mlp.down_proj.weight"
    stem = name[: -len("weight")]
    assert {k[len(stem):] for k in sd if k.startswith(stem + PREFIX)} >= {
        "weight_ggml_codes", "weight_ggml_s", "weight_ggml_b", "weight_ggml_imatrix",
        "weight_ggml_field_d"}
    assert not any(PREFIX in k for k in weights_state_dict(model))
    assert all(PREFIX not in n for n, _ in model.named_parameters())

    fresh = tiny_llama(1)
    for module_name, module in model.named_modules():
        scheme = ggml_scheme(module)
        if scheme is not None:
            own = {k: v.clone() for k, v in module._buffers.items() if k.startswith(PREFIX)}
            set_ggml_scheme(fresh.get_submodule(module_name), scheme, own)
    fresh.load_state_dict(sd, strict=True)
    again = ggml_states(fresh)
    assert again.keys() == states.keys()
    for key, state in states.items():
        assert again[key].type == state.type
        assert again[key].imatrix_tokens == state.imatrix_tokens > 0
        assert np.array_equal(pack(again[key]), pack(state)), key

    save_model(model, bpe_tokenizer(), tmp_path / "dense")
    (shard,) = (tmp_path / "dense").glob("*.safetensors")
    with safe_open(str(shard), "pt") as f:
        assert not any(PREFIX in k for k in f.keys())  # noqa: SIM118
