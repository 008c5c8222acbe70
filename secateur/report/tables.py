"""Rich tables for the terminal; the HTML/Markdown report has its own in `page.py`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def print_zeroshot(console: Console, zs: dict[str, Any]) -> None:
    p = zs["protocol"]
    limit = "all documents" if p["limit"] is None else f"first {p['limit']} documents"
    table = Table(title=f"zero-shot, {p['harness']}, {limit}, task data: {p['data']}")
    for col in ("task", "acc %", "acc_norm %", "averaged", "docs", "data"):
        table.add_column(col)
    for name, t in zs["tasks"].items():
        table.add_row(name, _pct(t["acc"]), _pct(t["acc_norm"]), t["average_metric"],
                      f"{t['samples']}/{t['samples_available']}", t["data"])
    table.add_row("average", _pct(zs["average_acc"]), "", _pct(zs["average"]), "", "")
    console.print(table)
    console.print("average: " + p["average"])
