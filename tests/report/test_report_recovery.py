"""bench/recovery.py's result files in the report: a table per file and the token curve."""

from __future__ import annotations

import json

import pytest

from secateur.report.page import build_report
from secateur.report.recovery import curves, rows


def zeroshot(acc: float) -> dict:
    task = {"acc_norm": acc, "acc_norm_stderr": 0.02, "average_metric": "acc_norm"}
    return {"average": acc, "tasks": {"piqa": task, "arc_easy": dict(task)}}


def result(budgets: tuple[int, ...]) -> dict:
    dense = {"wiki_ppl": 20.0, "second_ppl": 10.0, "zeroshot": zeroshot(0.5)}
    runs = []
    for i, tokens in enumerate(budgets):
        wiki = 60.0 - 10 * (i + 1)
        runs.append({"student": "shortgpt-8-layers", "recovery": "kd-full", "tokens": tokens,
                     "wiki_ppl": wiki, "second_ppl": 30.0 - 5 * (i + 1),
                     "wiki_gap_recovered": (80 - wiki) / 60,
                     "second_gap_recovered": (40 - (30.0 - 5 * (i + 1))) / 30 + 1 / 3,
                     "train_seconds": 100.0 * (i + 1), "zeroshot": zeroshot(0.45)})
    return {"model": "smollm2-135m", "command": "bench/recovery.py",
            "settings": {"seqlen": 512, "batch_size": 4, "seed": 0, "eval_windows": 64},
            "dense": dense, "runs": runs,
            "students": {"shortgpt-8-layers": {"wiki_ppl": 80.0, "second_ppl": 40.0}}}


def test_rows_give_the_gap_recovered_and_the_zero_shot_stderr():
    table = rows(result((102400,)))
    assert table[0][0] == "dense" and table[0][7] == f"0.500 ± {(2 * 0.02**2) ** 0.5 / 2:.3f}"
    assert table[1][:3] == ["shortgpt-8-layers", "(pruned)", "0"]
    assert table[2][2] == "102,400" and table[2][4] == "50.0%"


def test_the_curve_joins_files_of_the_same_settings_only():
    one, two = result((25600,)), result((102400, 409600))
    assert curves([one]) == {}  # one budget: no curve
    line = curves([one, two])[("shortgpt-8-layers", "kd-full")]
    assert [t for t, *_ in line] == [25600, 102400, 409600]
    other = result((1000,))
    other["settings"]["seed"] = 1
    assert [t for t, *_ in curves([two, other])[("shortgpt-8-layers", "kd-full")]] == \
        [102400, 409600]


def test_report_has_the_recovery_table_and_curve(tmp_path):
    (tmp_path / "recovery.json").write_text(json.dumps(result((102400,))))
    (tmp_path / "curve.json").write_text(json.dumps(result((25600, 409600))))
    report = build_report([tmp_path / "recovery.json", tmp_path / "curve.json"],
                          tmp_path / "out")
    md = report.md.read_text()
    assert "Recovery: recovery" in md and "Recovery: curve" in md and "409,600" in md
    assert (tmp_path / "out" / "plots" / "recovery_curve.png").is_file()
    assert not report.warnings


@pytest.mark.parametrize("broken", [{"runs": [], "students": {}}, {"dense": {}}])
def test_files_missing_the_parts_are_not_recovery_results(broken):
    from secateur.report.recovery import is_recovery

    assert not is_recovery(broken)


def test_bench_merge_unites_files_of_the_same_settings_and_refuses_others(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "recovery.py"
    one, two = result((25600,)), result((25600, 102400))
    two["runs"][0]["wiki_ppl"] = 1.0  # a run on record twice: the first file's copy is kept
    lora = dict(two["runs"][1], recovery="lora-lm", wiki_gap_recovered=0.1,
                second_gap_recovered=1.5)
    two["runs"].append(lora)
    for name, data in (("a.json", one), ("b.json", two)):
        (tmp_path / name).write_text(json.dumps(data))
    done = subprocess.run([sys.executable, str(script), "--merge", "a.json", "b.json",
                           "--out", "m.json"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [(r["recovery"], r["tokens"]) for r in merged["runs"]] == \
        [("kd-full", 25600), ("kd-full", 102400), ("lora-lm", 102400)]
    assert merged["runs"][0]["wiki_ppl"] == one["runs"][0]["wiki_ppl"]
    assert merged["verdict"]["shortgpt-8-layers"] == {
        "kd-full>lora-lm on wiki at 102400 tokens": True,
        "kd-full>lora-lm on second at 102400 tokens": False}
    assert [m["file"] for m in merged["merged_from"]] == ["a.json", "b.json"]
    two["settings"]["seed"] = 1
    (tmp_path / "b.json").write_text(json.dumps(two))
    done = subprocess.run([sys.executable, str(script), "--merge", "a.json", "b.json",
                           "--out", "n.json"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0 and "other settings" in done.stderr
    assert not (tmp_path / "n.json").exists()
