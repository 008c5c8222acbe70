"""Quantized models saved packed (compressed-tensors) reload without secateur, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from secateur.errors import SecateurError
from secateur.formats.hf import save_model
from secateur.formats.packed_save import WEIGHTS, pack_codes, round_kept_tensors, save_packed
from secateur.models import adapter_for
from secateur.quant.state import QuantState, set_quant_state
from tests.reload import reload_without_secateur as reload
from tests.tiny_models import byte_tokenizer, tiny_model

IDS = [[256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 84]]


def scattered_g_idx(in_features: int, size: int, seed: int = 0) -> torch.Tensor:
    """Act-order groups: a random column order, cut into groups of `size` (GPTQ desc_act)."""
    perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // size).int()
    return g_idx


@torch.no_grad()
def rtn(linear: torch.nn.Linear, bits: int, group_size: int, symmetric: bool = True,
        g_idx: torch.Tensor | None = None, actorder: str | None = None) -> QuantState:
    """Round to nearest on the QuantState grid (min/max per group); weight := dequantized."""
    w = linear.weight.data
    size = w.shape[1] if group_size == -1 else group_size
    groups = g_idx.long() if g_idx is not None else torch.arange(w.shape[1]) // size
    top = 2**bits - 1
    scale = torch.zeros(w.shape[0], int(groups.max()) + 1)
    zero = torch.zeros_like(scale)
    for g in range(scale.shape[1]):
        cols = w[:, groups == g]
        if symmetric:
            scale[:, g] = (cols.abs().amax(1) * 2 / top).clamp_min(1e-8)
            zero[:, g] = (top + 1) / 2
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scale[:, g] = ((hi - lo) / top).clamp_min(1e-8)
            zero[:, g] = torch.round(-lo / scale[:, g])
    state = QuantState(bits, group_size, symmetric, scale, zero, g_idx, actorder)
    w.copy_(state.dequantize(state.codes(w)))
    set_quant_state(linear, state)
    return state


def quantize_tiny(bits: int, group_size: int, symmetric: bool = True, actorder=None,
                  scattered: bool = False, seed: int = 0, family: str = "llama"):
    model = tiny_model(family, seed)
    adapter = adapter_for(model)
    for layer in adapter.layers:
        for proj in adapter.linears(layer).values():
            g_idx = None
            if scattered:
                g_idx = scattered_g_idx(proj.in_features, group_size)
            rtn(proj.module, bits, group_size, symmetric, g_idx, actorder)
    return model


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(torch.tensor(IDS)).logits


def reload_without_secateur(dirs, cwd) -> list[torch.Tensor]:
    """Logits of each directory loaded by plain transformers in a fresh process (which also
    generates from each, with and without the KV cache), in the checkpoint's own dtype."""
    got = reload({str(d): d for d in dirs}, IDS, cwd, trust_remote_code=False, dtype=None)
    return [torch.tensor(got[str(d)]["logits"])[None] for d in dirs]


CASES = {  # name: (bits, group size, symmetric)
    "w4-g32-sym": (4, 32, True),
    "w4-g32-asym": (4, 32, False),
    "w4-g48-asym": (4, 48, False),  # 64/128 columns in groups of 48: partial last groups
    "w8-channel-sym": (8, -1, True),
    "w8-channel-asym": (8, -1, False),
    "w3-g32-asym": (3, 32, False),  # 3-bit codes straddle int32 words
}


@pytest.mark.reload
def test_packed_reloads_in_transformers_without_secateur(tmp_path):
    dirs, expected = [], []
    for name, (bits, group, sym) in CASES.items():
        model = quantize_tiny(bits, group, sym, actorder="weight" if name == "w4-g32-sym"
                              else None)
        save_packed(model, byte_tokenizer(), tmp_path / name)
        round_kept_tensors(model)  # the saved embeddings are float16
        expected.append(logits(model))
        dirs.append(tmp_path / name)
    exact = quantize_tiny(4, 32, False)
    save_packed(exact, None, tmp_path / "fp32-embeddings", keep_dtype=None)
    expected.append(logits(exact))
    dirs.append(tmp_path / "fp32-embeddings")
    for d, want, got in zip(dirs, expected, reload_without_secateur(dirs, tmp_path),
                            strict=True):
        assert (got - want).abs().max() < 1e-3, d.name
        assert want.abs().max() > 0.05  # a model whose logits say something


