"""`--device`, `device=` and a recipe's `device:`: checked before any model loads, and on the
CPU bit-identical to a run without them. The few tests marked `needs CUDA` run where a GPU is
lent (scripts/gpu_check.sh); everything else runs on the CPU."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import secateur.formats.loader
import secateur.jobs
import secateur.recipe
from secateur.api import CalibrationConfig, prune, quantize
from secateur.cli import main
from secateur.config import ConfigError
from secateur.device import on_device, resolve_device
from secateur.engine.sequential import _on, prune_layerwise
from secateur.errors import SecateurError
from secateur.methods import build_method
from secateur.models import adapter_for
from secateur.models.loading import Loaded
from secateur.recipe import Recipe, run_recipe
from secateur.stats import ColumnSquares, Hessian
from tests.tiny_models import byte_tokenizer, make_step, tiny_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
CALIB = CalibrationConfig("wiki", nsamples=4, seqlen=32, seed=0)
W = ["--calib", "wiki", "--nsamples", "2", "--seqlen", "32", "--eval", "none"]


def tiny_loaded(seed: int = 0) -> Loaded:
    model = tiny_model("llama", seed)
    return Loaded(model, byte_tokenizer(), adapter_for(model), "llama", "")


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["secateur", *args])
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def _never_load(monkeypatch) -> None:
    def never(*_a, **_k):
        raise AssertionError("a model was loaded before the device was checked")

    for module in (secateur.jobs, secateur.recipe, secateur.formats.loader):
        monkeypatch.setattr(module, "load", never)


# -- refused early, in one line ----------------------------------------------------------------
COMMANDS = {
    "prune": ["prune", "M", "--method", "wanda", "--sparsity", "0.5", *W],
    "quantize": ["quantize", "M", "--method", "rtn", "--bits", "4", *W],
    "eval": ["eval", "M", "--data", "wiki"],
    "recover": ["recover", "M", "--method", "lora", "--steps", "1"],
    "distill": ["distill", "M", "--teacher", "T", "--steps", "1"],
    "sweep": ["sweep", "M", "--out", "sweep-out"],
    "prune --stream": ["prune", "M", "--method", "wanda", "--sparsity", "0.5", "--stream",
                       "--out", "o", *W],
}


@no_cuda
@pytest.mark.parametrize("name", list(COMMANDS))
def test_device_cuda_without_cuda_is_one_line_exit_2_before_loading(name, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _never_load(monkeypatch)
    code, lines = run_cli([*COMMANDS[name], "--device", "cuda"], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: no CUDA device:") and "--device cpu" in lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written either


@no_cuda
def test_a_recipe_on_cuda_without_cuda_is_refused_before_loading(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    _never_load(monkeypatch)
    (tmp_path / "r.yaml").write_text("model: M\ndevice: cuda\nsteps:\n"
                                     "  - {method: wanda, sparsity: 0.5}\n")
    code, lines = run_cli(["run", "r.yaml", "--out", "o"], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and "no CUDA device" in lines[0]
    # the flag overrides the recipe's field, in both directions
    (tmp_path / "r2.yaml").write_text("model: M\nsteps:\n  - {method: wanda, sparsity: 0.5}\n")
    code, lines = run_cli(["run", "r2.yaml", "--out", "o", "--device", "cuda:0"], monkeypatch,
                          capsys)
    assert code == 2 and len(lines) == 1 and "no CUDA device" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "CUDA", "cuda:-1", ""])
def test_a_misspelt_device_is_one_line_exit_2(bad, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _never_load(monkeypatch)
    code, lines = run_cli([*COMMANDS["prune"], "--device", bad], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1 and "auto, cpu, cuda or cuda:N" in lines[0]


def test_resolve_device_names_what_the_machine_has(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    # a machine with one GPU: cuda:0 is it, cuda:1 is named as missing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(SecateurError, match="no CUDA device 1: this machine has 1"):
        resolve_device("cuda:1")


def test_the_api_checks_the_device_before_touching_the_model(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded = tiny_loaded()
    before = copy.deepcopy(loaded.model.state_dict())
    with pytest.raises(SecateurError, match="no CUDA device"):
        prune(loaded, make_step(method="wanda", sparsity=0.5), CALIB, progress=False,
              device="cuda")
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, before[k])


# -- recipes -----------------------------------------------------------------------------------
def test_recipe_device_field_is_validated_and_round_trips():
    recipe = Recipe.from_yaml("model: m\ndevice: cuda:1\nsteps:\n  - {method: wanda, "
                              "sparsity: 0.5}\n")
    assert recipe.device == "cuda:1"
    assert Recipe.from_yaml(recipe.to_yaml()).device == "cuda:1"
    assert "device" not in Recipe.from_yaml("model: m\nsteps:\n  - {method: wanda, "
                                            "sparsity: 0.5}\n").to_dict()  # auto: the default
    with pytest.raises(ConfigError, match="device") as err:
        Recipe.from_yaml("model: m\ndevice: gpu\nsteps:\n  - {method: wanda, sparsity: 0.5}\n")
    assert "\n" not in str(err.value)


def test_a_recipe_resumes_on_another_device():
    """The device is where a run computes, not what it computes: not in the fingerprint."""
    steps = "steps:\n  - {method: wanda, sparsity: 0.5}\n"
    on_gpu = Recipe.from_yaml(f"model: m\ndevice: cuda\n{steps}")
    on_cpu = Recipe.from_yaml(f"model: m\ndevice: cpu\n{steps}")
    assert on_gpu.fingerprint() == on_cpu.fingerprint() == Recipe.from_yaml(
        f"model: m\n{steps}").fingerprint()


def test_recipe_run_with_device_cpu_records_it(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    recipe = Recipe.from_yaml(f"model: {src}\ndevice: cpu\ncalibration: {{source: wiki, "
                              "nsamples: 2, seqlen: 32}\nsteps:\n  - {method: wanda, "
                              "sparsity: 0.5}\n")
    result = run_recipe(recipe, tmp_path / "out", progress=False, say=lambda _m: None)
    assert result.steps[0].device == "cpu" and result.steps[0].peak_device_mib is None


# -- on the CPU nothing changes ----------------------------------------------------------------
STEPS = {
    "magnitude": dict(method="magnitude", sparsity=0.5),
    "wanda": dict(method="wanda", sparsity=0.5),
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5),
    "gptq": dict(method="gptq", bits=4, group_size=16),
    "rtn": dict(method="rtn", bits=4, group_size=16),
    "shortgpt": dict(method="shortgpt", layers=1, search_dtype="float32"),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_device_cpu_is_bit_identical_to_no_device(name):
    results = []
    for device in (None, "cpu", torch.device("cpu"), "auto"):
        if device == "auto" and CUDA:
            continue  # auto means the GPU there: compared in the CUDA tests
        loaded = tiny_loaded()
        config = make_step(**STEPS[name])
        verb = quantize if config.kind == "quantize" else prune
        run = verb(loaded, config, CALIB, progress=False, device=device)
        results.append((loaded.model.state_dict(), run.summary, run.layers))
    first_state, first_summary, first_layers = results[0]
    for state, summary, layers in results[1:]:
        assert state.keys() == first_state.keys()
        for k in state:
            assert torch.equal(state[k], first_state[k]), k
        assert summary.get("removed") == first_summary.get("removed")
        assert [r.get("relative_error") for r in layers] == [
            r.get("relative_error") for r in first_layers]


def test_cli_device_cpu_saves_the_same_weights_as_no_flag(tiny_dir, tmp_path, monkeypatch,
                                                          capsys):
    from safetensors.torch import load_file

    src = str(tiny_dir("llama"))
    monkeypatch.chdir(tmp_path)
    saved = []
    for extra in ([], ["--device", "cpu"]):
        out = tmp_path / f"out{len(saved)}"
        code, lines = run_cli(["prune", src, "--method", "sparsegpt", "--sparsity", "0.5", *W,
                               "--out", str(out), "--json", f"{out}.json", *extra],
                              monkeypatch, capsys)
        assert code == 0, lines
        saved.append(load_file(out / "model.safetensors"))
    assert saved[0].keys() == saved[1].keys()
    for k in saved[0]:
        assert torch.equal(saved[0][k], saved[1][k]), k
    import json

    assert json.loads((tmp_path / "out1.json").read_text())["device"] == "cpu"


# -- the engine's device path, exercised on the CPU --------------------------------------------
def test_engine_moves_each_layer_to_the_device_and_back(monkeypatch):
    """With an explicit device, each decoder layer is moved there just before its turn and
    back home after it, one at a time, and its statistics are gathered on it."""
    loaded = tiny_loaded()
    reference = tiny_loaded()
    moves: list[tuple[int, str]] = []
    index = {id(layer): i for i, layer in enumerate(loaded.adapter.layers)}
    original = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        if id(self) in index:
            moves.append((index[id(self)], str(args[0] if args else kwargs.get("device"))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    method = build_method(make_step(method="wanda", sparsity=0.5))
    windows = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    method.prepare(loaded.model, loaded.adapter, None)
    prune_layerwise(loaded.model, loaded.adapter, method, windows, progress=False,
                    device=torch.device("cpu"))
    n = loaded.adapter.num_layers
    assert moves == [(i, where) for i in range(n) for where in ("cpu", "cpu")]
    # and the same masks as the run that moves nothing
    monkeypatch.setattr(torch.nn.Module, "to", original)
    again = build_method(make_step(method="wanda", sparsity=0.5))
    again.prepare(reference.model, reference.adapter, None)
    prune_layerwise(reference.model, reference.adapter, again, windows, progress=False)
    for (k, a), b in zip(loaded.model.state_dict().items(),
                         reference.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_statistics_are_gathered_on_the_layers_device():
    # meta tensors have a device but no data: where the accumulators live is all that is seen
    for stat in (Hessian(8), ColumnSquares(8)):
        moved = _on(stat, torch.device("meta"))
        tensors = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
        assert tensors and all(t.device.type == "meta" for t in tensors)
        assert all(t.dtype in (torch.float32, torch.float64) for t in tensors)  # never lowered
    cpu = Hessian(8)
    assert _on(cpu, torch.device("cpu"))._sum.device.type == "cpu"


def test_on_device_puts_the_model_back_even_after_an_error():
    class Recording(torch.nn.Linear):
        moves: list[str] = []

        def to(self, *args, **kwargs):  # records where it is sent; stays where it is
            self.moves.append(str(args[0]))
            return self

    model = Recording(2, 2)
    with pytest.raises(RuntimeError), on_device(model, torch.device("cuda", 3)):
        raise RuntimeError("boom")
    assert model.moves == ["cuda:3", "cpu"]
    with on_device(model, torch.device("cpu")):  # its own device: nothing moves
        pass
    assert model.moves == ["cuda:3", "cpu"]


def test_perplexity_and_results_record_the_device():
    from secateur.data.sources import TextSource
    from secateur.eval.perplexity import perplexity

    loaded = tiny_loaded()
    text = TextSource("t", ["the quick brown fox " * 40], "test")
    a = perplexity(loaded.model, loaded.tokenizer, text, 32, 2, progress=False)
    b = perplexity(loaded.model, loaded.tokenizer, text, 32, 2, progress=False,
                   device=torch.device("cpu"))
    assert a.perplexity == b.perplexity and a.protocol.device == "cpu"


# -- on a GPU (scripts/gpu_check.sh) -----------------------------------------------------------
@needs_cuda
def test_cuda_layerwise_prune_matches_the_cpu_and_keeps_the_model_on_the_cpu():
    for name in ("wanda", "sparsegpt", "gptq"):
        cpu, gpu = tiny_loaded(), tiny_loaded()
        config = make_step(**STEPS[name])
        verb = quantize if config.kind == "quantize" else prune
        verb(cpu, config, CALIB, progress=False, device="cpu")
        run = verb(gpu, config, CALIB, progress=False, device="cuda")
        assert run.device.startswith("cuda") and run.peak_device_mib > 0
        assert all(p.device.type == "cpu" for p in gpu.model.parameters())
        for (k, a), b in zip(cpu.model.state_dict().items(), gpu.model.state_dict().values(),
                             strict=True):
            if name == "wanda":  # masks: a tie broken differently would be one weight
                assert ((a == 0) != (b == 0)).float().mean() < 1e-3, (name, k)
            else:
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (name, k)


@needs_cuda
def test_cuda_dense_perplexity_matches_the_cpu_in_fp32():
    from secateur.data.sources import TextSource
    from secateur.eval.perplexity import perplexity

    loaded = tiny_loaded()
    text = TextSource("t", ["the quick brown fox " * 80], "test")
    cpu = perplexity(loaded.model, loaded.tokenizer, text, 64, 4, progress=False)
    gpu = perplexity(loaded.model, loaded.tokenizer, text, 64, 4, progress=False,
                     device=torch.device("cuda"))
    assert gpu.protocol.device.startswith("cuda")
    assert abs(gpu.perplexity / cpu.perplexity - 1) < 1e-3
    assert next(loaded.model.parameters()).device.type == "cpu"


@needs_cuda
def test_cuda_shortgpt_and_lora_run_and_return_the_model_to_the_cpu():
    cpu, gpu = tiny_loaded(), tiny_loaded()
    step = make_step(method="shortgpt", layers=1, search_dtype="float32")
    a = prune(cpu, step, CALIB, progress=False, device="cpu").summary
    b = prune(gpu, step, CALIB, progress=False, device="cuda").summary
    assert a["removed"] == b["removed"]
    from secateur.api import recover

    run = recover(gpu, make_step(method="lora", steps=2, seqlen=32, data="wiki",
                                 heldout_windows=0), progress=False, device="cuda")
    assert run.device.startswith("cuda")
    assert all(p.device.type == "cpu" for p in gpu.model.parameters())
