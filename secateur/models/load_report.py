"""Naming what went wrong when transformers refuses a checkpoint whose files are intact.

transformers 5 logs its load report (we mute that log) and raises only "You set
`ignore_mismatched_sizes` to `False`", so the shapes that differ are read back from the
`LoadStateDictInfo` the raising frame holds."""

from __future__ import annotations


def mismatched_shapes(err: BaseException) -> list[tuple[str, tuple, tuple]]:
    """(key, checkpoint shape, model shape) of each tensor transformers found mismatched, from
    the traceback of the error it raised; empty when the error is not that."""
    tb = err.__traceback__
    while tb is not None:
        info = tb.tb_frame.f_locals.get("loading_info")
        keys = getattr(info, "mismatched_keys", None)
        if keys:
            return sorted((str(k), tuple(c), tuple(m)) for k, c, m in keys)
        tb = tb.tb_next
    return []


def describe_mismatch(shown: str, mismatched: list[tuple[str, tuple, tuple]]) -> str:
    """One line: how many tensors differ, the first of them, and what that means."""
    key, ckpt, model = mismatched[0]
    kinds = sorted({k.rsplit(".", 1)[-1] for k, _, _ in mismatched})
    return (f"cannot load '{shown}': {len(mismatched)} tensors of the checkpoint have other "
            f"shapes than the model its config.json describes ({', '.join(kinds)}; e.g. {key}: "
            f"checkpoint {list(ckpt)} vs model {list(model)}); the files are whole but do not fit "
            "that model: check config.json (and its quantization_config) against what wrote "
            "the weights")
