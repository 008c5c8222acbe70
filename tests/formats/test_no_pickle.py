"""No file secateur reads can run code, and one --out belongs to one run at a time.

- The source never unpickles (`weights_only=False`, pickle, a `torch.load` without
  `weights_only=True`).
- A pickle planted in any checkpoint path secateur reads (a payload whose unpickling creates
  a marker file) never runs: it is ignored or refused in one line.
- A second run on a --out in use fails in under a second naming the first run's pid, and the
  first one finishes as if alone.
- A run resumed after an interrupt ends with the same tensors as an uninterrupted one, and one
  resumed with other settings is refused in one line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secateur.errors import SecateurError
from secateur.workdir import WORK
from tests.jobs.test_loading_and_cli import run_cli

ROOT = Path(__file__).resolve().parents[2]
CALIB = {"source": "c4-sample", "nsamples": 2, "seqlen": 32, "seed": 0}


# -- the source -------------------------------------------------------------------------------
FORBIDDEN = {
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "import pickle": re.compile(r"^\s*(?:import|from)\s+(?:c?pickle|dill|cloudpickle|joblib)\b",
                                re.M),
    "pickle.load": re.compile(r"\b(?:c?pickle|dill|joblib)\.loads?\s*\("),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "torch.load by another name": re.compile(r"from\s+torch(?:\.serialization)?\s+import\s+"
                                             r"[^\n]*\bload\b"),
    "read_pickle": re.compile(r"\bread_pickle\s*\("),
}


def _call_args(text: str, start: int) -> str:
    """The argument text of the call whose '(' is at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    return text[start + 1:]


