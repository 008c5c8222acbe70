"""Zero-shot accuracies with lm-eval's standard errors, and whether a difference exceeds them.

lm-eval reports each task's accuracy with the standard error of a mean over its documents.
With `--limit 10` that error is about 15 points, so two runs' accuracies are compared against
sqrt(se_a^2 + se_b^2): a difference within it is marked `~`, not read as an effect. (Both
runs score the same documents, so this unpaired error is the conservative one.)
"""

from __future__ import annotations

import math
from typing import Any

WITHIN = "~"
NOTE = (f"{WITHIN} = within one standard error of the dense model's (sqrt(se^2 + se_dense^2), "
        "lm-eval's stderr): not a measured difference")


def stderr(task: dict[str, Any], metric: str) -> float | None:
    value = task.get(f"{metric}_stderr")
    return value if isinstance(value, (int, float)) else None


def average_stderr(zs: dict[str, Any], key: str = "average") -> float | None:
    """Standard error of the mean over tasks (tasks are independent samples): sqrt(sum se^2)/k.

    `key` is "average" (each task's `average_metric`) or "average_acc" (acc everywhere)."""
    errors = []
    for task in zs.get("tasks", {}).values():
        metric = task["average_metric"] if key == "average" else "acc"
        if task.get(metric) is None:
            continue
        se = stderr(task, metric)
        if se is None:
            return None
        errors.append(se)
    return math.sqrt(sum(se * se for se in errors)) / len(errors) if errors else None


def within(a: float | None, se_a: float | None, b: float | None, se_b: float | None
           ) -> bool | None:
    """Whether |a - b| is within their combined standard error; None when one is unknown."""
    if None in (a, se_a, b, se_b):
        return None
    return abs(a - b) <= math.sqrt(se_a**2 + se_b**2)


def fmt(value: float | None, se: float | None, mark: bool | None = None) -> str:
    """`45.00 ±4.97` in percent, `~` appended when within the dense model's error."""
    if value is None:
        return "-"
    text = f"{100 * value:.2f}" + ("" if se is None else f" ±{100 * se:.2f}")
    return text + (WITHIN if mark else "")
