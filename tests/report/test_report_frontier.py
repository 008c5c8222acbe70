"""`secateur report` on `secateur frontier`'s frontier.json: the table says which secateur
points lie beyond llama.cpp's ladder and which llama.cpp points each one dominates, and the
page carries the frontier plot."""

from __future__ import annotations

import json

from secateur.report.frontier import dominated, winners
from secateur.report.page import build_report


def speed(tok_s: float) -> dict:
    return {"decode_tokens_per_second": {"median": tok_s}}


FRONTIER = {
    "model": "m", "runtime": "llama-cpp-python 0.3.36",
    "settings": {"windows": 4, "seqlen": 64, "threads": 1,
                 "calibration": {"source": "c4-sample", "nsamples": 8, "seqlen": 64}},
    "points": {
        "f32": {"mib": 500.0, "wiki": 20.0, "tiny-stories": 9.0, "speed": speed(20)},
        "llama.cpp q4_k_m imatrix": {"mib": 100.0, "wiki": 21.0, "tiny-stories": 9.4,
                                     "speed": speed(60)},
        "llama.cpp q4_0": {"mib": 87.5, "wiki": 25.0, "tiny-stories": 11.4, "speed": speed(80)},
        # beyond: lower than both llama.cpp points of no more bytes (100 <= 101 * 1.02)
        "secateur q4_k_m rtn+dwq": {"mib": 101.0, "wiki": 20.6, "tiny-stories": 9.3,
                                    "speed": speed(59)},
        # beyond q4_0 (the only llama.cpp point of no more bytes); and faster than q4_k_m
        # imatrix at no worse perplexity
        "secateur q4_0 rtn+dwq": {"mib": 87.6, "wiki": 21.0, "tiny-stories": 9.4,
                                  "speed": speed(79)},
    },
}


def test_verdicts():
    assert winners(FRONTIER) == ["secateur q4_k_m rtn+dwq", "secateur q4_0 rtn+dwq"]
    assert dominated(FRONTIER, "secateur q4_0 rtn+dwq") == ["llama.cpp q4_k_m imatrix",
                                                           "llama.cpp q4_0"]
    # 3% more bytes than llama.cpp's point is outside the slack: not "no more bytes"
    big = json.loads(json.dumps(FRONTIER))
    big["points"]["secateur q4_k_m rtn+dwq"]["mib"] = 103.5
    assert "llama.cpp q4_k_m imatrix" not in dominated(big, "secateur q4_k_m rtn+dwq")


def test_report_has_the_frontier_table_and_plot(tmp_path):
    src = tmp_path / "frontier.json"
    src.write_text(json.dumps(FRONTIER))
    report = build_report([src], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Frontier: m (llama.cpp)" in md
    row = next(line for line in md.splitlines() if line.startswith("| secateur q4_k_m"))
    assert "beyond the ladder" in row and "20.600" in row and "| 59.0 |" in row
    plots = list((tmp_path / "out" / "plots").glob("frontier_*.png"))
    assert len(plots) == 1 and plots[0].stat().st_size > 10_000
    assert not report.warnings
