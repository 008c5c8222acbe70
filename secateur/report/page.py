"""`secateur report RUN...`: one HTML page (plots embedded) and a Markdown twin.

Reads the JSON that `prune --json`, `eval --json`, `bench --json` and `sweep` write. Every
number in a table carries a protocol tag [P1], [Z1], [B1] that the Protocols section spells
out (dataset, seqlen, windows, BOS, dtype, harness, limit, threads, ...), because numbers
measured under different protocols are not comparable. Accuracies carry lm-eval's standard
error, and a difference from the dense model within it is marked (see `accuracy`). A result
that cannot be read, or lacks a field a table needs, is listed under Warnings and returned to
the caller, never skipped silently.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secateur.io import mark_output, write_bytes_atomic, write_text_atomic
from secateur.outputs import check_output_folder
from secateur.report import accuracy, crossing, frontier, recovery
from secateur.report.collect import Collected, Run, collect, why
from secateur.report.plots import plots as draw_plots
from secateur.report.runs import parameters, sparsity, target

log = logging.getLogger(__name__)
REPORT_FILES = ("report.md", "report.html")

# (title, columns, rows, note under the table or None)
Table = tuple[str, list[str], list[list[str]], str | None]


@dataclass
class Report:
    """The written page, its Markdown twin, and what could not be shown; unpacks as
    `html, md = build_report(...)`."""

    html: Path
    md: Path
    warnings: list[str]

    def __iter__(self) -> Iterator[Path]:
        return iter((self.html, self.md))


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


def _tagged(text: str, tag: str) -> str:
    return text if text == "-" or not tag else f"{text} [{tag}]"


def _rows(c: Collected, items: list[Run], build: Callable[[Run], list[list[str]]],
          table: str) -> list[list[str]]:
    """Rows of every item; one whose result lacks a field becomes a warning, not a crash."""
    rows = []
    for item in items:
        try:
            rows.extend(build(item))
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
            c.warnings.append(f"{item.name}: left out of the {table} table (a field is missing "
                              f"or malformed: {type(err).__name__} {why(err)})")
    return rows


def _protocol_key(zs: dict[str, Any]) -> str:
    return json.dumps(zs.get("protocol"), sort_keys=True, default=str)


def _dense_zeroshot(c: Collected) -> dict[str, dict[str, Any]]:
    """The dense model's zero-shot result per protocol: what pruned runs are compared with."""
    dense: dict[str, dict[str, Any]] = {}
    for r in c.runs:
        zs = r.data.get("zeroshot")
        if r.data.get("method") == "dense" and isinstance(zs, dict):
            dense.setdefault(_protocol_key(zs), zs)
    return dense


def _average_cell(zs: dict[str, Any], ref: dict[str, Any] | None, key: str) -> str:
    se = accuracy.average_stderr(zs, key)
    mark = None if ref is None or ref is zs else accuracy.within(
        zs.get(key), se, ref.get(key), accuracy.average_stderr(ref, key))
    return accuracy.fmt(zs.get(key), se, mark)


def _task_cell(task: dict[str, Any] | None, ref_task: dict[str, Any] | None) -> str:
    if task is None:
        return "-"
    parts = []
    for metric in ("acc", "acc_norm"):
        se = accuracy.stderr(task, metric)
        mark = None if ref_task is None or ref_task is task else accuracy.within(
            task.get(metric), se, ref_task.get(metric), accuracy.stderr(ref_task, metric))
        parts.append(accuracy.fmt(task.get(metric), se, mark))
    return " / ".join(parts) + ("*" if task["average_metric"] == "acc_norm" else "")