def test_no_unpickling_in_the_source():
    found = []
    for path in sorted((ROOT / "secateur").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        found += [f"{where}: {name}" for name, rx in FORBIDDEN.items() if rx.search(text)]
        for m in re.finditer(r"torch\.load\s*\(", text):
            if not re.search(r"weights_only\s*=\s*True", _call_args(text, m.end() - 1)):
                found.append(f"{where}: torch.load( without weights_only=True")
    assert not found, "\n".join(found)


def test_the_source_check_sees_what_it_forbids():
    bad = ["torch.load(p, weights_only=False)", "import pickle", "from pickle import loads",
           "x = pickle.load(f)", "np.load(f, allow_pickle=True)", "from torch import load"]
    for line in bad:
        assert any(rx.search(line) for rx in FORBIDDEN.values()), line
    text = "m = torch.load(\n    path,\n    map_location='cpu')\n"
    assert "weights_only=True" not in _call_args(text, text.index("("))


# -- planted pickles ----------------------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant(path: Path, marker: Path, torch_format: bool = False) -> None:
    """A pickle at `path`: torch.save's zip layout for .pt/.bin names, else a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    if torch_format:
        torch.save(Payload(marker), path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


def test_the_planted_payload_is_live(tmp_path):
    marker = tmp_path / "ran"
    plant(tmp_path / "p.pt", marker, torch_format=True)
    torch.load(tmp_path / "p.pt", weights_only=False)  # what secateur used to do
    assert marker.exists()


def error_lines(err: str) -> list[str]:
    """What a command printed on stderr, less progress bars (tqdm's lines end in 'it/s]')."""
    return [line for line in err.replace("\r", "\n").splitlines()
            if line.strip() and "it/s]" not in line]


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text, text
    return text


@pytest.fixture
def model(tmp_path):
    from tests.tiny_models import save_tiny

    return str(save_tiny("llama", tmp_path / "tiny"))


def _recipe(model: str, steps: list[dict]):
    from secateur.recipe import Recipe

    return Recipe(model=model, calibration=CALIB, steps=steps)


def _interrupt_recipe(recipe, out: Path, monkeypatch, at_call: int) -> None:
    import secateur.recipe as recipe_mod

    real, calls = recipe_mod.run_step, {"n": 0}

    def dies(*args, **kw):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(recipe_mod, "run_step", dies)
    with pytest.raises(KeyboardInterrupt):
        recipe_mod.run_recipe(recipe, out, progress=False, say=lambda _: None)
    monkeypatch.setattr(recipe_mod, "run_step", real)


RECIPE_PLANTS = {
    # (planted path relative to --out, torch format, what happens)
    # never read; files secateur did not write may make a run refuse to resume there at all
    "old checkpoint": (".checkpoint/model.pt", True, "either"),
    "beside the saved step": (f"{WORK}/recipe/model.pt", True, "ignored"),
    "a .bin beside safetensors": (f"{WORK}/recipe/step-001/pytorch_model.bin", True, "ignored"),
    "the step's weights": (f"{WORK}/recipe/step-001/model.safetensors", False, "refused"),
    "the step's weights as .bin": (f"{WORK}/recipe/step-001/pytorch_model.bin", True,
                                   "refused"),
    "the commit point": (f"{WORK}/recipe/recipe.json", False, "refused"),
}


def test_planted_pickles_in_a_recipe_checkpoint_never_run(model, tmp_path, monkeypatch):
    from secateur.api import StepResult
    from secateur.recipe import run_recipe
    from secateur.results import RecipeResult

    recipe = _recipe(model, [{"method": "magnitude", "sparsity": 0.3},
                             {"method": "wanda", "sparsity": 0.5}])
    cut = tmp_path / "cut"
    _interrupt_recipe(recipe, cut, monkeypatch, at_call=2)
    assert (cut / WORK / "recipe" / "step-001" / "model.safetensors").is_file()
    for name, (rel, torch_format, outcome) in RECIPE_PLANTS.items():
        out, marker = tmp_path / name.replace(" ", "-"), tmp_path / f"ran-{name}"
        shutil.copytree(cut, out)
        if name == "the step's weights as .bin":
            (out / WORK / "recipe" / "step-001" / "model.safetensors").unlink()
        if rel.startswith(".checkpoint"):  # the old layout, with a matching fingerprint
            (out / ".checkpoint").mkdir()
            (out / ".checkpoint" / "secateur.json").write_text(json.dumps(
                RecipeResult(recipe=recipe.to_dict(),
                             steps=[StepResult("magnitude", "prune", {})]).to_dict()))
        plant(out / rel, marker, torch_format)
        try:
            result = run_recipe(recipe, out, progress=False, say=lambda _: None)
            assert outcome != "refused", name
            assert result.resumed_from_step == 1, name
        except SecateurError as err:
            assert outcome != "ignored", (name, err)
            assert "checkpoint" in one_line(err), name
        assert not marker.exists(), f"{name}: the planted pickle ran"


def test_planted_pickles_in_a_layer_checkpoint_never_run(tmp_path):
    from secateur.methods import SparseGPTConfig
    from tests.engine.test_engine_resume import Stop, run, stop_after, tiny_deep, windows

    calib, ckpt = windows(), tmp_path / "ckpt"
    with pytest.raises(Stop):
        run(tiny_deep(), SparseGPTConfig(sparsity=0.5), calib, ckpt, on_layer_done=stop_after(1))
    for name in ("layer-00000.safetensors", "hidden-00002.safetensors", "checkpoint.json"):
        copy, marker = tmp_path / f"c-{name}", tmp_path / f"ran-{name}"
        shutil.copytree(ckpt, copy)
        plant(copy / name, marker)
        with pytest.raises(SecateurError) as err:
            run(tiny_deep(), SparseGPTConfig(sparsity=0.5), calib, copy)
        assert "start over without --resume" in one_line(err.value), name
        assert not marker.exists(), name


def test_a_layer_written_by_another_run_is_never_mixed_in(tmp_path):
    """The issue's sparsegpt 0.5 / 0.7 on one --out: a layer of the 0.7 run in the 0.5 run's
    checkpoint is refused, so no mixed model is ever reported as 0.5."""
    from secateur.methods import SparseGPTConfig
    from tests.engine.test_engine_resume import Stop, run, stop_after, tiny_deep, windows

    calib, a, b = windows(), tmp_path / "a", tmp_path / "b"
    with pytest.raises(Stop):
        run(tiny_deep(), SparseGPTConfig(sparsity=0.5), calib, a, on_layer_done=stop_after(2))
    with pytest.raises(Stop):
        run(tiny_deep(), SparseGPTConfig(sparsity=0.7), calib, b, on_layer_done=stop_after(2))
    shutil.copy(b / "layer-00001.safetensors", a / "layer-00001.safetensors")
    with pytest.raises(SecateurError, match="layer-00001.safetensors was written by a run "
                                            "with other settings") as err:
        run(tiny_deep(), SparseGPTConfig(sparsity=0.5), calib, a)
    one_line(err.value)
    with pytest.raises(SecateurError, match="different method settings"):
        run(tiny_deep(), SparseGPTConfig(sparsity=0.5), calib, b)


@pytest.fixture
def text(tmp_path):
    from secateur.data.sources import load_text

    path = tmp_path / "text.txt"
    path.write_text(load_text("wiki").joined()[:12000])
    return str(path)


def _lora(text: str, **kw):
    from secateur.recovery.lora import LoRAConfig

    base = dict(data=text, steps=4, seqlen=32, lr=5e-3, warmup_steps=1, save_every=2, rank=4,
                seed=0, heldout_windows=2)
    return LoRAConfig(**{**base, **kw})


def _interrupted_lora(model: str, text: str, out: Path) -> None:
    from secateur.jobs import recover_job

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover_job(model, out, _lora(text), progress=False, on_step=interrupt)


def test_planted_pickles_in_a_training_checkpoint_never_run(model, text, tmp_path):
    from secateur.jobs import checkpoint_dir, recover_job

    cut = tmp_path / "cut"
    _interrupted_lora(model, text, cut)
    state = checkpoint_dir(cut, "lora") / "state.safetensors"
    assert state.is_file() and not list(tmp_path.glob(".cut*"))  # nothing beside --out
    # Where earlier versions kept it (beside --out) and a state.pt in the new place: ignored.
    ignored = tmp_path / "ignored"
    shutil.copytree(cut, ignored)
    marker = tmp_path / "ran-ignored"
    plant(tmp_path / ".ignored.lora-checkpoint" / "state.pt", marker, torch_format=True)
    plant(checkpoint_dir(ignored, "lora") / "state.pt", marker, torch_format=True)
    result = recover_job(model, ignored, _lora(text), progress=False)
    assert result.training.resumed_from == 2 and not marker.exists()
    # The state file itself replaced by a pickle: refused in one line.
    refused, marker = tmp_path / "refused", tmp_path / "ran-refused"
    shutil.copytree(cut, refused)
    plant(checkpoint_dir(refused, "lora") / "state.safetensors", marker)
    with pytest.raises(SecateurError, match="cannot be resumed") as err:
        recover_job(model, refused, _lora(text), progress=False)
    one_line(err.value)
    assert not marker.exists()


def test_planted_pickles_in_distillation_files_never_run(tmp_path, text):
    """Teacher completions and the teacher cache: a planted file is rebuilt, never read."""
    from secateur.formats.loader import load
    from secateur.recovery.distill import DistillConfig, distill
    from tests.recovery.test_distill import _depth_student
    from tests.tiny_models import save_tiny

    teacher = load(save_tiny("llama", tmp_path / "teacher"))
    config = DistillConfig(data=text, steps=2, seqlen=32, lr=1e-3, warmup_steps=0,
                           save_every=1, seed=0, heldout_windows=1, data_mode="teacher_generated",
                           prompt_tokens=8, teacher_cache="topk", topk=4)
    folder = tmp_path / "ckpt"
    reference = distill(_depth_student(teacher), teacher, config, folder, progress=False)
    marker = tmp_path / "ran"
    plant(folder / "generated.safetensors", marker)
    plant(folder / "generated.pt", marker, torch_format=True)
    plant(folder / "teacher-cache" / "logp.npy", marker)
    plant(folder / "state.safetensors", marker)  # a finished run's state, damaged: refused
    with pytest.raises(SecateurError, match="cannot be resumed"):
        distill(_depth_student(teacher), teacher, config, folder, progress=False)
    (folder / "state.safetensors").unlink()
    again = distill(_depth_student(teacher), teacher, config, folder, progress=False)
    assert not marker.exists()
    assert again.losses == reference.losses  # completions and cache rebuilt the same


# -- one run per --out ---------------------------------------------------------------------------
HOLD = """
import sys
from pathlib import Path
from secateur.workdir import WorkDir
work = WorkDir(Path(sys.argv[1])).acquire()
print("ready", flush=True)
sys.stdin.read()
work.release()
"""


@pytest.fixture
def held(tmp_path):
    """Factory: --out folders held by a live process (as a running job holds them)."""
    procs = []

    def hold(out: Path) -> int:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc.pid

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_run_on_an_out_in_use_fails_at_once_naming_the_pid(model, text, tmp_path,
                                                                    held, monkeypatch, capsys):
    import secateur.jobs
    import secateur.recipe
    import secateur.recovery.distill
    import secateur.recovery.lora
    import secateur.sweep  # noqa: F401 (imported before the timed calls)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(model, [{"method": "magnitude", "sparsity": 0.5}]).to_yaml())
    flags = ["--calib", "c4-sample", "--nsamples", "2", "--seqlen", "32", "--eval", "none"]
    commands = {
        "run": ["run", recipe],
        "prune": ["prune", model, "--method", "sparsegpt", "--sparsity", "0.7", *flags,
                  "--resume"],
        "quantize": ["quantize", model, "--method", "rtn", "--bits", "4", "--group-size", "32",
                     *flags],
        "stream": ["prune", model, "--method", "wanda", "--sparsity", "0.5", *flags,
                   "--stream"],
        "recover": ["recover", model, "--lora", "--data", text, "--eval", "none"],
        "distill": ["distill", model, "--teacher", model, "--data", text, "--eval", "none"],
        "sweep": ["sweep", model, "--methods", "magnitude", "--sparsities", "0.5", *flags],
    }
    for name, args in commands.items():
        out = tmp_path / f"out-{name}"
        pid = held(out)
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        start = time.perf_counter()
        code, _, err = run_cli(monkeypatch, capsys, *args, "--out", out)
        seconds = time.perf_counter() - start
        assert code == 2, (name, err)
        assert len(error_lines(err)) == 1, (name, err)
        assert f"in use by a running secateur (pid {pid})" in err, (name, err)
        assert "delete" not in err and "remove" not in err, (name, err)
        assert seconds < 1.0, (name, seconds)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, name


CLI = [sys.executable, "-m", "secateur.cli"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_two_runs_on_one_out_one_finishes_as_if_alone(model, tmp_path, monkeypatch):
    """A real second `secateur run` started while the first is inside its second step."""
    import secateur.recipe as recipe_mod

    recipe = _recipe(model, [{"method": "magnitude", "sparsity": 0.3},
                             {"method": "sparsegpt", "sparsity": 0.5}])
    solo = recipe_mod.run_recipe(recipe, tmp_path / "solo", progress=False, say=lambda _: None)
    yaml = tmp_path / "r.yaml"
    yaml.write_text(recipe.to_yaml())
    out, real, second = tmp_path / "out", recipe_mod.run_step, {}

    def step(*args, **kw):
        if len(second) == 0 and (out / WORK / "recipe" / "recipe.json").is_file():
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            second["proc"] = subprocess.run([*CLI, "run", str(yaml), "--out", str(out)],
                                            cwd=tmp_path, env=env, capture_output=True,
                                            text=True, timeout=300)
        return real(*args, **kw)

    monkeypatch.setattr(recipe_mod, "run_step", step)
    first = recipe_mod.run_recipe(recipe, out, progress=False, say=lambda _: None)
    proc = second["proc"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(error_lines(proc.stderr)) == 1, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr
    a, b = _tensors(tmp_path / "solo" / "model"), _tensors(out / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.steps[-1].layers == solo.steps[-1].layers
    assert not (out / WORK).exists()


# -- resume ------------------------------------------------------------------------------------
RESUMED = {
    # steps, and where the interrupt lands (the n-th step started, or the final save)
    "width then gptq, killed while saving": (
        [{"method": "llm-pruner", "ratio": 0.25},
         {"method": "gptq", "bits": 4, "group_size": 16, "act_order": True,
          "static_groups": True}], "save"),
    "wanda then w8a8, killed while saving": (
        [{"method": "wanda", "sparsity": 0.5}, {"method": "w8a8", "smoothquant_alpha": 0.5}],
        "save"),
    "rtn then magnitude, killed in magnitude": (
        [{"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
         {"method": "magnitude", "sparsity": 0.25}], 2),
    "shortgpt then lora then wanda, killed in wanda": (
        [{"method": "shortgpt", "layers": 1}, {"method": "lora", "steps": 2, "seqlen": 32},
         {"method": "wanda", "sparsity": 0.5}], 3),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_resumed_recipe_ends_with_the_tensors_of_an_uninterrupted_one(name, model, tmp_path,
                                                                        monkeypatch):
    import secateur.recipe as recipe_mod

    steps, at = RESUMED[name]
    recipe = _recipe(model, steps)
    whole = recipe_mod.run_recipe(recipe, tmp_path / "whole", progress=False,
                                  say=lambda _: None)
    cut = tmp_path / "cut"
    if at == "save":
        real = recipe_mod._save

        def dies(*args, **kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(recipe_mod, "_save", dies)
        with pytest.raises(KeyboardInterrupt):
            recipe_mod.run_recipe(recipe, cut, progress=False, say=lambda _: None)
        monkeypatch.setattr(recipe_mod, "_save", real)
    else:
        _interrupt_recipe(recipe, cut, monkeypatch, at_call=at)
    resumed = recipe_mod.run_recipe(recipe, cut, progress=False, say=lambda _: None)
    assert resumed.resumed_from_step == (len(steps) if at == "save" else at - 1)
    a, b = _tensors(tmp_path / "whole" / "model"), _tensors(cut / "model")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    config = [json.loads((d / "model" / "config.json").read_text()) for d in
              (tmp_path / "whole", cut)]
    assert config[0] == config[1]
    assert whole.final.parameters == resumed.final.parameters
    assert not (cut / WORK).exists()


def test_prune_resume_with_other_settings_is_refused_and_a_fresh_run_is_clean(model, tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
    """sparsegpt 0.7 killed midway, then 0.5 --resume on the same --out: refused in one line;
    0.5 without --resume starts afresh and saves what a solo 0.5 run saves."""
    from secateur.engine import checkpoint as ckpt_mod

    flags = ["--calib", "c4-sample", "--nsamples", "2", "--seqlen", "32", "--eval", "none"]
    real, calls = ckpt_mod.LayerCheckpoint.save, {"n": 0}

    def dies(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(ckpt_mod.LayerCheckpoint, "save", dies)
    try:  # as a kill after the first layer: nothing after it runs
        code, _, err = run_cli(monkeypatch, capsys, "prune", model, "--method", "sparsegpt",
                               "--sparsity", "0.7", *flags, "--out", out)
        assert code != 0, err
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(ckpt_mod.LayerCheckpoint, "save", real)
    assert (out / WORK / "layers" / "checkpoint.json").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "prune", model, "--method", "sparsegpt",
                           "--sparsity", "0.5", *flags, "--out", out, "--resume")
    assert code == 2 and len(error_lines(err)) == 1, repr(err)
    assert "different method settings" in err and "without --resume" in err
    for args in ([], ["--resume"]):  # afresh; then a rerun of the finished one is refused
        code, _, err = run_cli(monkeypatch, capsys, "prune", model, "--method", "sparsegpt",
                               "--sparsity", "0.5", *flags, "--out", out, *args)
        assert code == (0 if not args else 2), err
    code, _, err = run_cli(monkeypatch, capsys, "prune", model, "--method", "sparsegpt",
                           "--sparsity", "0.5", *flags, "--out", tmp_path / "solo")
    assert code == 0, err
    a, b = _tensors(tmp_path / "solo"), _tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / WORK).exists()
