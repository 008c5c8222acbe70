"""Sweeps: grid cells, one result file per finished cell, resumption after an interruption."""

import json

import pytest

from secateur import sweep as sweep_mod
from secateur.api import CalibrationConfig
from secateur.errors import SecateurError
from secateur.eval.zeroshot import ZeroShotSpec
from secateur.jobs import EvalSpec
from secateur.sweep import SweepSpec, cell_id, cell_options, run_sweep

CALIB = CalibrationConfig("c4-sample", nsamples=2, seqlen=32, seed=0)


@pytest.fixture
def spec_for(tmp_path_factory):
    """Sweep specs evaluated on a few wiki documents: tokenizing all of wiki costs ~15 s."""
    from secateur.data.sources import load_text

    path = tmp_path_factory.mktemp("text") / "wiki-head.txt"
    path.write_text("\n\n".join(load_text("wiki").documents[:5]))
    evaluation = EvalSpec(str(path), seqlen=32, max_windows=2)

    def make(model, methods, values, **kw):
        return SweepSpec(str(model), tuple(methods), tuple(values), CALIB, evaluation, **kw)

    return make


def test_cell_values():
    assert cell_options("wanda", "0.5").sparsity == 0.5
    assert cell_options("wanda", "2:4").nm == "2:4"
    assert cell_options("shortgpt", "ratio=0.25").ratio == 0.25
    assert cell_options("sleb", "layers=4").layers == 4
    assert cell_id("wanda", "2:4") == "wanda-2of4"
    with pytest.raises(SecateurError, match="neither a sparsity"):
        cell_options("wanda", "half")
    with pytest.raises(SecateurError, match="WandaConfig.colour: not a field"):
        cell_options("wanda", "colour=red")
    # a field of another method is refused, not dropped
    with pytest.raises(SecateurError, match="MagnitudeConfig.ratio: not a field"):
        cell_options("magnitude", "ratio=0.25")
    # text is parsed by the config: 'false' is False, not a truthy string
    from secateur.registry import make_config

    assert make_config({"method": "wanda", "sparsity": 0.5, "owl": "false"}).owl is None
    assert make_config({"method": "wanda", "sparsity": 0.5, "sequential": "false"}
                       ).sequential is False
    assert cell_options("sleb", "layers=2").search_dtype == "auto"


def test_unknown_method_fails_before_any_work(tiny_dir, tmp_path, spec_for):
    with pytest.raises(SecateurError):
        run_sweep(spec_for(tiny_dir("llama"), ["magnitude", "nosuch"], ["0.5"]), tmp_path / "s",
                  progress=False, say=lambda m: None)
    assert not (tmp_path / "s").exists()


def test_interrupted_sweep_resumes_where_it_stopped(tiny_dir, tmp_path, monkeypatch, spec_for):
    model, out = tiny_dir("llama"), tmp_path / "sweep"
    spec = spec_for(model, ["magnitude", "wanda"], ["0.5", "2:4"])
    real_prune_job = sweep_mod.prune_job
    calls = []

    def interrupted(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1].method)
        return real_prune_job(*args, **kw)

    monkeypatch.setattr(sweep_mod, "prune_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, out, progress=False, say=lambda m: None)
    first = {p.stem for p in (out / "results").glob("*.json")}
    assert first == {"dense", "magnitude-0.5", "magnitude-2of4"}
    stamp = (out / "results" / "magnitude-0.5.json").stat().st_mtime_ns

    monkeypatch.setattr(sweep_mod, "prune_job", real_prune_job)
    said = []
    results = run_sweep(spec, out, progress=False, say=said.append)
    assert set(results) == first | {"wanda-0.5", "wanda-2of4"}
    assert (out / "results" / "magnitude-0.5.json").stat().st_mtime_ns == stamp
    assert sum("done already" in m for m in said) == 2
    wanda = json.loads((out / "results" / "wanda-0.5.json").read_text())
    assert wanda["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert wanda["dense_perplexity"] == results["dense"]["perplexity"]
    assert wanda["perplexity"] > 1 and wanda["protocol"]["windows"] == 2
    assert not (out / "models").exists() or not any((out / "models").iterdir())

    other = spec_for(model, ["magnitude"], ["0.5"], dtype="bfloat16")
    with pytest.raises(SecateurError, match="other settings"):
        run_sweep(other, out, progress=False, say=lambda m: None)


def test_sweep_runs_zero_shot_on_each_pruned_model(tiny_dir, tmp_path, spec_for):
    spec = spec_for(tiny_dir("llama"), ["magnitude"], ["0.5"],
                 zeroshot=ZeroShotSpec(("arc_easy",), limit=2), compact=True)
    results = run_sweep(spec, tmp_path / "s", progress=False, say=lambda m: None)
    for cell in ("dense", "magnitude-0.5"):
        arc = results[cell]["zeroshot"]["tasks"]["arc_easy"]
        assert arc["samples"] == 2 and arc["acc_norm"] is not None
    assert results["magnitude-0.5"]["bytes_on_disk"] > 0
