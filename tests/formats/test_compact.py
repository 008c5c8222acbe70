import json

import pytest
import torch

from secateur.api import CalibrationConfig, prune
from secateur.formats.compact import INDEX, WEIGHTS, pack, save_compact, unpack
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.io import dir_bytes
from secateur.quant.state import weights_state_dict
from tests.tiny_models import make_step


def test_pack_unpack_round_trip_odd_width():
    w = torch.randn(5, 13)
    w[w.abs() < 0.7] = 0
    bits, values = pack(w)
    assert bits.shape == (5, 2) and values.numel() == int((w != 0).sum())
    assert torch.equal(unpack(bits, values, [5, 13]), w)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compact_checkpoint_is_smaller_and_reloads_identically(tiny_dir, tmp_path, family):
    loaded = load(tiny_dir(family))
    prune(loaded, make_step(method="magnitude", nm="2:4"),
          CalibrationConfig("c4-sample", 1, 32, 0), progress=False)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "dense")
    save_compact(loaded.model, loaded.tokenizer, tmp_path / "compact", nm="2:4")
    index = json.loads((tmp_path / "compact" / INDEX).read_text())
    assert index["format"] == "secateur-bitmask-v1" and index["compressed"]
    dense_w = (tmp_path / "dense" / "model.safetensors").stat().st_size
    compact_w = (tmp_path / "compact" / WEIGHTS).stat().st_size
    assert compact_w < dense_w
    assert dir_bytes(tmp_path / "compact") < dir_bytes(tmp_path / "dense")
    again = load(tmp_path / "compact")
    # the in-memory model also holds its pruning masks, which no saved model does
    for (name, a), b in zip(weights_state_dict(loaded.model).items(),
                            again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, again.model(ids).logits)
