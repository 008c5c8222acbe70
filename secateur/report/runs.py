"""Reading a run's result dict: what it targeted, achieved and counted."""

from __future__ import annotations

from typing import Any


def target(d: dict[str, Any]) -> str:
    o = d.get("options") or {}
    if d.get("method") == "dense":
        return "dense"
    for key, fmt in (("nm", "{}"), ("sparsity", "{:.2f}"), ("ratio", "ratio {}"),
                     ("blocks", "{} blocks"), ("layers", "{} layers")):
        if o.get(key) is not None:
            return fmt.format(o[key])
    return "-"


def parameters(d: dict[str, Any]) -> tuple[int | None, int | None]:
    """(parameters, non-zero) of the model the result describes."""
    p = d.get("parameters")
    if isinstance(p, dict):
        pruned = p.get("pruned") or {}
        return pruned.get("parameters"), pruned.get("nonzero")
    if isinstance(p, int):
        return p, p
    return None, None


def nonzero_parameters(d: dict[str, Any]) -> int | None:
    return parameters(d)[1]


def series(d: dict[str, Any]) -> str:
    o = d.get("options") or {}
    name = d.get("method", "?")
    if o.get("nm"):
        name += f" {o['nm']}"
    if o.get("owl"):
        name += " +OWL"
    return name


def sparsity(d: dict[str, Any]) -> float | None:
    if d.get("method") == "dense":
        return 0.0
    return d.get("sparsity")
