"""Rich tables for the terminal; the HTML/Markdown report has its own in `page.py`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from secateur.report.accuracy import average_stderr, fmt, stderr


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def print_zeroshot(console: Console, zs: dict[str, Any]) -> None:
    p = zs["protocol"]
    limit = "all documents" if p["limit"] is None else f"first {p['limit']} documents"
    table = Table(title=f"zero-shot, {p['harness']}, {limit}, task data: {p['data']}")
    for col in ("task", "acc % ±se", "acc_norm % ±se", "averaged", "docs", "data"):
        table.add_column(col)
    for name, t in zs["tasks"].items():
        table.add_row(name, fmt(t["acc"], stderr(t, "acc")),
                      fmt(t["acc_norm"], stderr(t, "acc_norm")), t["average_metric"],
                      f"{t['samples']}/{t['samples_available']}", t["data"])
    table.add_row("average", fmt(zs["average_acc"], average_stderr(zs, "average_acc")), "",
                  fmt(zs["average"], average_stderr(zs)), "", "")
    console.print(table)
    console.print("average: " + p["average"] + "; ±: lm-eval's standard error (the averages': "
                  "sqrt(sum se^2) / tasks)")


def print_bench(console: Console, res: dict[str, Any]) -> None:
    p = res["protocol"]
    table = Table(title=f"speed, {p['threads_used']} thread(s), median of {p['repeats']} "
                        f"interleaved rounds after {p['warmup']} warm-up")
    cols = ["model", "params", "MiB disk", *[f"prefill {n} tok/s" for n in p["prompt_lengths"]],
            "decode tok/s", "decode bound", "of bound", "peak work MiB"]
    for c in cols:
        table.add_column(c)
    for name, m in res["models"].items():
        disk = "-" if m["bytes_on_disk"] is None else f"{m['bytes_on_disk'] / 2**20:.0f}"
        d = m["decode"]
        peak = "-" if m.get("working_mib") is None else f"{m['peak_working_mib']:.1f}"
        table.add_row(name, f"{m['parameters']:,}", disk,
                      *[f"{m['prefill'][str(n)]['tokens_per_second']:.1f}"
                        for n in p["prompt_lengths"]],
                      f"{d['tokens_per_second']:.2f}", f"{d['bound_tokens_per_second']:.2f}",
                      f"{100 * d['fraction_of_bound']:.0f}%", peak)
    console.print(table)
    for name, r in res["speedup_vs_baseline"].items():
        parts = [f"{k} {v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]"
                 for k, v in r.items() if isinstance(v, dict)]
        console.print(f"{name} vs {res['baseline']}: speedup " + ", ".join(parts)
                      + f"; parameters x{r['parameters']:.3f}")
    console.print(f"process peak RSS {res['process_peak_rss_mib']:.0f} MiB (all models "
                  "resident)")
    console.print(f"memory bandwidth {res['memory_bandwidth_gbs']:.1f} GB/s ({p['bandwidth']}); "
                  f"decode bound = bandwidth / weight bytes per token")


def print_gguf_bench(console: Console, res: dict[str, Any]) -> None:
    p = res["protocol"]
    keys = ["decode", *[f"prefill {n}" for n in p["prompt_lengths"]]]
    table = Table(title=f"{res['runtime']}, {p['threads']} thread(s), median [min-max] of "
                        f"{p['repeats']} interleaved rounds, tokens/s")
    for c in ("file", "MiB", *keys, "tensor types"):
        table.add_column(c)
    for name, m in res["models"].items():
        table.add_row(name, f"{m['bytes_on_disk'] / 2**20:.1f}",
                      *[f"{m[k]['median']:.1f} [{m[k]['min']:.1f}-{m[k]['max']:.1f}]"
                        for k in keys], m["tensor_types"])
    console.print(table)
    for name, r in res["speedup_vs_baseline"].items():
        parts = [f"{k} {v['median']:.2f}x [{v['min']:.2f}-{v['max']:.2f}]" for k, v in r.items()]
        console.print(f"{name} vs {res['baseline']}: " + ", ".join(parts))


def print_sweep(console: Console, results: dict[str, dict[str, Any]]) -> None:
    table = Table(title="sweep")
    for col in ("cell", "sparsity", "perplexity", "zero-shot avg %", "MiB on disk"):
        table.add_column(col)
    for cid, r in results.items():
        zs = r.get("zeroshot") or {}
        disk = r.get("bytes_on_disk")
        table.add_row(cid, "-" if r.get("sparsity") is None else f"{r['sparsity']:.3f}",
                      "-" if r.get("perplexity") is None else f"{r['perplexity']:.3f}",
                      _pct(zs.get("average")), "-" if not disk else f"{disk / 2**20:.1f}")
    console.print(table)
