"""The recovery benchmark's table and token curve (bench/recovery.py's result files): how much
of the dense-to-pruned perplexity gap each recovery wins back, per student and token budget."""

from __future__ import annotations

from typing import Any

TEXTS = (("wiki", "wiki"), ("second", "second text"))
# settings keys files held when one file had one token budget (a run row now says its tokens)
BUDGET_KEYS = ("tokens_per_run", "tokens_asked", "steps")


def shared_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A result file's settings without its token budget: what runs must share to compare."""
    return {k: v for k, v in data.get("settings", {}).items() if k not in BUDGET_KEYS}


def is_recovery(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("runs"), list)
            and isinstance(data.get("students"), dict) and isinstance(data.get("dense"), dict)
            and "settings" in data)


def _zeroshot(row: dict[str, Any]) -> str:
    """Mean of the averaged metric, with the stderr of that mean (tasks independent)."""
    zs = row.get("zeroshot")
    if not zs or zs.get("average") is None:
        return "-"
    errs = [t.get(f"{t['average_metric']}_stderr") for t in zs["tasks"].values()]
    if any(e is None for e in errs):
        return f"{zs['average']:.3f}"
    err = sum(e * e for e in errs) ** 0.5 / len(errs)
    return f"{zs['average']:.3f} ± {err:.3f}"


def rows(data: dict[str, Any]) -> list[list[str]]:
    """Dense, each pruned student, then each recovery run: perplexities, share of the gap
    recovered, zero-shot, training seconds."""
    dense = data["dense"]
    out = [["dense", "-", "-", f"{dense['wiki_ppl']:.2f}", "-",
            f"{dense['second_ppl']:.2f}", "-", _zeroshot(dense), "-"]]
    for name, s in data["students"].items():
        out.append([name, "(pruned)", "0", f"{s['wiki_ppl']:.2f}", "0%",
                    f"{s['second_ppl']:.2f}", "0%", _zeroshot(s), "-"])
    for r in sorted(data["runs"], key=lambda r: (r["student"], r["tokens"], r["recovery"])):
        gaps = [r.get(f"{t}_gap_recovered") for t, _ in TEXTS]
        out.append([r["student"], r["recovery"], f"{r['tokens']:,}", f"{r['wiki_ppl']:.2f}",
                    "-" if gaps[0] is None else f"{100 * gaps[0]:.1f}%",
                    f"{r['second_ppl']:.2f}",
                    "-" if gaps[1] is None else f"{100 * gaps[1]:.1f}%",
                    _zeroshot(r), f"{r.get('train_seconds', 0):.0f}"])
    return out


COLUMNS = ["model", "recovery", "tokens", "wiki ppl", "wiki gap recovered", "second-text ppl",
           "second gap recovered", "zero-shot avg ± stderr", "train s"]


def curves(files: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """(student, recovery) -> [(tokens, wiki share, second share)] over every file, for the
    pairs measured at two budgets or more. Files of other settings are not mixed: the first
    file's settings (budget keys aside) decide which files join."""
    same = [f for f in files if shared_settings(f) == shared_settings(files[0])]
    points: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for f in same:
        for r in f["runs"]:
            shares = (r.get("wiki_gap_recovered"), r.get("second_gap_recovered"))
            if None not in shares:
                points.setdefault((r["student"], r["recovery"]), {})[r["tokens"]] = shares
    return {k: sorted((t, *v) for t, v in by.items()) for k, by in points.items()
            if len(by) >= 2}


def figure(files: list[dict[str, Any]], plt: Any) -> Any:
    """Share of the gap recovered against training tokens (log axis), wiki solid, second
    text dashed; None when no pair was measured at two budgets."""
    lines = curves(files)
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (student, recovery), pts in lines.items():
        tokens = [p[0] for p in pts]
        line, = ax.plot(tokens, [100 * p[1] for p in pts], marker="o",
                        label=f"{student} {recovery} (wiki)")
        ax.plot(tokens, [100 * p[2] for p in pts], marker="s", linestyle="--",
                color=line.get_color(), label=f"{student} {recovery} (second text)")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("share of the dense-to-pruned gap recovered (%)")
    ax.axhline(100, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Recovery against training tokens")
    fig.tight_layout()
    return fig
