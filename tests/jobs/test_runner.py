"""The one runner: every command is a recipe run through `recipe.run_recipe`, and the bench,
frontier and export records are read through typed results."""

from __future__ import annotations

import json

import pytest

from secateur.jobs import EvalSpec, _recipe
from secateur.methods import WandaConfig
from secateur.recipe import Recipe
from secateur.results import BenchResult, ExportResult, FrontierResult


def test_a_prune_command_is_a_one_step_recipe_with_its_flags():
    recipe = _recipe("m", WandaConfig(sparsity=0.5), EvalSpec("wiki", 32, 2),
                     save_format="bitmask")
    assert [s.method for s in recipe.steps] == ["wanda"] and recipe.save_format == "bitmask"
    (ppl,) = recipe.evaluate.perplexity
    assert (ppl.data, ppl.seqlen, ppl.max_windows) == ("wiki", 32, 2)
    # no --eval: nothing measured
    assert _recipe("m", WandaConfig(sparsity=0.5), EvalSpec(None)).evaluate.perplexity == []


def test_a_teacher_round_trips_through_yaml_and_is_left_out_when_unset():
    plain = Recipe(model="m", steps=[{"method": "wanda", "sparsity": 0.5}])
    assert "teacher" not in plain.to_dict()  # existing recipes keep their fingerprint
    taught = Recipe(model="m", teacher="dense", steps=[{"method": "wanda", "sparsity": 0.5}])
    assert Recipe.from_yaml(taught.to_yaml()).teacher == "dense"


def test_the_command_recipe_refuses_a_bad_dtype_in_the_loaders_words():
    from secateur.errors import SecateurError

    with pytest.raises(SecateurError, match="unknown dtype 'float64'"):
        _recipe("m", WandaConfig(sparsity=0.5), None, dtype="float64")


def test_bench_frontier_and_export_records_read_typed_and_write_back_unchanged():
    row = {"bytes_on_disk": 2**20, "prefill": {"16": {"tokens_per_second": 100.0}},
           "decode": {"tokens_per_second": 10.0, "weight_bytes_per_token": 2**19}}
    bench = BenchResult({"baseline": "a", "runtime": "int4", "protocol": {"threads_used": 1},
                         "models": {"a": row, "b": {**row, "peak_working_mib": 3.0}},
                         "speedup_vs_baseline": {"b": {"decode": {"median": 2.0, "min": 1.5,
                                                                  "max": 2.5},
                                                       "bytes_on_disk": 0.5}}})
    assert bench.compared == ["b"] and not bench.in_llama_cpp and bench.threads_used == 1
    assert bench.model("b").peak_working_mib == 3.0 and bench.model("a").peak_working_mib is None
    assert bench.model("a").prefill_tokens_per_second == 100.0
    assert bench.decode_speedup("b").median == 2.0 and bench.bytes_ratio("b") == 0.5
    assert BenchResult({"runtime": "llama.cpp (cpu)"}).in_llama_cpp

    record = {"runtime": "llama.cpp", "points": {
        "q4_0": {"mib": 1.5, "wiki": 20.0, "tiny-stories": 9.0},
        "secateur q4_0": {"mib": 1.5, "wiki": 19.0, "tiny-stories": 8.5,
                          "speed": {"decode_tokens_per_second": {"median": 42.0}}}}}
    frontier = FrontierResult.from_json(json.loads(json.dumps(record)))
    assert frontier.points["q4_0"].decode_tokens_per_second is None
    assert frontier.points["secateur q4_0"].tiny_stories == 8.5
    assert frontier.to_json() == record

    written = {"model": "m", "format": "gguf", "out": "m.gguf", "architecture": "llama",
               "outtype": "f16", "layers": 2, "bytes": 10, "stock_shape": True}
    export = ExportResult.from_json(written)
    assert (export.format, export.layers, export.bytes) == ("gguf", 2, 10)
    assert export.to_json() == written


def test_eval_is_a_recipe_with_no_steps_run_by_the_one_runner(tiny_dir, tmp_path, monkeypatch):
    import secateur.jobs as jobs
    from secateur.errors import SecateurError
    from secateur.recipe import EvalRecipe

    seen = []
    real = jobs.run_recipe

    def spy(recipe, *args, **kw):
        seen.append((recipe, kw["layout"]))
        return real(recipe, *args, **kw)

    monkeypatch.setattr(jobs, "run_recipe", spy)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out_json = tmp_path / "r.json"
    result = jobs.eval_job(str(tiny_dir("llama")), EvalSpec(str(text), 64, 2), out_json,
                           progress=False, device="cpu")
    ((recipe, layout),) = seen
    assert isinstance(recipe, EvalRecipe) and recipe.steps == []
    assert isinstance(layout, jobs.EvalJob) and not layout.saves
    assert json.loads(out_json.read_text()) == result.to_json()
    assert result.scored.tokens == 2 * 63 and result.where.device == "cpu"
    # only a command builds a recipe without steps: a written one still needs a step
    with pytest.raises(SecateurError, match="at least 1 item"):
        Recipe.from_yaml("model: m\nsteps: []\n")
    with pytest.raises(SecateurError, match="at most 0 items"):
        EvalRecipe(model="m", steps=[WandaConfig(sparsity=0.5)])


def test_a_recovery_handler_trains_with_the_contexts_checkpoint_and_step_callback(tmp_path):
    from secateur.methods import PruneContext, build_method
    from secateur.recovery.lora import LoRAConfig
    from tests.tiny_models import tiny_loaded

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    config = LoRAConfig(data=str(text), steps=4, seqlen=32, save_every=2, heldout_windows=1)
    loaded, steps = tiny_loaded("llama"), []
    # the handler itself, as run_step calls every recovery: no trainer picked by name
    summary = build_method(config).run(PruneContext(
        model=loaded.model, tokenizer=loaded.tokenizer, adapter=loaded.adapter,
        calibration=[], seed=0, progress=False, loaded=loaded, checkpoint=tmp_path / "ckpt",
        on_step=lambda step, loss: steps.append(step)))
    assert steps == [1, 2, 3, 4] and summary["steps"] == 4
    assert (tmp_path / "ckpt" / "state.safetensors").is_file()  # saved at step 2


def test_the_streamed_prune_is_a_one_step_recipe_whose_layout_runs_the_streamed_engine(
        tiny_dir, tmp_path, monkeypatch):
    import secateur.jobs as jobs
    from secateur.api import CalibrationConfig

    seen = []
    real = jobs.run_recipe

    def spy(recipe, *args, **kw):
        seen.append((recipe, kw["layout"]))
        return real(recipe, *args, **kw)

    monkeypatch.setattr(jobs, "run_recipe", spy)
    out, out_json = tmp_path / "s", tmp_path / "s.json"
    result = jobs.prune_streamed_job(str(tiny_dir("llama")), WandaConfig(sparsity=0.5),
                                     CalibrationConfig("c4-sample", 2, 32), out, out_json,
                                     progress=False, device="cpu")
    ((recipe, layout),) = seen
    assert [s.method for s in recipe.steps] == ["wanda"] and recipe.evaluate.perplexity == []
    assert isinstance(layout, jobs.StreamedPruneJob) and not layout.checks_packing
    # the step wrote the model; the record is what the streamed engine measured
    assert (out / "config.json").is_file() and result.run.peak_rss_mib > 0
    assert json.loads(out_json.read_text()) == result.to_json()
    assert result.bytes_on_disk > 0 and len(result.run.layers) == 3
