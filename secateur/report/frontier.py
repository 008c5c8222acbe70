"""The frontier's verdicts, table and plots: which secateur GGUF points lie beyond llama.cpp's
own ladder of the same model (`secateur frontier`'s frontier.json)."""

from __future__ import annotations

from typing import Any

# llama.cpp's point may be this much larger and still count as "no more bytes" (the issue's
# test allows secateur 2% more bytes)
BYTES_SLACK = 0.02


def is_frontier(data: Any) -> bool:
    # "llama_cpp" held the runtime's version in frontier files before "runtime" did
    return (isinstance(data, dict) and isinstance(data.get("points"), dict)
            and "settings" in data and ("llama_cpp" in data
                                        or str(data.get("runtime", "")).startswith("llama-cpp")))


def decode_tok_s(p: dict[str, Any]) -> float | None:
    """A point's median decode tokens/s in llama.cpp, if the frontier timed it."""
    return (p.get("speed") or {}).get("decode_tokens_per_second", {}).get("median")


def winners(result: dict[str, Any], text: str = "wiki") -> list[str]:
    """secateur points with lower perplexity than every llama.cpp point of no more bytes
    (llama.cpp given 2% slack on bytes): beyond its ladder."""
    pts = result["points"]
    theirs = [p for n, p in pts.items() if n.startswith("llama.cpp")]
    out = []
    for name, p in pts.items():
        if not name.startswith("secateur"):
            continue
        rivals = [q for q in theirs if q["mib"] <= p["mib"] * (1 + BYTES_SLACK)]
        if rivals and all(p[text] < q[text] for q in rivals):
            out.append(name)
    return out


def dominated(result: dict[str, Any], name: str, text: str = "wiki") -> list[str]:
    """The llama.cpp points that secateur point `name` dominates: no more bytes (2% slack) and
    lower perplexity, or faster decode at no worse perplexity (when speed was measured)."""
    p = result["points"][name]
    out = []
    for other, q in result["points"].items():
        if not other.startswith("llama.cpp"):
            continue
        smaller = p["mib"] <= q["mib"] * (1 + BYTES_SLACK) and p[text] < q[text]
        fast, their_fast = decode_tok_s(p), decode_tok_s(q)
        faster = fast is not None and their_fast is not None and fast > their_fast \
            and p[text] <= q[text]
        if smaller or faster:
            out.append(other)
    return out


def rows(result: dict[str, Any]) -> list[list[str]]:
    """One table row per point: name, MiB, each text's perplexity, decode tok/s, verdict."""
    best = set(winners(result))
    out = []
    for name, p in sorted(result["points"].items(), key=lambda kv: -kv[1]["mib"]):
        tok = decode_tok_s(p)
        verdict = ""
        if name.startswith("secateur"):
            beaten = [n.removeprefix("llama.cpp ") for n in dominated(result, name)]
            verdict = ("beyond the ladder" if name in best else "") + (
                f"{'; ' if name in best else ''}dominates {', '.join(beaten)}" if beaten else "")
        out.append([name, f"{p['mib']:.1f}",
                    *[f"{p[t]:.3f}" if t in p else "-" for t in texts(result)],
                    "-" if tok is None else f"{tok:.1f}", verdict or "-"])
    return out


def texts(result: dict[str, Any]) -> list[str]:
    """The texts every point was scored on, in the file's order."""
    pts = list(result["points"].values())
    return [t for t in ("wiki", "tiny-stories") if pts and all(t in p for p in pts)]


def figure(result: dict[str, Any], plt: Any) -> Any:
    """Perplexity against MiB (and against decode tok/s where every point was timed); secateur
    red, llama.cpp blue (squares: with an imatrix), stars beyond the ladder."""
    pts = {n: p for n, p in result["points"].items() if n != "f32"}
    speed = bool(pts) and all(decode_tok_s(p) is not None for p in pts.values())
    fig, axes = plt.subplots(1, 2 if speed else 1, figsize=(12 if speed else 7, 5),
                             squeeze=False)
    best = set(winners(result))
    panels = [(axes[0][0], lambda p: p["mib"], "MiB on disk")]
    if speed:
        panels.append((axes[0][1], decode_tok_s, "decode tokens/s (llama.cpp)"))
    for ax, x_of, xlabel in panels:
        for name, p in pts.items():
            ours = name.startswith("secateur")
            marker = "*" if name in best else ("o" if ours else ("s" if "imatrix" in name
                                                                  else "^"))
            color = ("tab:green" if "pruned_from" in p else "tab:red") if ours else "tab:blue"
            ax.scatter(x_of(p), p["wiki"], marker=marker, s=120 if name in best else 40,
                       color=color)
            ax.annotate(name.replace("llama.cpp ", "").replace("secateur ", "S "),
                        (x_of(p), p["wiki"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("wiki perplexity (llama.cpp)")
        ax.grid(alpha=0.3)
    model = result.get("model") or (result.get("settings") or {}).get("model", "model")
    axes[0][0].set_title(f"{model}: secateur (red; green: pruned first; * beats every\n"
                         "llama.cpp point of no more bytes) vs llama.cpp (blue; square: "
                         "imatrix)", fontsize=9)
    fig.tight_layout()
    return fig
