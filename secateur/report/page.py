"""`secateur report RUN...`: one HTML page (plots embedded) and a Markdown twin.

Reads the JSON that `prune --json`, `eval --json`, `bench --json` and `sweep` write. Every
number in a table carries a protocol tag [P1], [Z1], [B1] that the Protocols section spells
out (dataset, seqlen, windows, BOS, dtype, harness, limit, threads, ...), because numbers
measured under different protocols are not comparable.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError

SKIP = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "sweep.json", "model.safetensors.index.json"}


@dataclass
class Run:
    """One prune/eval result (a sweep cell is one) under a display name."""

    name: str
    data: dict[str, Any]


@dataclass
class Collected:
    runs: list[Run] = field(default_factory=list)
    benches: list[Run] = field(default_factory=list)


def _kind(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if "speedup_vs_baseline" in data and "models" in data:
        return "bench"
    if "perplexity" in data or "zeroshot" in data or "options" in data:
        return "run"
    return None


def _candidates(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SecateurError(f"'{path}' does not exist: give run directories or result .json "
                            "files")
    files = sorted((path / "results").glob("*.json")) + sorted(path.glob("*.json"))
    return [f for f in files if f.name not in SKIP]


def collect(paths: list[Path]) -> Collected:
    if not paths:
        raise SecateurError("give at least one run directory or result .json file")
    out = Collected()
    for path in map(Path, paths):
        found = 0
        for f in _candidates(path):
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as err:
                if path.is_file():
                    raise SecateurError(f"{f} is not readable JSON ({err})") from None
                continue
            kind = _kind(data)
            if kind is None:
                continue
            found += 1
            label = data.get("cell") or (f.stem if path.is_dir() else f.stem)
            name = f"{path.name}/{label}" if path.is_dir() and len(paths) > 1 else label
            (out.benches if kind == "bench" else out.runs).append(Run(name, data))
        if not found:
            raise SecateurError(
                f"no results in '{path}': expected results/*.json (from `secateur sweep`) or "
                "the .json written by `secateur prune/eval/bench --json`")
    return out


class Protocols:
    """Assigns a short tag to each distinct protocol dict, per family (P, Z, B)."""

    def __init__(self) -> None:
        self.tags: dict[str, dict[str, Any]] = {}
        self._seen: dict[tuple[str, str], str] = {}

    def tag(self, family: str, protocol: dict[str, Any] | None) -> str:
        if not protocol:
            return ""
        key = (family, json.dumps(protocol, sort_keys=True, default=str))
        if key not in self._seen:
            n = sum(1 for f, _ in self._seen if f == family) + 1
            self._seen[key] = f"{family}{n}"
            self.tags[self._seen[key]] = protocol
        return self._seen[key]


def _f(x: float | None, digits: int = 3, tag: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" + (f" [{tag}]" if tag else "")


def _pct(x: float | None, tag: str = "") -> str:
    return "-" if x is None else f"{100 * x:.2f}" + (f" [{tag}]" if tag else "")


def _target(d: dict[str, Any]) -> str:
    o = d.get("options") or {}
    if d.get("method") == "dense":
        return "dense"
    for key, fmt in (("nm", "{}"), ("sparsity", "{:.2f}"), ("ratio", "ratio {}"),
                     ("blocks", "{} blocks"), ("layers", "{} layers")):
        if o.get(key) is not None:
            return fmt.format(o[key])
    return "-"


def _params(d: dict[str, Any]) -> tuple[int | None, int | None]:
    p = d.get("parameters")
    if isinstance(p, dict):
        pruned = p.get("pruned") or {}
        return pruned.get("parameters"), pruned.get("nonzero")
    if isinstance(p, int):
        return p, p
    return None, None


def _series(d: dict[str, Any]) -> str:
    o = d.get("options") or {}
    name = d.get("method", "?")
    if o.get("nm"):
        name += f" {o['nm']}"
    if o.get("owl"):
        name += " +OWL"
    return name


def _sparsity(d: dict[str, Any]) -> float | None:
    if d.get("method") == "dense":
        return 0.0
    return d.get("sparsity")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plots(c: Collected) -> dict[str, tuple[str, bytes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, tuple[str, bytes]] = {}
    runs = [r for r in c.runs if r.data.get("perplexity") is not None]
    dense = [r for r in runs if r.data.get("method") == "dense"]
    series: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        if r.data.get("method") == "dense" or _sparsity(r.data) is None:
            continue
        series.setdefault(_series(r.data), []).append((_sparsity(r.data), r.data["perplexity"]))
    if series:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, pts in sorted(series.items()):
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
        plots["perplexity_vs_sparsity"] = ("Perplexity vs sparsity per method", _png(fig))
    acc = [(r, _params(r.data)[1], r.data["zeroshot"]["average"]) for r in c.runs
           if r.data.get("zeroshot") and r.data["zeroshot"].get("average") is not None]
    if acc:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for r, nonzero, avg in acc:
            ax.scatter(nonzero / 1e6, 100 * avg)
            ax.annotate(r.name, (nonzero / 1e6, 100 * avg), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("non-zero parameters (millions)")
        ax.set_ylabel("zero-shot average accuracy (%)")
        ax.grid(alpha=0.3)
        ax.set_title("Accuracy vs parameters")
        plots["accuracy_vs_parameters"] = ("Zero-shot accuracy vs non-zero parameters",
                                           _png(fig))
    speed = [(f"{b.name}:{name}", m) for b in c.benches for name, m in b.data["models"].items()]
    if speed:
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
        plots["speed_vs_parameters"] = ("Decode speed vs non-zero parameters (red: memory "
                                        "bandwidth bound)", _png(fig))
    layered = [r for r in c.runs if r.data.get("layers")]
    if layered:
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
        plots["per_layer_sparsity"] = ("Per-layer sparsity", _png(fig))
    return plots


def _tables(c: Collected, protos: Protocols) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = []
    rows = []
    for r in c.runs:
        d = r.data
        total, nonzero = _params(d)
        ptag = protos.tag("P", d.get("protocol"))
        zs = d.get("zeroshot") or {}
        ztag = protos.tag("Z", zs.get("protocol"))
        cal = d.get("calibration") or {}
        rows.append([
            r.name, d.get("method", "-"), _target(d), _f(_sparsity(d), 4),
            "-" if total is None else f"{total:,}", "-" if nonzero is None else f"{nonzero:,}",
            _f(d.get("perplexity"), 3, ptag), _f(d.get("dense_perplexity"), 3, ptag),
            _pct(zs.get("average"), ztag),
            "-" if not d.get("bytes_on_disk") else f"{d['bytes_on_disk'] / 2**20:.1f}",
            "-" if not cal else f"{cal.get('source')} {cal.get('nsamples')}x{cal.get('seqlen')}"
                                f" seed {cal.get('seed')}",
        ])
    if rows:
        tables.append(("Runs", ["run", "method", "target", "sparsity", "parameters",
                                "non-zero", "perplexity", "dense ppl", "zero-shot avg %",
                                "MiB on disk", "calibration"], rows))
    zs_runs = [r for r in c.runs if r.data.get("zeroshot")]
    if zs_runs:
        names = list(dict.fromkeys(t for r in zs_runs for t in r.data["zeroshot"]["tasks"]))
        zrows = []
        for r in zs_runs:
            z = r.data["zeroshot"]
            tag = protos.tag("Z", z["protocol"])
            row = [r.name]
            for t in names:
                v = z["tasks"].get(t)
                row.append("-" if v is None else
                           f"{_pct(v['acc'])} / {_pct(v['acc_norm'])}"
                           + ("*" if v["average_metric"] == "acc_norm" else ""))
            row += [_pct(z["average"], tag), _pct(z["average_acc"], tag)]
            zrows.append(row)
        tables.append(("Zero-shot accuracy (acc / acc_norm %, * = acc_norm used in the "
                       "average)", ["run", *names, "average", "mean acc"], zrows))
    brows = []
    for b in c.benches:
        tag = protos.tag("B", {**b.data["protocol"],
                               "memory_bandwidth_gbs": b.data["memory_bandwidth_gbs"]})
        lengths = b.data["protocol"]["prompt_lengths"]
        for name, m in b.data["models"].items():
            sp = b.data["speedup_vs_baseline"].get(name, {})
            dec = m["decode"]
            brows.append([
                name, m["dtype"], f"{m['parameters']:,}", f"{m['nonzero']:,}",
                "-" if m["bytes_on_disk"] is None else f"{m['bytes_on_disk'] / 2**20:.1f}",
                ", ".join(f"{m['prefill'][str(n)]['tokens_per_second']:.0f}" for n in lengths)
                + f" [{tag}]",
                _f(dec["tokens_per_second"], 2, tag), _f(dec["bound_tokens_per_second"], 2, tag),
                f"{100 * dec['fraction_of_bound']:.0f}%",
                "baseline" if not sp else
                f"{sp['decode']['median']:.2f}x [{sp['decode']['min']:.2f}-"
                f"{sp['decode']['max']:.2f}]",
                "-" if m["peak_working_mib"] is None else f"{m['peak_working_mib']:.0f}",
            ])
    if brows:
        tables.append(("Speed and memory", ["model", "dtype", "parameters", "non-zero",
                                            "MiB on disk", "prefill tok/s (per length)",
                                            "decode tok/s", "decode bound tok/s", "of bound",
                                            "decode speedup (median [min-max])",
                                            "peak working MiB"], brows))
    depth = [r for r in c.runs if (r.data.get("summary") or {}).get("removed")]
    if depth:
        tables.append(("Removed blocks (in removal order)", ["run", "removed"],
                       [[r.name, ", ".join(map(str, r.data["summary"]["removed"]))]
                        for r in depth]))
    return tables


def _protocol_text(tag: str, p: dict[str, Any]) -> str:
    if tag.startswith("P"):
        return (f"perplexity on {p.get('dataset')} ({p.get('origin')}), split {p.get('split')}, "
                f"joined with {p.get('join')!r}, seqlen {p.get('seqlen')}, stride "
                f"{p.get('stride')}, {p.get('windows')}/{p.get('windows_available')} windows, "
                f"{p.get('tokens_scored')} tokens scored, BOS {p.get('bos')}, dtype "
                f"{p.get('dtype')}, protocol {p.get('name')}; {_versions(p)}")
    if tag.startswith("Z"):
        limit = "all documents" if p.get("limit") is None else f"first {p['limit']} documents"
        return (f"zero-shot with {p.get('harness')}, {p.get('num_fewshot')}-shot, {limit} per "
                f"task, task data {p.get('data')}, batch size {p.get('batch_size')}, dtype "
                f"{p.get('dtype')}; average = {p.get('average')}; {_versions(p)}")
    return (f"benchmark: {p.get('threads_used')} thread(s), {p.get('repeats')} rounds after "
            f"{p.get('warmup')} warm-up, {p.get('order')}; prefill: {p.get('prefill')}, "
            f"lengths {p.get('prompt_lengths')}; decode: {p.get('decode')}; speedup: "
            f"{p.get('speedup')}; memory bandwidth {p.get('memory_bandwidth_gbs', 0):.1f} GB/s "
            f"({p.get('bandwidth')}); bound: {p.get('decode_bound')}; peak working memory: "
            f"{p.get('peak_working_mib')}; {_versions(p)}")


def _versions(p: dict[str, Any]) -> str:
    v = p.get("versions") or {}
    return ", ".join(f"{k} {x}" for k, x in v.items())


def build_report(paths: list[Path], out: Path, title: str = "secateur report") -> list[Path]:
    """Write out/report.html (self-contained) and out/report.md with out/plots/*.png."""
    collected = collect(paths)
    protos = Protocols()
    tables = _tables(collected, protos)
    plots = _plots(collected)
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for key, (_, png) in plots.items():
        (out / "plots" / f"{key}.png").write_bytes(png)
    sources = ", ".join(map(str, paths))
    md = [f"# {title}", "", f"From: {sources}", ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
         "</title><style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
         "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
         "td:first-child,th{text-align:left}th{background:#eee}"
         "img{max-width:48%;margin:4px;border:1px solid #ddd}</style></head><body>",
         f"<h1>{html.escape(title)}</h1><p>From: {html.escape(sources)}</p>"]
    for name, cols, rows in tables:
        md += [f"## {name}", "", "| " + " | ".join(cols) + " |",
               "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(row) + " |" for row in rows]
        md.append("")
        h.append(f"<h2>{html.escape(name)}</h2><table><tr>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>"
              for row in rows]
        h.append("</table>")
    if plots:
        md += ["## Plots", ""]
        h.append("<h2>Plots</h2><div>")
        for key, (caption, png) in plots.items():
            md += [f"![{caption}](plots/{key}.png)", ""]
            b64 = base64.b64encode(png).decode()
            h.append(f"<img alt='{html.escape(caption)}' title='{html.escape(caption)}' "
                     f"src='data:image/png;base64,{b64}'>")
        h.append("</div>")
    md += ["## Protocols", ""]
    h.append("<h2>Protocols</h2><ul>")
    for tag, p in protos.tags.items():
        text = _protocol_text(tag, p)
        md.append(f"- **[{tag}]** {text}")
        h.append(f"<li><b>[{tag}]</b> {html.escape(text)}</li>")
    h.append("</ul></body></html>")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text("\n".join(h))
    return [out / "report.html", out / "report.md"]
