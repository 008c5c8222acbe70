"""Report: tables and plots from real (tiny-model) sweep and bench JSON; bad run directories."""

import json
import re
import sys

import pytest

from secateur.api import CalibrationConfig
from secateur.bench import BenchSpec, bench_job
from secateur.errors import SecateurError
from secateur.eval.zeroshot import ZeroShotSpec
from secateur.jobs import EvalSpec
from secateur.report.page import build_report
from secateur.sweep import SweepSpec, run_sweep
from tests.tiny_models import save_tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from secateur.data.sources import load_text

    root = tmp_path_factory.mktemp("report")
    text = root / "wiki-head.txt"
    text.write_text("\n\n".join(load_text("wiki").documents[:5]))
    model = save_tiny("llama", root / "tiny")
    spec = SweepSpec(str(model), ("magnitude", "wanda"), ("0.5",),
                     CalibrationConfig("c4-sample", 2, 32, 0), EvalSpec(str(text), 32, 2),
                     ZeroShotSpec(("arc_easy",), limit=2), keep_models=True)
    run_sweep(spec, root / "sweep", progress=False, say=lambda m: None)
    bench_json = root / "bench.json"
    bench_job(str(model), [str(root / "sweep" / "models" / "wanda-0.5")],
              BenchSpec((8,), decode_tokens=2, decode_prompt=4, repeats=1, warmup=0, threads=1),
              json_path=bench_json)
    return root


def test_report_has_tables_plots_and_protocols(runs, tmp_path):
    html_path, md_path = build_report([runs / "sweep", runs / "bench.json"], tmp_path / "r")
    page = html_path.read_text()
    md = md_path.read_text()
    assert page.count("<img") == 4  # ppl vs sparsity, accuracy, speed, per-layer sparsity
    for png in ("perplexity_vs_sparsity", "accuracy_vs_parameters", "speed_vs_parameters",
                "per_layer_sparsity"):
        assert (tmp_path / "r" / "plots" / f"{png}.png").stat().st_size > 5000
        assert f"plots/{png}.png" in md
    for cell in ("dense", "magnitude-0.5", "wanda-0.5"):
        assert cell in page and cell in md
    # every perplexity, accuracy and speed number is tagged with a protocol that is spelled out
    ppl = json.loads((runs / "sweep" / "results" / "wanda-0.5.json").read_text())["perplexity"]
    assert f"{ppl:.3f} [P1]" in md
    assert re.search(r"\d+\.\d\d \[Z1\]", md) and re.search(r"\d+\.\d\d \[B1\]", md)
    assert "**[P1]** perplexity on wiki-head.txt" in md
    assert "**[Z1]** zero-shot with lm-eval" in md and "first 2 documents" in md
    assert "**[B1]** benchmark: 1 thread(s)" in md


