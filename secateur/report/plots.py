"""The report's plots, as PNG bytes; a plot whose data is malformed becomes a warning."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from secateur.report import frontier, recovery
from secateur.report.collect import Collected, why
from secateur.report.runs import nonzero_parameters, series, sparsity


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _perplexity(c: Collected, plt) -> Any:
    runs = [r for r in c.runs if r.data.get("perplexity") is not None]
    dense = [r for r in runs if r.data.get("method") == "dense"]
    points: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if r.data.get("method") == "dense" or sparsity(r.data) is None:
            continue
        points.setdefault(series(r.data), []).append((sparsity(r.data), r.data["perplexity"]))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, pts in sorted(points.items()):
        pts = sorted(pts)
        if dense:
            pts = [(0.0, dense[0].data["perplexity"]), *pts]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("achieved sparsity (share of zero weights in pruned matrices)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Perplexity vs sparsity")
    return fig


def _accuracy(c: Collected, plt) -> Any:
    acc = [(r, nonzero_parameters(r.data), r.data["zeroshot"]["average"]) for r in c.runs
           if r.data.get("zeroshot") and r.data["zeroshot"].get("average") is not None]
    acc = [a for a in acc if a[1] is not None]
    if not acc:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r, nonzero, avg in acc:
        ax.scatter(nonzero / 1e6, 100 * avg)
        ax.annotate(r.name, (nonzero / 1e6, 100 * avg), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("non-zero parameters (millions)")
    ax.set_ylabel("zero-shot average accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title("Accuracy vs parameters")
    return fig


def _speed(c: Collected, plt) -> Any:
    speed = [(f"{b.name}:{name}", m) for b in c.benches for name, m in b.data["models"].items()]
    if not speed:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, m in speed:
        x = m["nonzero"] / 1e6
        ax.scatter(x, m["decode"]["tokens_per_second"], marker="o", color="tab:blue")
        ax.scatter(x, m["decode"]["bound_tokens_per_second"], marker="_", s=200,
                   color="tab:red")
        ax.annotate(label.split(":", 1)[1][-28:], (x, m["decode"]["tokens_per_second"]),
                    fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("non-zero parameters (millions)")
    ax.set_ylabel("batch-1 decode tokens/s")
    ax.set_yscale("log")  # the bound can sit far above what a loaded machine reaches
    ax.scatter([], [], marker="o", color="tab:blue", label="measured")
    ax.scatter([], [], marker="_", s=200, color="tab:red", label="bandwidth bound")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("Decode speed vs parameters")
    return fig


def _layers(c: Collected, plt) -> Any:
    layered = [r for r in c.runs if r.data.get("layers")]
    if not layered:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in layered:
        xs, ys = [], []
        for layer in r.data["layers"]:
            mats = layer["matrices"].values()
            total = sum(m["numel"] for m in mats)
            xs.append(layer["index"])
            ys.append(sum(m["sparsity"] * m["numel"] for m in mats) / total if total else 0)
        ax.plot(xs, ys, marker=".", label=r.name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)  # uniform 0.5 otherwise gets an unreadable offset axis
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Per-layer sparsity")
    return fig


PLOTS: dict[str, tuple[str, Callable[[Collected, Any], Any]]] = {
    "perplexity_vs_sparsity": ("Perplexity vs sparsity per method", _perplexity),
    "accuracy_vs_parameters": ("Zero-shot accuracy vs non-zero parameters", _accuracy),
    "speed_vs_parameters": ("Decode speed vs non-zero parameters (red: memory bandwidth bound)",
                            _speed),
    "per_layer_sparsity": ("Per-layer sparsity", _layers),
}


def plots(c: Collected) -> dict[str, tuple[str, bytes]]:
    """{key: (caption, png)} for each plot the results have data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, tuple[str, bytes]] = {}
    for f in c.frontiers:
        key = "frontier_" + "".join(ch if ch.isalnum() else "_" for ch in f.name)
        try:
            out[key] = (f"Frontier of {f.data.get('model', f.name)} in llama.cpp: perplexity "
                        "vs MiB (and vs decode speed)", _png(frontier.figure(f.data, plt)))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            plt.close("all")
            c.warnings.append(f"plot of {f.name} left out: {type(err).__name__}: {why(err)}")
    if c.recoveries:
        try:
            fig = recovery.figure([r.data for r in c.recoveries], plt)
            if fig is not None:
                out["recovery_curve"] = ("Share of the pruning gap recovered against training "
                                         "tokens", _png(fig))
        except (KeyError, TypeError, ValueError) as err:
            plt.close("all")
            c.warnings.append(f"recovery curve left out: {type(err).__name__}: {why(err)}")
    for key, (caption, draw) in PLOTS.items():
        try:
            fig = draw(c, plt)
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
            plt.close("all")
            c.warnings.append(f"plot '{key}' left out: a result lacks a field or has a wrong "
                              f"one ({type(err).__name__}: {why(err)})")
            continue
        if fig is not None:
            out[key] = (caption, _png(fig))
    return out
