"""Recipes: YAML round trip, every shipped recipe on a tiny model, resume, bad recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from secateur.config import ConfigError
from secateur.errors import SecateurError
from secateur.recipe import Recipe, run_recipe
from tests.reload import reload_one

RECIPES = sorted(Path(__file__).parents[2].joinpath("recipes").glob("*.yaml"))
SMALL_CALIB = {"source": "c4-sample", "nsamples": 2, "seqlen": 32, "seed": 0}
SMALL_EVAL = {"perplexity": [{"data": "wiki", "seqlen": 32, "max_windows": 2}],
              "after_each_step": True}


def shrink(path: Path, model: str) -> Recipe:
    """The shipped recipe's steps on a tiny model, with seconds-long settings."""
    data = yaml.safe_load(path.read_text())
    for step in data["steps"]:
        if step["method"] in ("lora", "distill", "dwq"):
            step.update(steps=2, seqlen=32)
        if step["method"] == "gptq":
            step.update(group_size=32)  # tiny widths are multiples of 32, not 128
    data.update(model=model, calibration=SMALL_CALIB, evaluate=SMALL_EVAL)
    return Recipe(**data)


def test_yaml_keeps_nm_patterns_and_numbers_as_written():
    recipe = Recipe.from_yaml("model: m\nsteps:\n  - {method: wanda, nm: 2:4}\n"
                              "  - {method: lora, lr: 1e-4, steps: 3}\n")
    assert recipe.steps[0].nm == "2:4"  # YAML 1.1 would read 2:4 as the base-60 number 124
    assert recipe.steps[1].lr == 1e-4 and recipe.steps[1].steps == 3
    assert Recipe.from_yaml(recipe.to_yaml()).steps[0].nm == "2:4"


def test_every_shipped_recipe_round_trips_through_yaml():
    assert len(RECIPES) >= 5
    for path in RECIPES:
        recipe = Recipe.load(path)
        again = Recipe.from_yaml(recipe.to_yaml())
        assert again.to_dict() == recipe.to_dict()
        assert [type(s) for s in again.steps] == [type(s) for s in recipe.steps]


@pytest.mark.reload
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_runs_on_a_tiny_model_and_reloads_without_secateur(path, tiny_dir,
                                                                          tmp_path):
    gguf = "gguf" in {s["method"] for s in yaml.safe_load(path.read_text())["steps"]}
    if gguf:  # llama.cpp's tokenizer needs BPE merges, which the byte tokenizer lacks
        from tests.formats.test_export import save, tiny_llama

        model = str(save(tiny_llama(0, tied=True), tmp_path / "bpe-tiny"))
    else:
        model = str(tiny_dir("llama"))
    recipe = shrink(path, model)
    out = tmp_path / "run"
    result = run_recipe(recipe, out, progress=False, say=lambda _: None)
    saved = json.loads((out / "result.json").read_text())
    assert [s["method"] for s in saved["steps"]] == [s.method for s in recipe.steps]
    assert saved["recipe"] == recipe.to_dict()
    assert all(s["perplexity"] > 1 for s in saved["steps"])  # after_each_step
    assert saved["dense"]["perplexity"][0]["protocol"]["seqlen"] == 32
    assert not (out / ".secateur-work").exists()  # checkpoints and lock gone
    dense, final = result.dense.parameters, result.final.parameters
    methods = {s.method for s in recipe.steps}
    if methods & {"llm-pruner", "shortgpt"}:
        assert final["parameters"] < dense["parameters"]
    if "wanda" in methods:
        assert final["nonzero"] < 0.8 * final["parameters"]
    if gguf:  # the runtime it is for loads it: llama.cpp
        from secateur.runtime.llama_cpp import perplexity

        assert result.final.format == "gguf"
        ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119]])
        assert perplexity(out / "model" / "model.gguf", [ids])["perplexity"] > 1
        return
    got = reload_one(out / "model", [[1, 2, 3, 4, 5, 6]], tmp_path)
    assert torch.isfinite(torch.tensor(got["logits"])).all()


def interrupt_at_step(recipe: Recipe, out: Path, monkeypatch, step: int) -> None:
    """Run `recipe` into `out` with a Ctrl-C as step `step` (1-based) starts."""
    import secateur.recipe as recipe_mod

    real = recipe_mod.run_step
    calls = {"n": 0}

    def dies(*args, **kw):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(recipe_mod, "run_step", dies)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, progress=False, say=lambda _: None)
    monkeypatch.setattr(recipe_mod, "run_step", real)


def test_interrupted_recipe_resumes_from_the_last_finished_step(tiny_dir, tmp_path,
                                                                monkeypatch):
    recipe = Recipe(model=str(tiny_dir("llama")), calibration=SMALL_CALIB,
                    steps=[{"method": "magnitude", "sparsity": 0.3},
                           {"method": "lora", "steps": 2, "seqlen": 32},
                           {"method": "wanda", "sparsity": 0.5}],
                    evaluate={"perplexity": [{"data": "wiki", "seqlen": 32, "max_windows": 2}]})
    whole = run_recipe(recipe, tmp_path / "whole", progress=False, say=lambda _: None)

    interrupt_at_step(recipe, tmp_path / "cut", monkeypatch, 3)
    assert (tmp_path / "cut" / ".secateur-work" / "recipe" / "recipe.json").is_file()
    assert not (tmp_path / "cut" / "result.json").exists()
    resumed = run_recipe(recipe, tmp_path / "cut", progress=False, say=lambda _: None)
    assert resumed.resumed_from_step == 2
    assert [s.method for s in resumed.steps] == ["magnitude", "lora", "wanda"]
    a = json.loads((tmp_path / "whole" / "result.json").read_text())
    b = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert a["final"]["perplexity"][0]["perplexity"] == b["final"]["perplexity"][0]["perplexity"]
    assert a["final"]["parameters"] == b["final"]["parameters"]
    assert whole.final.parameters["nonzero"] == resumed.final.parameters["nonzero"]


