"""Which teacher layer each student layer is matched to, for the hidden-state loss.

A student that secateur pruned from the teacher still holds, unchanged, the norm weights of
every layer it kept: width pruning shrinks heads and channels but not the hidden size, depth
pruning removes layers or branches without touching the others. So the mapping is read off the
weights themselves, with no record needed: student layer i is the teacher layer whose norm
vectors are bit-identical to its own. When that does not single out one increasing map (a
student already trained, norms still at their initial ones, a model from elsewhere), layers
are matched uniformly: student layer i of S to teacher layer round((i + 1) * T / S) - 1, so
the last layers face each other. An explicit `layer_map` overrides both.
"""

from __future__ import annotations

from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import ModelAdapter


def _norm_vectors(layer: nn.Module, hidden: int) -> dict[str, object]:
    return {name: p.detach() for name, p in layer.named_parameters()
            if p.dim() == 1 and p.shape[0] == hidden}


def _same(a: dict, b: dict) -> bool:
    shared = [k for k in a if k in b]
    return bool(shared) and all(a[k].shape == b[k].shape and bool((a[k] == b[k]).all())
                                for k in shared)


def matched_by_weights(student: ModelAdapter, teacher: ModelAdapter) -> list[int] | None:
    hidden = student.model.get_input_embeddings().weight.shape[1]
    teacher_norms = [_norm_vectors(layer, hidden) for layer in teacher.layers]
    mapping: list[int] = []
    for layer in student.layers:
        mine = _norm_vectors(layer, hidden)
        hits = [j for j, theirs in enumerate(teacher_norms) if _same(mine, theirs)]
        if len(hits) != 1:
            return None
        mapping.append(hits[0])
    increasing = all(a < b for a, b in zip(mapping, mapping[1:], strict=False))
    return mapping if increasing else None


def uniform(student_layers: int, teacher_layers: int) -> list[int]:
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def layer_map(student: ModelAdapter, teacher: ModelAdapter,
              explicit: tuple[int, ...] | None = None) -> tuple[list[int], str]:
    """(teacher layer of each student layer, how it was found)."""
    s, t = student.num_layers, teacher.num_layers
    if explicit is not None:
        if len(explicit) != s or any(not 0 <= j < t for j in explicit):
            raise SecateurError(f"--layer-map needs {s} teacher layer indices in 0..{t - 1} "
                                f"(one per student layer), got {list(explicit)}")
        return list(explicit), "given"
    found = matched_by_weights(student, teacher)
    if found is not None:
        return found, "identical norm weights"
    return uniform(s, t), "uniform"
