"""Pruning masks are recorded on the linears (`secateur.models.mask`), not read back from zeros:
a kept weight that is exactly 0 stays a kept weight for GPTQ and recovery, the masks follow
surgery, and no saved model holds them."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import secateur.methods.gptq as gptq_module
from secateur.api import CalibrationConfig, prune, quantize
from secateur.methods import MagnitudeConfig, SparseGPTConfig, WandaConfig
from secateur.methods.gptq import GPTQConfig
from secateur.models.loading import Loaded
from secateur.models.mask import MASK, has_masks, kept_mask, pack_bits, unpack_bits
from secateur.recovery.masks import record_masks
from tests.tiny_models import tiny_loaded

CALIB = CalibrationConfig("c4-sample", 4, 64, 0)


def _projections(loaded: Loaded):
    return {(i, name): p for i, layer in enumerate(loaded.adapter.layers)
            for name, p in loaded.adapter.linears(layer).items()}


def _zero_a_kept_weight(loaded: Loaded):
    """Set one kept weight of layer 0's first projection to exactly 0 (what rounding or chance
    does); returns the projection and the position."""
    proj = next(iter(loaded.adapter.linears(loaded.adapter.layers[0]).values()))
    rows, cols = (~proj.pruned()).nonzero(as_tuple=True)
    at = (int(rows[-1]), int(cols[-1]))
    with torch.no_grad():
        proj.weight[at] = 0.0
    return proj, at


@pytest.mark.parametrize("width", [1, 7, 8, 13, 64])
def test_bits_pack_and_unpack(width):
    keep = torch.rand(5, width, generator=torch.Generator().manual_seed(width)) < 0.5
    bits = pack_bits(keep)
    assert bits.dtype == torch.uint8 and bits.shape == (5, (width + 7) // 8)
    assert torch.equal(unpack_bits(bits, width), keep)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D's (in, out) weights
@pytest.mark.parametrize("config", [MagnitudeConfig(sparsity=0.5), WandaConfig(nm="2:4"),
                                    SparseGPTConfig(sparsity=0.5)])
def test_pruning_records_its_mask_in_the_state_dict(family, config):
    loaded = tiny_loaded(family)
    prune(loaded, config, data=CALIB, progress=False)
    for key, proj in _projections(loaded).items():
        assert torch.equal(proj.pruned(), proj.weight == 0), key
        assert 0.49 < float(proj.pruned().float().mean()) < 0.51, key
        assert MASK in proj.module.state_dict(), key


def test_gptq_keeps_the_recorded_mask_not_every_zero(monkeypatch):
    loaded = tiny_loaded()
    prune(loaded, WandaConfig(sparsity=0.5), data=CALIB, progress=False)
    proj, at = _zero_a_kept_weight(loaded)
    pruned = proj.pruned().clone()
    assert not pruned[at] and bool((proj.weight == 0)[at])
    seen: dict[int, torch.Tensor] = {}
    real = gptq_module.gptq_quantize

    def spy(weight, *args):
        seen[weight.data_ptr()] = args[-1].clone()
        return real(weight, *args)

    monkeypatch.setattr(gptq_module, "gptq_quantize", spy)
    quantize(loaded, GPTQConfig(bits=4, group_size=32), data=CALIB, progress=False)
    # the weight == 0 rule would have frozen the kept zero; the recorded mask does not
    assert torch.equal(seen[proj.weight.data_ptr()], pruned)
    # rounding adds zeros of its own, and the masks stay what the pruning recorded
    new_zeros = 0
    for p in _projections(loaded).values():
        assert (p.weight[p.pruned()] == 0).all()
        new_zeros += int(((p.weight == 0) & ~p.pruned()).sum())
    assert new_zeros > 0
    masks = record_masks(loaded.model, loaded.adapter)
    assert masks.count == sum(int(p.pruned().sum()) for p in _projections(loaded).values())


def test_gptq_without_keep_zeros_leaves_nothing_pruned():
    loaded = tiny_loaded()
    prune(loaded, MagnitudeConfig(sparsity=0.5), data=CALIB, progress=False)
    quantize(loaded, GPTQConfig(bits=4, group_size=32, keep_zeros=False), data=CALIB,
             progress=False)
    assert not record_masks(loaded.model, loaded.adapter)


def test_a_model_without_masks_falls_back_to_its_zeros():
    """A model read from disk holds no mask: its zeros are taken as its pruning, and the first
    method records them before rounding adds zeros."""
    loaded = tiny_loaded()
    proj = loaded.adapter.linears(loaded.adapter.layers[1])["mlp.up_proj"]
    with torch.no_grad():
        proj.weight[:, ::2] = 0.0
    assert not has_masks(loaded.model)
    assert record_masks(loaded.model, loaded.adapter).count == proj.weight.numel() // 2
    quantize(loaded, GPTQConfig(bits=4, group_size=32), data=CALIB, progress=False)
    assert (proj.weight[:, ::2] == 0).all()
    assert torch.equal(proj.pruned()[:, ::2], torch.ones_like(proj.weight[:, ::2],
                                                              dtype=torch.bool))
    assert int(proj.pruned().sum()) == proj.weight.numel() // 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masks_follow_width_surgery(family):
    from secateur.surgery.width import shrink_layer

    loaded = tiny_loaded(family)
    prune(loaded, MagnitudeConfig(sparsity=0.5), data=CALIB, progress=False)
    adapter = loaded.adapter
    shape = adapter.attention_shape()
    channels = adapter.mlp_output(adapter.layers[0]).in_features
    heads = torch.zeros(shape.num_kv_heads, dtype=torch.bool)
    heads[0] = True
    shrink_layer(adapter, 0, heads, torch.arange(channels) % 3 == 0)
    for key, proj in _projections(loaded).items():
        keep = kept_mask(proj.module)
        assert keep.shape == proj.module.weight.shape, key
        assert torch.equal(proj.pruned(), proj.weight == 0), key


def test_no_saved_model_holds_a_mask(tmp_path):
    from transformers import AutoModelForCausalLM

    from secateur.formats.compact import WEIGHTS as COMPACT
    from secateur.formats.compact import save_compact
    from secateur.formats.hf import save_model
    from secateur.formats.packed_save import WEIGHTS as PACKED
    from secateur.formats.packed_save import save_packed

    loaded = tiny_loaded()
    prune(loaded, WandaConfig(sparsity=0.5), data=CALIB, progress=False)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "dense")
    save_compact(loaded.model, loaded.tokenizer, tmp_path / "compact")
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not any(info.values()), info
    quantize(loaded, GPTQConfig(bits=4, group_size=32), data=CALIB, progress=False)
    save_packed(loaded.model, loaded.tokenizer, tmp_path / "packed")
    for file in (tmp_path / "dense" / "model.safetensors", tmp_path / "compact" / COMPACT,
                 tmp_path / "packed" / PACKED):
        with safe_open(str(file), "pt") as f:
            assert not [k for k in f.keys() if MASK in k], file  # noqa: SIM118


def test_a_checkpoint_may_keep_its_masks_beside_the_weights(tmp_path):
    """For the checkpoints secateur reads back itself (a recipe's steps): the masks in a file of
    their own, which transformers never opens, restored by the loaders."""
    from secateur.formats.hf import save_model
    from secateur.formats.loader import load
    from secateur.formats.masks import FILE
    from secateur.formats.packed_load import load_quantized
    from secateur.formats.packed_save import save_packed
    from secateur.models.mask import mask_keys

    loaded = tiny_loaded()
    prune(loaded, WandaConfig(sparsity=0.5), data=CALIB, progress=False)
    _zero_a_kept_weight(loaded)
    want = {k: v.clone() for k, v in loaded.model.state_dict().items()
            if k in mask_keys(loaded.model)}
    save_model(loaded.model, loaded.tokenizer, tmp_path / "plain")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "dense", own_state=True)
    assert not (tmp_path / "plain" / FILE).exists() and (tmp_path / "dense" / FILE).is_file()
    assert not has_masks(load(tmp_path / "plain").model)
    quantize(loaded, GPTQConfig(bits=4, group_size=32), data=CALIB, progress=False)
    save_packed(loaded.model, loaded.tokenizer, tmp_path / "packed", keep_dtype=None,
                own_state=True)
    for again in (load(tmp_path / "dense").model, load_quantized(tmp_path / "packed").model):
        got = again.state_dict()
        assert mask_keys(again) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v), k