@pytest.mark.usefixtures("one_thread")
def test_an_interrupted_gguf_recipe_resumes_after_its_rounding_with_the_same_bytes(tmp_path,
                                                                                  monkeypatch):
    """The checkpoint after a gguf step holds the block codes (formats.ggml_blocks): the
    resumed run does not round again, and its GGUF is byte for byte the uninterrupted one's."""
    import hashlib

    from tests.formats.test_export import save, tiny_llama

    model = str(save(tiny_llama(0, tied=True), tmp_path / "bpe-tiny"))
    recipe = Recipe(model=model, calibration=SMALL_CALIB,
                    steps=[{"method": "gguf", "preset": "q4_k_m"},
                           {"method": "dwq", "steps": 2, "seqlen": 32}])
    run_recipe(recipe, tmp_path / "whole", progress=False, say=lambda _: None)
    interrupt_at_step(recipe, tmp_path / "cut", monkeypatch, 2)
    resumed = run_recipe(recipe, tmp_path / "cut", progress=False, say=lambda _: None)
    assert resumed.resumed_from_step == 1 and resumed.final.format == "gguf"
    sha = [hashlib.sha256((tmp_path / d / "model" / "model.gguf").read_bytes()).hexdigest()
           for d in ("whole", "cut")]
    assert sha[0] == sha[1]


def test_a_different_recipe_does_not_resume_another_ones_checkpoint(tiny_dir, tmp_path,
                                                                    monkeypatch):
    recipe = shrink(Path("recipes/iterative-wanda-lora.yaml").resolve(),
                    str(tiny_dir("llama")))
    interrupt_at_step(recipe, tmp_path / "cut", monkeypatch, 2)
    other = Recipe(**{**recipe.to_dict(), "steps": [{"method": "magnitude", "sparsity": 0.3}]})
    with pytest.raises(SecateurError, match="checkpoint of a different recipe"):
        run_recipe(other, tmp_path / "cut", progress=False, say=lambda _: None)


@pytest.mark.parametrize("text, message", [
    ("model: m\nsteps: []\n", "Recipe.steps: List should have at least 1 item"),
    ("model: m\n", "Recipe.steps: Field required"),
    ("model: m\nsteps:\n  - {method: prunemore, sparsity: 0.5}\n",
     "step 1: unknown method 'prunemore'"),
    ("model: m\nsteps:\n  - {method: wanda, sparsity: 0.5, ratio: 0.2}\n",
     "step 1: WandaConfig.ratio: not a field of this method"),
    ("model: m\nsteps:\n  - {method: wanda, sparsty: 0.5}\n",
     "step 1: WandaConfig.sparsty: not a field"),
    ("model: m\nsteps:\n  - {method: wanda, sparsity: half}\n",
     "WandaConfig.sparsity: Input should be a valid number"),
    ("model: m\nsteps:\n  - {method: wanda, sparsity: 1.5}\n",
     "WandaConfig.sparsity: Input should be less than 1"),
    ("model: m\nsteps:\n  - {sparsity: 0.5}\n", "needs a 'method' key"),
    ("model: m\ncalibration: {nsamples: 0}\nsteps:\n  - {method: wanda, sparsity: 0.5}\n",
     "CalibrationConfig.nsamples: Input should be greater than or equal to 1"),
    ("model: m\nsteps:\n  - {method: wanda, sparsity: 0.5}\ncolour: red\n",
     "Recipe.colour: not a field"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ("model: [unclosed\n", "not a YAML recipe"),
])
def test_bad_recipes_fail_on_one_line_before_any_work(text, message):
    with pytest.raises((ConfigError, SecateurError), match=message) as err:
        Recipe.from_yaml(text)
    assert "\n" not in str(err.value)


def test_run_command_end_to_end_and_bad_recipe_exit_2(tiny_dir, tmp_path):
    recipe = shrink(Path("recipes/wanda-50.yaml").resolve(), str(tiny_dir("llama")))
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    exe = Path(sys.executable).parent / "secateur"
    proc = subprocess.run([str(exe), "run", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "model" / "config.json").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nsteps:\n  - {method: wanda, nm: 2:4, owl: true}\n")
    proc = subprocess.run([str(exe), "run", str(bad), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not combine" in proc.stderr
    assert not (tmp_path / "o2").exists()


def test_recipe_bench_compares_dense_and_the_packed_output_on_the_int4_runtime(tiny_dir,
                                                                               tmp_path):
    recipe = Recipe(model=str(tiny_dir("llama")), calibration=SMALL_CALIB,
                    steps=[{"method": "wanda", "sparsity": 0.5},
                           {"method": "rtn", "bits": 4, "group_size": 32}],
                    evaluate={"perplexity": [{"data": "wiki", "seqlen": 32, "max_windows": 2}]},
                    bench={"lengths": [16], "decode_tokens": 4, "repeats": 1, "threads": 1})
    result = run_recipe(recipe, tmp_path / "o", progress=False, say=lambda _: None)
    bench = result.final.bench
    assert result.final.format == "compressed-tensors" and bench["runtime"] == "int4"
    dense, packed = (bench["models"][k] for k in (recipe.model, str(tmp_path / "o" / "model")))
    assert packed["bytes_on_disk"] < 0.5 * dense["bytes_on_disk"]
    assert packed["decode"]["weight_bytes_per_token"] < dense["decode"]["weight_bytes_per_token"]
