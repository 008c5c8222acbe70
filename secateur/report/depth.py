"""Depth pruning output: removal order with the perplexity after each step, as a table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from secateur.io import write_atomic


def is_depth_summary(summary: dict[str, Any]) -> bool:
    return "removed" in summary and "surgery" in summary and "ratio" in summary


def has_curve(summary: dict[str, Any]) -> bool:
    """ShortGPT computes the perplexity after each removal only with --curve."""
    return isinstance(summary.get("calibration_perplexity"), list)


def print_depth(console: Console, result: dict[str, Any]) -> None:
    s = result["summary"]
    search = s["search"]
    if has_curve(s):
        curve = s["calibration_perplexity"]
        table = Table(title=f"{result['method']}: removals in order (calibration perplexity, "
                            f"{search['windows']} windows, {search['dtype']})")
        for col in ("step", "removed", "calibration ppl"):
            table.add_column(col)
        table.add_row("0", "(dense)", f"{curve[0]:.3f}")
        for step, (block, value) in enumerate(zip(s["removed"], curve[1:], strict=True), 1):
            table.add_row(str(step), block, f"{value:.3f}")
    else:
        table = Table(title=f"{result['method']}: removals in order")
        for col in ("step", "removed"):
            table.add_column(col)
        for step, block in enumerate(s["removed"], 1):
            table.add_row(str(step), block)
    console.print(table)
    if not has_curve(s):
        console.print("calibration perplexity after each removal: not computed (--curve adds "
                      "it)")
    ratio = s["ratio"]
    target = "" if ratio["target"] is None else f" (target {ratio['target']})"
    console.print(f"removed {ratio['removed_parameters']:,} of {ratio['total_parameters']:,} "
                  f"parameters: ratio {ratio['achieved']:.4f}{target}; {ratio['counts']}")
    if "statement" in ratio:
        console.print(ratio["statement"])
    console.print(f"search: {search['candidates']} candidates scored with "
                  f"{search['forward_pass_equivalents']} full-forward equivalents "
                  f"(naively {search['naive_forward_passes']} full forwards) in "
                  f"{search['seconds']:.1f} s; saved as {s['surgery']['config']} config")
    if search.get("shortlist"):
        console.print(f"shortlist: each step screened every candidate on a quarter of the "
                      f"windows and scored its {search['shortlist']} best on all of them")
    if result.get("removal_plot"):
        console.print(f"plot: {', '.join(result['removal_plot'])}")


def plot_removals(result: dict[str, Any], path: Path) -> Path:
    """Calibration perplexity after each removal (step 0 is the dense model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    curve = s["calibration_perplexity"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(curve)), 4.0))
    ax.plot(range(len(curve)), curve, marker="o")
    ax.set_xticks(range(len(curve)))
    ax.set_xticklabels(["dense", *s["removed"]], rotation=90, fontsize=7)
    ax.set_ylabel("calibration perplexity")
    ax.set_xlabel("removed (in order)")
    ratio = s["ratio"]["achieved"]
    ax.set_title(f"{result['model']}: {result['method']}, ratio {ratio:.3f} of all parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))  # the temp name keeps .png
    plt.close(fig)
    return path
