"""Recovered frontier points against the unpruned ladder, and the extrapolated budget."""

from __future__ import annotations

import json
import math

import pytest

from secateur.report.crossing import envelope, fit_log_tokens, ladder_at, rows, tokens_to_reach
from secateur.report.page import build_report


def frontier() -> dict:
    points = {
        "f32": {"mib": 500.0, "wiki": 20.0},
        "llama.cpp q4_k_m": {"mib": 100.0, "wiki": 22.0},
        "llama.cpp q3_k_s": {"mib": 80.0, "wiki": 30.0},
        "llama.cpp q3_k_s imatrix": {"mib": 80.0, "wiki": 25.0},
        "llama.cpp q2_k imatrix": {"mib": 60.0, "wiki": 40.0},
        "llama.cpp q2_k": {"mib": 60.0, "wiki": 50.0},
        "secateur s-kd-full-100 q4_k_m rtn": {"mib": 69.282, "wiki": 33.0, "pruned_from": "m",
                                              "model": "/x/s-kd-full-100"},
        "secateur s-kd-full-400 q4_k_m rtn": {"mib": 69.282, "wiki": 30.0, "pruned_from": "m",
                                              "model": "/x/s-kd-full-400"},
        "secateur s q4_k_m rtn": {"mib": 69.282, "wiki": 90.0, "pruned_from": "m",
                                  "model": "/x/s"},
        "secateur s-kd-full-100 q2_k rtn": {"mib": 50.0, "wiki": 60.0, "pruned_from": "m",
                                            "model": "/x/s-kd-full-100"},
    }
    return {"points": points, "model": "m", "settings": {"windows": 16},
            "runtime": "llama-cpp-python x"}


def recovery(budgets: dict[int, float]) -> dict:
    """Dense 20, pruned 80 (f16, the benchmark's windows); run wiki ppl per budget."""
    runs = [{"student": "s", "recovery": "kd-full", "tokens": t, "wiki_ppl": w,
             "second_ppl": w, "wiki_gap_recovered": (80 - w) / 60,
             "second_gap_recovered": (80 - w) / 60} for t, w in budgets.items()]
    return {"settings": {"seqlen": 512, "seed": 0}, "dense": {"wiki_ppl": 20.0, "second_ppl": 20.0},
            "students": {"s": {"wiki_ppl": 80.0, "second_ppl": 80.0}}, "runs": runs,
            "model": "m"}


def test_the_ladder_is_the_unpruned_envelope_interpolated_in_log_space():
    pts = frontier()["points"]
    assert [n for *_, n in envelope(pts)] == ["llama.cpp q2_k imatrix",
                                              "llama.cpp q3_k_s imatrix", "llama.cpp q4_k_m"]
    at, source = ladder_at(pts, math.sqrt(60 * 80))  # halfway in log MiB
    assert at == pytest.approx(math.sqrt(40 * 25)) and source == \
        "llama.cpp q2_k imatrix .. llama.cpp q3_k_s imatrix"
    assert ladder_at(pts, 80.0) == (25.0, "llama.cpp q3_k_s imatrix")
    assert ladder_at(pts, 59.0) is None  # below the smallest rung: not extrapolated


def test_the_log_linear_fit_and_its_budget():
    curve = [(100, 0.2), (10000, 0.6)]  # +0.2 per factor 10
    a, b = fit_log_tokens(curve)
    assert b == pytest.approx(0.2 / math.log(10)) and a + b * math.log(100) == \
        pytest.approx(0.2)
    assert tokens_to_reach(curve, 0.8) == pytest.approx(1e5)
    assert fit_log_tokens([(100, 0.2)]) is None
    assert tokens_to_reach([(100, 0.5), (1000, 0.4)], 0.8) is None  # falling: no budget