def _runs_table(c: Collected, protos: Protocols, dense: dict[str, dict]) -> Table | None:
    def build(r: Run) -> list[list[str]]:
        d = r.data
        total, nonzero = parameters(d)
        ptag = protos.tag("P", d.get("protocol"))
        zs = d.get("zeroshot") or {}
        ztag = protos.tag("Z", zs.get("protocol"))
        ref = dense.get(_protocol_key(zs)) if zs else None
        cal = d.get("calibration") or {}
        return [[
            r.name, d.get("method", "-"), target(d), _f(sparsity(d), 4),
            "-" if total is None else f"{total:,}", "-" if nonzero is None else f"{nonzero:,}",
            _f(d.get("perplexity"), 3, ptag), _f(d.get("dense_perplexity"), 3, ptag),
            _tagged(_average_cell(zs, ref, "average"), ztag) if zs else "-",
            "-" if not d.get("bytes_on_disk") else f"{d['bytes_on_disk'] / 2**20:.1f}",
            "-" if not cal else f"{cal.get('source')} {cal.get('nsamples')}x{cal.get('seqlen')}"
                                f" seed {cal.get('seed')}",
        ]]

    rows = _rows(c, c.runs, build, "Runs")
    if not rows:
        return None
    return ("Runs", ["run", "method", "target", "sparsity", "parameters", "non-zero",
                     "perplexity", "dense ppl", "zero-shot avg % ±se", "MiB on disk",
                     "calibration"], rows, accuracy.NOTE if dense else None)


def _zeroshot_table(c: Collected, protos: Protocols, dense: dict[str, dict]) -> Table | None:
    zs_runs = [r for r in c.runs if r.data.get("zeroshot")]
    if not zs_runs:
        return None
    names: list[str] = []
    for r in zs_runs:
        tasks = r.data["zeroshot"].get("tasks")
        names += [t for t in tasks if t not in names] if isinstance(tasks, dict) else []

    def build(r: Run) -> list[list[str]]:
        z = r.data["zeroshot"]
        tag = protos.tag("Z", z["protocol"])
        ref = dense.get(_protocol_key(z))
        ref_tasks = (ref or {}).get("tasks", {})
        row = [r.name] + [_task_cell(z["tasks"].get(t), ref_tasks.get(t) if ref else None)
                          for t in names]
        return [row + [_tagged(_average_cell(z, ref, "average"), tag),
                       _tagged(_average_cell(z, ref, "average_acc"), tag)]]

    rows = _rows(c, zs_runs, build, "zero-shot")
    if not rows:
        return None
    note = ("±: lm-eval's standard error; the averages' is sqrt(sum se^2) / tasks. "
            + (accuracy.NOTE if dense else "No dense run with the same protocol to compare "
               "with, so no difference is marked."))
    return ("Zero-shot accuracy (acc / acc_norm %, * = acc_norm used in the average)",
            ["run", *names, "average", "mean acc"], rows, note)


def _peak_working(m: dict[str, Any]) -> str:
    # Results before `working_mib` measured VmHWM - VmRSS, which read 0 once pages were
    # reused: not a figure to show.
    if m.get("working_mib") is None or m.get("peak_working_mib") is None:
        return "-"
    return f"{m['peak_working_mib']:.1f}"


