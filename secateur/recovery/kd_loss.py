"""Distillation losses between next-token distributions, full or top-k with its remaining mass.

Every divergence works on log-probabilities over the last dimension, so the same code scores
the full vocabulary and a cached top-k target: a top-k target is the k kept tokens plus one
bucket holding the rest of the mass, and the student's distribution is folded into the same
k + 1 buckets. That bucketed KL is exact for the bucketed distributions and never larger than
the full one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]

# exp(-1e4) is 0 in every float type: a clamped -inf keeps 0 * log 0 terms at 0 with finite
# gradients (an unclamped -inf turns them into NaN).
_FLOOR = -1e4


@dataclass
class TeacherTargets:
    """The teacher's next-token log-probabilities at the distillation temperature.

    Full: `logp` is (..., vocab) and `index` is None. Top-k: `logp` is (..., k + 1), the k
    largest log-probabilities followed by the log of the remaining mass, `index` (..., k)."""

    logp: torch.Tensor
    index: torch.Tensor | None = None

    def narrow(self, start: int, length: int) -> TeacherTargets:
        """Positions [start, start + length) of dimension 1 (the sequence)."""
        index = None if self.index is None else self.index.narrow(1, start, length)
        return TeacherTargets(self.logp.narrow(1, start, length), index)


def fold(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., vocab) log-probabilities -> (..., k + 1): tokens `index`, then all the others.

    The rest is summed from the other tokens themselves, not taken as 1 - kept, which would be
    rounding noise when the kept mass is near 1."""
    kept = logp.gather(-1, index)
    rest = logp.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([kept, rest.clamp(min=_FLOOR)], dim=-1)


def teacher_targets(logits: torch.Tensor, temperature: float,
                    topk: int | None = None) -> TeacherTargets:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    if topk is None:
        return TeacherTargets(logp)
    index = logp.topk(topk, dim=-1).indices
    return TeacherTargets(fold(logp, index), index)


def student_logp(logits: torch.Tensor, temperature: float,
                 index: torch.Tensor | None) -> torch.Tensor:
    """The student's log-probabilities, folded into the teacher's buckets when top-k."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp if index is None else fold(logp, index)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim."""
    logp, logq = logp.clamp(min=_FLOOR), logq.clamp(min=_FLOOR)
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(teacher_logp: torch.Tensor, student_logp_: torch.Tensor,
               kind: Divergence) -> torch.Tensor:
    """Per-position divergence between teacher and student distributions (last dim)."""
    if kind == "forward_kl":
        return _kl(teacher_logp, student_logp_)
    if kind == "reverse_kl":
        return _kl(student_logp_, teacher_logp)
    if kind == "jsd":
        both = torch.stack([teacher_logp.clamp(min=_FLOOR), student_logp_.clamp(min=_FLOOR)])
        mixture = torch.logsumexp(both, dim=0) - math.log(2.0)
        return 0.5 * _kl(teacher_logp, mixture) + 0.5 * _kl(student_logp_, mixture)
    raise ValueError(f"unknown divergence '{kind}'")


def kd_loss(student_logits: torch.Tensor, teacher: TeacherTargets, kind: Divergence,
            temperature: float) -> torch.Tensor:
    """Mean divergence over positions, times T^2 so gradients keep their size as T changes
    (Hinton et al.); `student_logits` and the targets cover the same positions."""
    logq = student_logp(student_logits, temperature, teacher.index)
    return divergence(teacher.logp, logq, kind).mean() * temperature**2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of positions start .. seqlen - 2."""
    logits = logits[:, start:-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, start + 1:].reshape(-1))