def test_rows_say_where_recovery_stands_and_what_budget_would_cross():
    pts = frontier()["points"]
    # f16 wiki 50 at 100 tokens (50% of the gap), 35 at 400 (75%): +0.25 per factor 4
    table = {r[0]: r for r in rows(frontier(), [recovery({100: 50.0, 400: 35.0})])}
    assert set(table) == {"secateur s-kd-full-100 q4_k_m rtn",
                          "secateur s-kd-full-400 q4_k_m rtn",
                          "secateur s-kd-full-100 q2_k rtn"}  # the unrecovered one has no run
    target = ladder_at(pts, 69.282)[0]
    row = table["secateur s-kd-full-100 q4_k_m rtn"]
    assert row[3].startswith(f"{target:.3f} (llama.cpp q2_k imatrix ..")
    assert row[4] == f"{33.0 / target:.2f}x the ladder's perplexity"
    # quantized / f16 = 33 / 50; reaching `target` needs f16 target * 50 / 33
    share = (80 - target * 50 / 33) / 60
    want = math.exp(math.log(100) + (share - 0.5) / 0.25 * math.log(4))
    assert row[5] == f"~{want:.2g} tokens (log-linear fit of 2 budgets, {100 * share:.0f}% " \
                     "of the gap)"
    # smaller than every rung: held against the smallest one (q2_k imatrix, 60 MiB, 40.0)
    small = table["secateur s-kd-full-100 q2_k rtn"]
    assert small[3] == "40.000 (none this small; smallest rung llama.cpp q2_k imatrix, 60.0 MiB)"
    assert small[4] == "1.50x the ladder's perplexity" and small[5].startswith("~")
    # one budget only: the budget needs the curve
    alone = {r[0]: r for r in rows(frontier(), [recovery({100: 50.0})])}
    assert alone["secateur s-kd-full-100 q4_k_m rtn"][5] == \
        "needs the tokens curve (two budgets or more)"
    # a point better than the ladder beats it; one needing better than dense says so
    fr = frontier()
    fr["points"]["secateur s-kd-full-100 q4_k_m rtn"]["wiki"] = 20.0
    assert rows(fr, [recovery({100: 50.0})])[0][4:6] == ["beats the ladder", "-"]
    far = {r[0]: r for r in rows(frontier(), [recovery({100: 20.5})])}
    assert far["secateur s-kd-full-100 q4_k_m rtn"][5] == \
        "not by recovery: it would have to beat the dense model"


def test_the_speed_column_names_the_best_rung_at_least_as_fast():
    from secateur.report.crossing import as_fast

    fr = frontier()
    pts = fr["points"]
    point = pts["secateur s-kd-full-100 q4_k_m rtn"]
    assert as_fast(pts, point) == "- (speed not measured)"
    def timed(p, tok_s):
        p["speed"] = {"decode_tokens_per_second": {"median": tok_s}}

    timed(point, 50.0)
    for name, tok_s in (("llama.cpp q4_k_m", 40.0), ("llama.cpp q3_k_s imatrix", 55.0),
                        ("llama.cpp q2_k", 60.0)):
        timed(pts[name], tok_s)
    assert as_fast(pts, point) == "llama.cpp q3_k_s imatrix: 25.000"
    timed(point, 70.0)
    assert as_fast(pts, point) == "none as fast (70.0 tok/s)"
    table = {r[0]: r for r in rows(fr, [recovery({100: 50.0})])}
    assert table["secateur s-kd-full-100 q4_k_m rtn"][6] == "none as fast (70.0 tok/s)"


def test_the_report_shows_the_crossing_table(tmp_path):
    (tmp_path / "frontier.json").write_text(json.dumps(frontier()))
    (tmp_path / "recovery.json").write_text(json.dumps(recovery({100: 50.0, 400: 35.0})))
    report = build_report([tmp_path / "frontier.json", tmp_path / "recovery.json"],
                          tmp_path / "out")
    md = report.md.read_text()
    assert "against m's ladder" in md and "log-linear fit of 2 budgets" in md