def _speed_table(c: Collected, protos: Protocols) -> Table | None:
    def build(b: Run) -> list[list[str]]:
        tag = protos.tag("B", {**b.data["protocol"],
                               "memory_bandwidth_gbs": b.data["memory_bandwidth_gbs"]})
        lengths = b.data["protocol"]["prompt_lengths"]
        rows = []
        for name, m in b.data["models"].items():
            sp = b.data["speedup_vs_baseline"].get(name, {})
            dec = m["decode"]
            rows.append([
                name, m["dtype"], f"{m['parameters']:,}", f"{m['nonzero']:,}",
                "-" if m["bytes_on_disk"] is None else f"{m['bytes_on_disk'] / 2**20:.1f}",
                ", ".join(f"{m['prefill'][str(n)]['tokens_per_second']:.0f}" for n in lengths)
                + f" [{tag}]",
                _f(dec["tokens_per_second"], 2, tag), _f(dec["bound_tokens_per_second"], 2, tag),
                f"{100 * dec['fraction_of_bound']:.0f}%",
                "baseline" if not sp else
                f"{sp['decode']['median']:.2f}x [{sp['decode']['min']:.2f}-"
                f"{sp['decode']['max']:.2f}]",
                _peak_working(m),
            ])
        return rows

    rows = _rows(c, c.benches, build, "speed")
    if not rows:
        return None
    note = None
    if any(row[-1] == "-" for row in rows):
        note = ("peak working MiB '-': not measured (results from before secateur measured it "
                "from tensor allocations; their figure read 0 and is not shown)")
    return ("Speed and memory", ["model", "dtype", "parameters", "non-zero", "MiB on disk",
                                 "prefill tok/s (per length)", "decode tok/s",
                                 "decode bound tok/s", "of bound",
                                 "decode speedup (median [min-max])", "peak working MiB"],
            rows, note)


def _tables(c: Collected, protos: Protocols) -> list[Table]:
    dense = _dense_zeroshot(c)
    tables = [_runs_table(c, protos, dense), _zeroshot_table(c, protos, dense),
              _speed_table(c, protos)]
    for f in c.frontiers:
        settings = f.data.get("settings") or {}
        model = f.data.get("model") or settings.get("model") or f.name
        cols = ["point", "MiB", *[f"{t} ppl" for t in frontier.texts(f.data)],
                "decode tok/s", "verdict"]
        cal = settings.get("calibration") or {"source": settings.get("calib"),
                                              "nsamples": settings.get("nsamples"),
                                              "seqlen": settings.get("calib_seqlen")}
        note = (f"{model} in {f.data.get('runtime') or f.data.get('llama_cpp')}: every point "
                f"a GGUF file measured by llama.cpp ({settings.get('windows')} windows x "
                f"{settings.get('seqlen')} tokens per text, {settings.get('threads')} "
                f"thread(s)); secateur's rounding and the imatrix calibrated on "
                f"{cal.get('source')} ({cal.get('nsamples')} x {cal.get('seqlen')}). 'beyond "
                f"the ladder': lower perplexity than every llama.cpp point of no more bytes (2% "
                f"slack); 'dominates': no more bytes and lower perplexity, or faster decode at "
                f"no worse perplexity.")
        tables.append((f"Frontier: {model} (llama.cpp)", cols, frontier.rows(f.data), note))
        crossed = crossing.rows(f.data, [r.data for r in c.recoveries])
        if crossed:
            tables.append((f"Pruned + recovered against {model}'s ladder", crossing.COLUMNS,
                           crossed, crossing.NOTE))
    for r in c.recoveries:
        st = r.data["settings"]
        note = (f"{r.data.get('model')} pruned, then recovered on c4-sample windows of "
                f"{st.get('seqlen')} tokens ({st.get('batch_size')} per step, AdamW, cosine, "
                f"LoRA lr {st.get('lr_lora')}, full lr {st.get('lr_full')}, seed "
                f"{st.get('seed')}); perplexity on {st.get('eval_windows')} windows x "
                f"{st.get('eval_seqlen')} of wiki and of a second text neither model trained "
                f"on; gap recovered = (pruned - recovered) / (pruned - dense); zero-shot: mean "
                f"of arc_easy, piqa, hellaswag acc_norm over {st.get('zeroshot_limit')} "
                f"documents each, ± the stderr of that mean. {r.data.get('command', '')}")
        tables.append((f"Recovery: {r.name}", recovery.COLUMNS, recovery.rows(r.data), note))
    depth = [r for r in c.runs if isinstance(r.data.get("summary"), dict)
             and r.data["summary"].get("removed")]
    if depth:
        tables.append(("Removed blocks (in removal order)", ["run", "removed"],
                       [[r.name, ", ".join(map(str, r.data["summary"]["removed"]))]
                        for r in depth], None))
    return [t for t in tables if t is not None]


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


