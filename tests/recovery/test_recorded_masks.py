"""Recovery reads the masks the pruning recorded: pruned weights stay exactly zero and the masks
come out of LoRA's merge and of full fine-tuning unchanged, while a kept weight that happens to
be exactly 0 trains (the old `weight == 0` rule froze it)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from secateur.api import CalibrationConfig, prune
from secateur.methods import WandaConfig
from secateur.models import adapter_for
from secateur.models.loading import Loaded
from secateur.models.mask import kept_mask
from secateur.recovery.distill import DistillConfig, distill
from secateur.recovery.lora import LoRAConfig, train_lora
from tests.tiny_models import byte_tokenizer, tiny_model

CALIB = CalibrationConfig("c4-sample", 4, 64, 0)


@pytest.fixture
def text(tmp_path):
    from secateur.data.sources import load_text

    path = tmp_path / "text.txt"
    path.write_text(load_text("wiki").joined()[:20000])
    return str(path)


def _pruned() -> tuple[Loaded, Loaded]:
    """A dense tiny llama and a Wanda-pruned copy of it in which one kept weight of every
    projection is exactly 0."""
    model = tiny_model("llama")
    dense = Loaded(model, byte_tokenizer(), adapter_for(model), "llama", "")
    copied = copy.deepcopy(model)
    student = Loaded(copied, dense.tokenizer, adapter_for(copied), "llama", "")
    prune(student, WandaConfig(sparsity=0.5), data=CALIB, progress=False)
    with torch.no_grad():
        for layer in student.adapter.layers:
            for proj in student.adapter.linears(layer).values():
                rows, cols = (~proj.pruned()).nonzero(as_tuple=True)
                proj.weight[int(rows[0]), int(cols[0])] = 0.0
    return dense, student


def _state(loaded: Loaded) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per projection: its mask as recorded and its weight."""
    return {f"{i}.{name}": (kept_mask(p.module).clone(), p.weight.detach().clone())
            for i, layer in enumerate(loaded.adapter.layers)
            for name, p in loaded.adapter.linears(layer).items()}


def _check(before, after) -> None:
    trained_zeros = 0
    for key, (keep, weight) in before.items():
        keep_after, weight_after = after[key]
        assert torch.equal(keep_after, keep), key  # the mask itself is untouched
        assert (weight_after[~keep] == 0).all(), key  # pruned: still exactly zero
        kept_zero = keep & (weight == 0)
        trained_zeros += int((weight_after[kept_zero] != 0).sum())
    # the kept weights that were exactly 0 trained like the others
    assert trained_zeros == sum(int((k & (w == 0)).sum()) for k, w in before.values())


def test_lora_merge_keeps_the_recorded_masks_exactly(text):
    _, student = _pruned()
    before = _state(student)
    run = train_lora(student, LoRAConfig(data=text, steps=3, seqlen=32, lr=5e-3, rank=4,
                                         warmup_steps=1, heldout_windows=2, seed=0),
                     progress=False)
    assert run.masks["zeros_kept"] == sum(int((~k).sum()) for k, _ in before.values())
    _check(before, _state(student))


def test_full_fine_tuning_keeps_the_recorded_masks_exactly(text):
    teacher, student = _pruned()
    before = _state(student)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the student is as large as its teacher
        distill(student, teacher, DistillConfig(data=text, steps=3, seqlen=32, lr=3e-3,
                                                train="full", warmup_steps=1,
                                                heldout_windows=2, save_every=2, seed=0),
                progress=False)
    _check(before, _state(student))