def test_report_cli_and_bad_run_dirs(runs, tmp_path, monkeypatch, capsys):
    from secateur.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(SecateurError, match="no results in"):
        build_report([empty], tmp_path / "r")
    with pytest.raises(SecateurError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "r")
    monkeypatch.setattr(sys, "argv", ["secateur", "report", str(empty)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and "no results in" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["secateur", "report", str(runs / "sweep"), "--out",
                                      str(tmp_path / "ok")])
    main()
    assert (tmp_path / "ok" / "report.html").is_file()


# Synthetic results, shaped as prune/eval/bench write them, for what the report must say.

def _zeroshot(acc_norm: float, se: float, limit: int | None) -> dict:
    return {"tasks": {"arc_easy": {"acc": acc_norm, "acc_stderr": se, "acc_norm": acc_norm,
                                   "acc_norm_stderr": se, "average_metric": "acc_norm",
                                   "samples": limit or 570, "samples_available": 570}},
            "average": acc_norm, "average_acc": acc_norm,
            "protocol": {"harness": "lm-eval 0.4", "num_fewshot": 0, "limit": limit}}


def _result(method: str, zs: dict) -> dict:
    return {"model": "m", "method": method, "options": {"sparsity": 0.5}, "sparsity": 0.5,
            "perplexity": 20.0, "zeroshot": zs}


def _bench(working: dict | None) -> dict:
    model = {"dtype": "float32", "parameters": 1000, "nonzero": 1000, "bytes_on_disk": 4000,
             "prefill": {"8": {"tokens_per_second": 100.0}},
             "decode": {"tokens_per_second": 10.0, "bound_tokens_per_second": 20.0,
                        "fraction_of_bound": 0.5},
             "peak_working_mib": 0.0 if working is None else max(working.values())}
    if working is not None:
        model["working_mib"] = working
    return {"baseline": "dense", "models": {"dense": model}, "speedup_vs_baseline": {},
            "memory_bandwidth_gbs": 10.0, "protocol": {"prompt_lengths": [8]}}


def _write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_corrupt_or_incomplete_results_are_reported_not_skipped(tmp_path):
    sweep = tmp_path / "sweep"
    _write(sweep / "results" / "dense.json", _result("dense", _zeroshot(0.3, 0.15, 10)))
    _write(sweep / "results" / "cut.json", '{"perplexity": 12.')  # killed mid-write
    _write(sweep / "results" / "list.json", "[1, 2]")
    broken = _result("wanda", _zeroshot(0.3, 0.15, 10))
    del broken["zeroshot"]["protocol"]
    _write(sweep / "results" / "noprotocol.json", broken)
    warned: list[str] = []
    report = build_report([sweep], tmp_path / "r", warn=warned.append)
    assert warned == report.warnings and len(report.warnings) == 3
    assert "cut.json is not readable JSON" in report.warnings[0]
    assert "list.json is not a prune, eval or bench result" in report.warnings[1]
    assert "noprotocol: left out of the zero-shot table" in report.warnings[2]
    md = report.md.read_text()
    assert "## Warnings" in md and all(w in md for w in report.warnings)
    assert "Warnings" in report.html.read_text()
    html_path, md_path = report  # still unpacks as before
    assert md_path == report.md
    with pytest.raises(SecateurError, match="not readable JSON"):  # named on its own: an error
        build_report([sweep / "results" / "cut.json"], tmp_path / "r2")


def test_accuracies_carry_stderr_and_noise_is_marked(tmp_path):
    runs = tmp_path / "runs"
    # 10 documents: 10 points apart, within the ~22-point combined error
    _write(runs / "results" / "dense.json", _result("dense", _zeroshot(0.30, 0.15, 10)))
    _write(runs / "results" / "wanda.json", _result("wanda", _zeroshot(0.40, 0.16, 10)))
    # all documents: 5 points apart, outside the ~2.9-point combined error
    _write(runs / "results" / "dense-all.json", _result("dense", _zeroshot(0.60, 0.02, None)))
    _write(runs / "results" / "wanda-all.json", _result("wanda", _zeroshot(0.55, 0.02, None)))
    md = build_report([runs], tmp_path / "r").md.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()
            if line.startswith("| ") and "±" in line}
    assert "40.00 ±16.00~ / 40.00 ±16.00~*" in rows["wanda"]
    assert "55.00 ±2.00 / 55.00 ±2.00*" in rows["wanda-all"] and "~" not in rows["wanda-all"]
    assert "30.00 ±15.00 / 30.00 ±15.00*" in rows["dense"]  # the reference is not marked
    assert "40.00 ±16.00~ [Z" in rows["wanda"]  # the average too, with its protocol tag
    assert "~ = within one standard error of the dense model's" in md


def test_peak_working_memory_shown_only_when_measured(tmp_path):
    _write(tmp_path / "old.json", _bench(None))  # recorded 0 for every model
    _write(tmp_path / "new.json", _bench({"prefill_8": 1.25, "decode": 0.5}))
    md = build_report([tmp_path / "old.json", tmp_path / "new.json"], tmp_path / "r"
                      ).md.read_text()
    speed = [line for line in md.splitlines() if line.startswith("| dense | float32")]
    assert speed[0].endswith("| - |") and speed[1].endswith("| 1.2 |")
    assert "peak working MiB '-': not measured" in md


def test_report_output_checked_before_reading(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SecateurError, match="is a file, not a folder"):
        build_report([tmp_path / "missing"], tmp_path / "file")
