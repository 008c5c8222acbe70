"""The fused head + loss computes what the unfused one does: the same loss, the same gradients
for the hidden states and the head (tied or not, with a bias), and the same training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import SecateurError
from secateur.formats.loader import load
from secateur.recovery.distill import distill
from secateur.recovery.fused_head import fused_head_loss
from secateur.recovery.kd_loss import divergence, student_logp, teacher_targets
from tests.recovery.test_distill import _config, _depth_student, teacher_dir, text  # noqa: F401


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("topk", [None, 6])
def test_fused_loss_and_gradients_match_the_full_logits(bias, topk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    head = nn.Linear(16, 40, bias=bias)
    labels = torch.randint(0, 40, (18,), generator=gen)
    targets = teacher_targets(3 * torch.randn(18, 40, generator=gen), 2.0, topk)
    index = targets.index

    def loss_of(logits, a, b):
        logq = student_logp(logits, 2.0, None if index is None else index[a:b])
        kd = divergence(targets.logp[a:b], logq, "jsd").sum() * 4.0 / 18
        return kd + 0.5 * F.cross_entropy(logits, labels[a:b], reduction="sum") / 18

    plain = loss_of(head(hidden.reshape(18, 16)), 0, 18)
    plain.backward()
    expected = [hidden.grad.clone(), head.weight.grad.clone()] + \
        ([head.bias.grad.clone()] if bias else [])
    hidden.grad, head.weight.grad = None, None
    if bias:
        head.bias.grad = None
    fused = fused_head_loss(hidden, head, loss_of, rows=4)  # 5 chunks, the last one short
    fused.backward()
    got = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for want, have in zip(expected, got, strict=True):
        assert torch.allclose(want, have, atol=1e-6), (want - have).abs().max()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kw", [dict(train="full", ce_weight=0.5),
                                dict(train="lora", loss="jsd", teacher_cache="topk", topk=8)])
def test_fused_training_takes_the_same_steps(teacher_dir, text, kw):  # noqa: F811
    """The head is tied to the embeddings in the tiny llama: both paths must update it alike."""
    teacher = load(teacher_dir)
    runs = {}
    for fused in (False, True):
        student = _depth_student(teacher)
        run = distill(student, teacher, _config(text, steps=3, fused_loss=fused, **kw),
                      progress=False)
        runs[fused] = (run, student.model.state_dict())
    plain, fused = runs[False][0], runs[True][0]
    assert plain.losses == pytest.approx(fused.losses, rel=1e-5)
    assert set(plain.parts) == set(fused.parts)
    for key, value in runs[False][1].items():
        assert torch.allclose(value, runs[True][1][key], atol=1e-5), key


class _ScaledHead(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_head_that_is_not_a_plain_linear_map_is_refused(teacher_dir, text):  # noqa: F811
    teacher = load(teacher_dir)
    student = _depth_student(teacher)
    old = student.model.lm_head
    scaled = _ScaledHead(old.in_features, old.out_features, bias=False)
    scaled.weight = old.weight
    student.model.lm_head = scaled
    with pytest.raises(SecateurError, match="set fused_loss false"):
        distill(student, teacher, _config(text, steps=1, fused_loss=True), progress=False)
