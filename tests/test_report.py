"""Report: tables and plots from real (tiny-model) sweep and bench JSON; bad run directories."""

import json
import re
import sys

import pytest

from secateur.api import CalibrationSpec
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
                     CalibrationSpec("c4-sample", 2, 32, 0), EvalSpec(str(text), 32, 2),
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