def test_config_is_what_compressed_tensors_writes(tmp_path):
    model = quantize_tiny(4, 32, False, actorder="weight")
    save_packed(model, None, tmp_path / "m", metadata={"run": 1})
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["group_size"],
            w["actorder"]) == (4, "int", False, "group", 32, "weight")
    record = json.loads((tmp_path / "m" / "secateur.json").read_text())
    assert record["run"] == 1 and record["packed"]["embeddings_dtype"] == "float16"
    with safe_open(str(tmp_path / "m" / WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        q = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{q}.weight_packed").shape == (64, 8)  # 64 codes in 8 int32
        assert f.get_tensor(f"{q}.weight_packed").dtype == torch.int32
        assert f.get_tensor(f"{q}.weight_scale").shape == (64, 2)
        assert f.get_tensor(f"{q}.weight_zero_point").shape == (8, 2)  # packed along rows
        assert f.get_tensor(f"{q}.weight_shape").tolist() == [64, 64]
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == torch.float16  # untied here
    assert f"{q}.weight" not in keys


def test_int4_codes_eight_to_an_int32_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15] * 4], dtype=torch.uint8)
    words = pack_codes(codes, 4)
    assert words.shape == (1, 4) and words.dtype == torch.int32
    want = sum(int(c) << (4 * j) for j, c in enumerate(codes[0, :8].tolist()))
    assert words[0, 0].item() & 0xFFFFFFFF == want


def test_packed_is_much_smaller_than_fp32(tmp_path):
    fp32 = tiny_model("llama")
    save_model(fp32, None, tmp_path / "fp32")
    dense = (tmp_path / "fp32" / WEIGHTS).stat().st_size
    save_packed(quantize_tiny(4, 32), None, tmp_path / "w4")
    save_packed(quantize_tiny(8, -1), None, tmp_path / "w8")
    w4 = (tmp_path / "w4" / WEIGHTS).stat().st_size / dense
    w8 = (tmp_path / "w8" / WEIGHTS).stat().st_size / dense
    # the bound is 30% for 4 bits; at tiny widths the float16 embeddings (a quarter
    # of this model's parameters), scales and the safetensors header weigh a lot
    assert w4 < 0.3 and w8 < 0.4 and w4 < w8


@pytest.mark.reload
def test_mixed_schemes_get_one_config_group_each(tmp_path):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    for i, layer in enumerate(adapter.layers):
        for proj in adapter.linears(layer).values():
            rtn(proj.module, 4 if i else 8, 32 if i else -1)
    save_packed(model, None, tmp_path / "mixed")
    qc = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    targets = sorted(sorted(g["targets"]) for g in qc["config_groups"].values())
    assert len(targets) == 2
    assert all(t.startswith("model.layers.0.") for t in targets[0])
    assert len(targets[1]) == 14 and not any(t.startswith("model.layers.0.") for t in
                                             targets[1])
    round_kept_tensors(model)
    (got,) = reload_without_secateur([tmp_path / "mixed"], tmp_path)
    assert (got - logits(model)).abs().max() < 1e-3