def _md(text: str) -> str:
    """Text from result files as Markdown shows it: no raw HTML (a result file is anyone's),
    no broken table rows, no links; the [P1] tags stay as they are."""
    text = " ".join(str(text).splitlines())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("](", "]\\(")


def _render(title: str, sources: str, tables: list[Table], plots: dict[str, tuple[str, bytes]],
            protos: Protocols, warnings: list[str]) -> tuple[str, str]:
    md = [f"# {_md(title)}", "", f"From: {_md(sources)}", ""]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
         "</title><style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
         "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
         "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
         "td:first-child,th{text-align:left}th{background:#eee}.warn{color:#a40}"
         "img{max-width:48%;margin:4px;border:1px solid #ddd}</style></head><body>",
         f"<h1>{html.escape(title)}</h1><p>From: {html.escape(sources)}</p>"]
    if warnings:
        md += ["## Warnings", "", *[f"- {_md(w)}" for w in warnings], ""]
        h.append("<h2>Warnings</h2><ul class='warn'>"
                 + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    for name, cols, rows, note in tables:
        md += [f"## {_md(name)}", "", "| " + " | ".join(map(_md, cols)) + " |",
               "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(map(_md, row)) + " |" for row in rows]
        md += ["", _md(note), ""] if note else [""]
        h.append(f"<h2>{html.escape(name)}</h2><table><tr>"
                 + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
        h += ["<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>"
              for row in rows]
        h.append("</table>" + (f"<p>{html.escape(note)}</p>" if note else ""))
    if plots:
        md += ["## Plots", ""]
        h.append("<h2>Plots</h2><div>")
        for key, (caption, png) in plots.items():
            alt = _md(caption).replace("[", "\\[").replace("]", "\\]")
            md += [f"![{alt}](plots/{key}.png)", ""]
            b64 = base64.b64encode(png).decode()
            h.append(f"<img alt='{html.escape(caption)}' title='{html.escape(caption)}' "
                     f"src='data:image/png;base64,{b64}'>")
        h.append("</div>")
    md += ["## Protocols", ""]
    h.append("<h2>Protocols</h2><ul>")
    for tag, p in protos.tags.items():
        text = _protocol_text(tag, p)
        md.append(f"- **[{tag}]** {_md(text)}")
        h.append(f"<li><b>[{tag}]</b> {html.escape(text)}</li>")
    h.append("</ul></body></html>")
    return "\n".join(h), "\n".join(md) + "\n"


def build_report(paths: list[Path], out: Path, title: str = "secateur report",
                 warn: Callable[[str], None] | None = None) -> Report:
    """Write out/report.html (self-contained) and out/report.md with out/plots/*.png.

    Each warning (a result left out, wholly or from one table) is listed in the page, passed
    to `warn` (default: logging) and returned in `Report.warnings`."""
    out = Path(out)
    # report.md and report.html replace only files secateur wrote there (listed in the
    # folder's marker), never a file of the user's or a run being reported
    check_output_folder(out, inputs=paths, files=REPORT_FILES)
    collected = collect(paths)
    protos = Protocols()
    tables = _tables(collected, protos)
    plots = draw_plots(collected)
    page, md = _render(title, ", ".join(map(str, paths)), tables, plots, protos,
                       collected.warnings)
    pngs = [f"plots/{key}.png" for key in plots]
    check_output_folder(out, inputs=paths, files=pngs)
    for key, (_, png) in plots.items():
        write_bytes_atomic(out / "plots" / f"{key}.png", png)
    write_text_atomic(out / "report.md", md)
    write_text_atomic(out / "report.html", page)
    mark_output(out, [*REPORT_FILES, "plots", *pngs])
    for w in collected.warnings:
        (warn or log.warning)(w)
    return Report(out / "report.html", out / "report.md", list(collected.warnings))