def test_mixed_asymmetric_grids_are_refused(tmp_path):
    model = quantize_tiny(4, 32, symmetric=False)
    rtn(model.model.layers[0].mlp.down_proj, 8, -1, symmetric=False)
    with pytest.raises(SecateurError, match="different grids, some asymmetric"):
        save_packed(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_partial_last_groups_share_one_stored_width(tmp_path):
    model = quantize_tiny(4, 48)  # in 64 -> gcd 16, in 128 -> gcd 16: one group of width 16
    save_packed(model, None, tmp_path / "m")
    qc = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["group_size"] == 16


def test_scattered_act_order_is_refused_and_nothing_written(tmp_path):
    model = quantize_tiny(4, 32, scattered=True, actorder="group")
    with pytest.raises(SecateurError, match="act-order.*static groups") as err:
        save_packed(model, None, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(SecateurError, match="no quantized linears"):
        save_packed(tiny_model("llama"), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weight_moved_off_its_grid_is_refused(tmp_path):
    model = quantize_tiny(4, 32)
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] += 0.1234
    with pytest.raises(SecateurError, match="up_proj' is no longer on its 4-bit grid"):
        save_packed(model, None, tmp_path / "out")


def test_bfloat16_model_packs_its_rounded_grid(tmp_path):
    model = quantize_tiny(4, 32, symmetric=False).to(torch.bfloat16)
    save_packed(model, None, tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(SecateurError, match="already exists"):
        save_packed(quantize_tiny(4, 32), None, tmp_path / "out")
    save_packed(quantize_tiny(4, 32), None, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / WEIGHTS).is_file()


def run_method(model, config) -> None:
    from secateur.engine.sequential import prune_layerwise
    from secateur.methods import build_method

    adapter = adapter_for(model)
    method = build_method(config)
    method.prepare(model, adapter, None)
    torch.manual_seed(0)
    prune_layerwise(model, adapter, method, [torch.randint(0, 256, (1, 32)) for _ in range(4)],
                    progress=False)


@pytest.mark.reload
def test_secateur_rtn_and_gptq_outputs_pack_and_reload(tmp_path):
    """The real quantizers' grids (not this file's RTN) survive packing."""
    from secateur.methods.gptq import GPTQConfig
    from secateur.methods.rtn import RTNConfig

    configs = {"rtn-w4-g32-asym": RTNConfig(bits=4, group_size=32, symmetric=False),
               "gptq-w4-g32-static-actorder": GPTQConfig(bits=4, group_size=32, act_order=True,
                                                        static_groups=True),
               "gptq-w8-channel": GPTQConfig(bits=8, group_size=-1),
               # 48 divides neither 64 nor 128: GPTQ reference's narrower last group
               "gptq-w4-g48-partial": GPTQConfig(bits=4, group_size=48, symmetric=False,
                                                 partial_groups=True)}
    dirs, expected = [], []
    for name, config in configs.items():
        model = tiny_model("llama")
        run_method(model, config)
        save_packed(model, None, tmp_path / name)
        round_kept_tensors(model)
        expected.append(logits(model))
        dirs.append(tmp_path / name)
    for d, want, got in zip(dirs, expected, reload_without_secateur(dirs, tmp_path),
                            strict=True):
        assert (got - want).abs().max() < 1e-3, d.name


def test_gptq_scattered_act_order_is_refused(tmp_path):
    from secateur.methods.gptq import GPTQConfig

    model = tiny_model("llama")
    run_method(model, GPTQConfig(bits=4, group_size=32, act_order=True))
    with pytest.raises(SecateurError, match="act-order with scattered groups"):
        save_packed(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensor_file_reads_what_safetensors_wrote_and_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    from secateur.errors import SecateurError
    from secateur.runtime.tensor_file import TensorFile

    torch.manual_seed(0)
    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).bfloat16(),
               "f16": torch.randn(7).half(), "i32": torch.randint(-9, 9, (2, 3, 2)).int(),
               "u8": torch.randint(0, 255, (6,), dtype=torch.uint8), "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    f = TensorFile(tmp_path / "t.safetensors")
    assert sorted(f.keys()) == sorted(tensors)
    for key, want in tensors.items():
        got = f.get_tensor(key)
        assert got.dtype == want.dtype and torch.equal(got, want)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    cut = TensorFile(tmp_path / "cut.safetensors")
    last = max(cut.entries, key=lambda k: cut.entries[k]["data_offsets"][1])
    with pytest.raises(SecateurError, match="truncated"):
        cut.get_tensor(last)
