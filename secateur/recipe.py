"""Recipes: a model, its calibration, a list of steps and the evaluations, as data.

    model: smollm2-135m
    calibration: {source: c4-sample, nsamples: 32, seqlen: 512, seed: 0}
    steps:
      - {method: llm-pruner, ratio: 0.2}
      - {method: lora, steps: 200}
      - {method: wanda, sparsity: 0.5}
    evaluate:
      perplexity: [{data: wiki, seqlen: 512, max_windows: 64}]
      after_each_step: true

`run_recipe` runs the steps in order on one model in memory. After every step the model is
saved as secateur saves any output (compressed-tensors pack-quantized once a step quantized,
else Hugging Face safetensors, per-layer widths included) with the results so far as JSON, in
the output folder's working folder (`secateur.workdir`, locked while the run lives). An
interrupted run resumes from the last finished step when started again with the same recipe:
the model comes back through the same loaders as any saved model, nothing is unpickled. The
result JSON holds the recipe itself, every step's record and the evaluation protocol.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from secateur.api import CalibrationConfig, StepResult, peak_rss_mib, run_step
from secateur.config import Config, ConfigError, MethodConfig
from secateur.device import check_spelling, resolve_device
from secateur.errors import SecateurError
from secateur.eval.config import PerplexityConfig, ZeroShotConfig
from secateur.eval.perplexity import PerplexityResult
from secateur.formats.loader import load
from secateur.inputs import check_step_order, check_yaml_size, path_values, read_recipe_text
from secateur.io import dir_bytes, mark_output, write_json_atomic
from secateur.jobs import SaveFormat, output_format, save_output
from secateur.models.loading import DTYPES, Loaded
from secateur.outputs import check_run_folder, model_bytes
from secateur.params import count_parameters
from secateur.registry import make_config
from secateur.results import Measured, RecipeResult
from secateur.workdir import WORK, WorkDir, check_free


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: `nm: 2:4` must stay "2:4", not become 124."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*"
               r"[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
               r"|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class Evaluation(Config):
    """What to measure on the dense model and after the recipe (and after each step)."""

    perplexity: list[PerplexityConfig] = Field(default_factory=list)
    zeroshot: ZeroShotConfig | None = None
    after_each_step: bool = Field(False, description="Perplexity (first text) after every "
                                                     "step, recorded with the step.")


class BenchSettings(Config):
    """Dense vs the saved output, measured interleaved after the recipe (secateur.bench)."""

    lengths: tuple[int, ...] = Field((128,), min_length=1, description="Prefill lengths.")
    decode_tokens: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)
    threads: int | None = Field(None, ge=1)
    # auto: int4 for a 4-bit output, int8 for 8-bit, else the weights as transformers loads them
    runtime: Literal["auto", "int4", "int8", "none"] = "auto"
    # the runtime's lm_head: as stored, or rounded to int8 per row (secateur.runtime.head)
    head: Literal["float16", "int8"] = "float16"

    @model_validator(mode="after")
    def _head_needs_runtime(self) -> BenchSettings:
        if self.head != "float16" and self.runtime == "none":
            raise ValueError("bench.head int8 rounds a runtime's lm_head: set bench.runtime")
        return self


class Recipe(Config):
    model: str = Field(min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # where the steps and evaluations compute (secateur.device); `secateur run --device`
    # overrides it. Not part of what a resumed run must match: a run may resume elsewhere.
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda "
                                            "or cuda:N.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    steps: list[MethodConfig] = Field(min_length=1)
    evaluate: Evaluation = Field(default_factory=Evaluation)
    # auto: compressed-tensors pack-quantized when a step quantized, else safetensors
    save_format: SaveFormat = "auto"
    bench: BenchSettings | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_spelling(value)  # a machine without CUDA is refused when the run starts

    @field_validator("bench", mode="before")
    @classmethod
    def _bench(cls, value: Any) -> Any:
        return BenchSettings() if value is True else None if value is False else value

    @model_validator(mode="after")
    def _head_needs_quantized_output(self) -> Recipe:
        if (self.bench is not None and self.bench.head != "float16"
                and self.bench.runtime == "auto"
                and not any(s.kind == "quantize" for s in self.steps)):
            raise ValueError("bench.head int8 rounds a runtime's lm_head, and no step "
                             "quantizes (so no runtime runs): drop bench.head or add a "
                             "quantize step")
        return self

    @model_validator(mode="after")
    def _steps_in_order(self) -> Recipe:
        check_step_order(self.steps)  # known now, not after the earlier steps ran
        return self

    @field_validator("calibration", mode="before")
    @classmethod
    def _calibration(cls, value: Any) -> Any:
        return CalibrationConfig(**value) if isinstance(value, dict) else value

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        steps = []
        for i, step in enumerate(value):
            if isinstance(step, MethodConfig):
                steps.append(step)
                continue
            try:
                steps.append(make_config(step))
            except SecateurError as err:
                raise ValueError(f"step {i + 1}: {err}") from None
        return steps

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"steps"}, exclude_defaults=True)
        data["model"] = self.model
        data["steps"] = [s.to_dict() for s in self.steps]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        check_yaml_size(text, _Loader)  # an alias bomb is refused before it expands
        try:
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
        except yaml.YAMLError as err:
            raise SecateurError(f"not a YAML recipe: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise SecateurError("a recipe is a YAML mapping with model, steps (and optionally "
                                "calibration, evaluate, dtype, save_format)")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.is_file():
            raise SecateurError(f"recipe '{path}' does not exist or is not a file")
        return cls.from_yaml(read_recipe_text(path))

    def fingerprint(self) -> str:
        return _fingerprint(self.to_dict())


def _fingerprint(recipe: dict[str, Any]) -> str:
    """What a resumed run must share with the interrupted one: all but the device."""
    return json.dumps({k: v for k, v in recipe.items() if k != "device"}, sort_keys=True)


CHECKPOINT = "recipe"  # in --out's working folder (secateur.workdir)
STATE = "recipe.json"  # the commit point: the results so far and which model folder is current
_MODEL = re.compile(r"^step-\d{3,}$")


def _save_checkpoint(folder: Path, loaded: Loaded, result: RecipeResult) -> None:
    """The model after step n in `step-00n/` as secateur saves outputs, then recipe.json naming
    it (replaced last, so a kill at any instant leaves the previous step or this one), then
    the previous step's folder goes."""
    from secateur.quant.ggml import ggml_states
    from secateur.quant.state import is_quantized

    if ggml_states(loaded.model):
        # llama.cpp's block codes live beside the weights, not in a format this checkpoint
        # reloads: a resumed run redoes the rounding step rather than lose its codes
        return
    name = f"step-{len(result.steps):03d}"
    shutil.rmtree(folder / name, ignore_errors=True)  # a kill's leftover, never committed
    if is_quantized(loaded.model):
        from secateur.formats.packed_save import save_packed

        # the model's own dtype for the unquantized tensors: the model comes back exactly
        save_packed(loaded.model, loaded.tokenizer, folder / name, keep_dtype=None)
    else:
        from secateur.formats.hf import save_model

        save_model(loaded.model, loaded.tokenizer, folder / name)
    write_json_atomic(folder / STATE, {"model": name, "result": result.to_dict()})
    for old in folder.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, recipe: Recipe) -> tuple[Loaded, RecipeResult] | None:
    """The model and results after the last finished step, or None; the recipe is compared
    before the model is read."""
    path = folder / STATE
    if not path.is_file():
        return None
    damaged = f"the checkpoint in '{folder}' is damaged"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        result = RecipeResult.from_dict(state["result"])
        name = state["model"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SecateurError(f"{damaged} ({type(err).__name__}): pass --overwrite to start "
                            "afresh") from None
    if _fingerprint(result.recipe) != recipe.fingerprint():
        raise SecateurError(f"'{folder.parent.parent}' holds a checkpoint of a different "
                            "recipe: use another --out, or --overwrite to start afresh")
    if not (isinstance(name, str) and _MODEL.match(name) and (folder / name).is_dir()):
        raise SecateurError(f"{damaged} (no model folder '{name}'): pass --overwrite to start "
                            "afresh")
    try:
        from secateur.formats.packed_load import ct_quantization_config, load_quantized

        if ct_quantization_config(folder / name) is not None:
            loaded = load_quantized(folder / name, recipe.dtype)
        else:
            loaded = load(folder / name, dtype=recipe.dtype)
    except SecateurError as err:
        raise SecateurError(f"{damaged} ({err}): pass --overwrite to start afresh") from None
    return loaded, result


def _clear_for_overwrite(out: Path) -> None:
    """--overwrite: remove the earlier output, keeping the working folder whose lock this run
    holds (deleting the lock file would let a second run take a lock of its own)."""
    for entry in out.iterdir():
        if entry.name == WORK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _perplexity(loaded: Loaded, config: PerplexityConfig, progress: bool,
                device: torch.device | None = None) -> PerplexityResult:
    from secateur.eval.api import evaluate

    return evaluate(loaded, config, progress=progress, device=device)


def _evaluate(loaded: Loaded, evaluation: Evaluation, progress: bool,
              first: PerplexityResult | None = None,
              device: torch.device | None = None) -> Measured:
    """`first`: the first text's result when it was just measured on this very model."""
    from secateur.eval.api import evaluate

    out = Measured([first if i == 0 and first is not None
                    else _perplexity(loaded, p, progress, device)
                    for i, p in enumerate(evaluation.perplexity)],
                   count_parameters(loaded.model))
    if evaluation.zeroshot is not None:
        out.zeroshot = evaluate(loaded, evaluation.zeroshot, progress=progress,
                                device=device).to_dict()
    return out


def _teacher_loader(recipe: Recipe) -> Any:
    cache: dict[str, Loaded] = {}

    def teacher() -> Loaded:
        if "t" not in cache:
            cache["t"] = load(recipe.model, dtype=recipe.dtype)
        return cache["t"]

    return teacher


def _save(loaded: Loaded, recipe: Recipe, target: Path, metadata: dict[str, Any]) -> str:
    fmt = output_format(loaded.model, recipe.save_format)
    if fmt == "gguf":  # one .gguf file in the model folder, with the run's record beside it
        preset = [s for s in recipe.steps if s.method == "gguf"][-1].preset
        target.mkdir(parents=True, exist_ok=True)
        save_output(loaded, fmt, target / "model.gguf", metadata, overwrite=True,
                    gguf_preset=preset, name=recipe.model)
        write_json_atomic(target / "result.json", metadata)
        mark_output(target)  # a later --overwrite may replace what is in it
    else:
        save_output(loaded, fmt, target, metadata, overwrite=True)
    return fmt


RUN_FILES = ("recipe.yaml", "model", "result.json")  # what a run writes in its --out


def run_recipe(recipe: Recipe, out: Path, overwrite: bool = False, progress: bool = True,
               say: Any = print, inputs: Iterable[str | Path] = (),
               device: str | None = None) -> RecipeResult:
    """Run every step in order, checkpointing after each; resume from a checkpoint in `out`.

    `inputs`: paths the run reads besides those the recipe names (the recipe file itself),
    which `out` may not be, hold or replace. `device` overrides the recipe's own."""
    out = Path(out)
    if recipe.dtype not in DTYPES:
        raise ConfigError(f"Recipe.dtype: one of {', '.join(DTYPES)}")
    dev = resolve_device(recipe.device if device is None else device)  # before any loading
    check_free(out)  # a second run on this --out fails here, in one line naming the first
    work = WorkDir(out)
    resumable = (work.folder(CHECKPOINT) / STATE).is_file()
    # every --out rule (secateur.outputs): an earlier output is replaced only if secateur
    # wrote all of it, never the current folder or one holding an input
    from secateur.config import quantizes

    replace = check_run_folder(
        out, overwrite, [*inputs, *path_values(recipe.to_dict())], resumable,
        None if any(quantizes(s) for s in recipe.steps) else model_bytes(recipe.model))
    with work:
        return _run_locked(recipe, out, work, replace and overwrite, resumable, progress, say,
                           dev)


def _run_locked(recipe: Recipe, out: Path, work: WorkDir, clear: bool, resumable: bool,
                progress: bool, say: Any, device: torch.device | None = None) -> RecipeResult:
    checkpoint = work.folder(CHECKPOINT)
    start = time.perf_counter()
    loaded = load(recipe.model, dtype=recipe.dtype)
    if recipe.save_format in ("auto", "compressed-tensors"):
        from secateur.config import quantizes
        from secateur.formats.packed_save import check_packable

        if any(quantizes(step) for step in recipe.steps):  # before anything is written
            check_packable(loaded.adapter)
    if clear:
        _clear_for_overwrite(out)
        resumable = False
    if not resumable:
        work.discard(CHECKPOINT)  # steps saved but never committed: start afresh
    restored = _load_checkpoint(checkpoint, recipe) if resumable else None
    if restored is not None:
        saved, result = restored
        loaded.model, loaded.adapter = saved.model, saved.adapter
        result.resumed_from_step = len(result.steps)
        say(f"resuming after step {len(result.steps)} of {len(recipe.steps)}")
    else:
        result = RecipeResult(recipe=recipe.to_dict())
        result.dense = _evaluate(loaded, recipe.evaluate, progress, device=device)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
        mark_output(out, RUN_FILES)  # what a later --overwrite may replace
    teacher = _teacher_loader(recipe)
    first_ppl = recipe.evaluate.perplexity[0] if recipe.evaluate.perplexity else None
    last: PerplexityResult | None = None  # the first text's result after the latest step
    for i in range(len(result.steps), len(recipe.steps)):
        step = recipe.steps[i]
        say(f"step {i + 1}/{len(recipe.steps)}: {step.method}")
        record: StepResult = run_step(loaded, step, recipe.calibration, teacher=teacher,
                                      progress=progress, device=device)
        last = None
        if recipe.evaluate.after_each_step and first_ppl is not None:
            last = _perplexity(loaded, first_ppl, progress, device)
            record.perplexity = last.perplexity
        result.steps.append(record)
        _save_checkpoint(checkpoint, loaded, result)
    # the last step's perplexity is the final model's: not measured twice
    result.final = _evaluate(loaded, recipe.evaluate, progress, last, device)
    result.out = str(out / "model")
    result.seconds = time.perf_counter() - start
    result.peak_rss_mib = peak_rss_mib()
    fmt = _save(loaded, recipe, out / "model", result.to_dict())
    result.final.format = fmt
    result.final.bytes_on_disk = dir_bytes(out / "model")
    if recipe.bench is not None and fmt == "gguf":
        del loaded
        result.final.bench = _bench_gguf(recipe, out / "model" / "model.gguf")
    elif recipe.bench is not None:
        bits = {getattr(m.secateur_quant, "bits", None) for m in loaded.model.modules()
                if hasattr(m, "secateur_quant")}
        del loaded  # the bench loads both models afresh, side by side
        result.final.bench = _bench(recipe, out / "model", bits)
    write_json_atomic(out / "result.json", result.to_dict())
    work.discard(CHECKPOINT)
    return result


def _bench_gguf(recipe: Recipe, saved: Path) -> dict[str, Any]:
    """A GGUF output against the unquantized model's F16 GGUF, both in llama.cpp."""
    import tempfile

    from secateur.bench import BenchSpec
    from secateur.bench.gguf import bench_gguf
    from secateur.export import export_model

    settings = recipe.bench
    spec = BenchSpec(prompt_lengths=settings.lengths, decode_tokens=settings.decode_tokens,
                     repeats=settings.repeats, threads=settings.threads)
    base = load(recipe.model, dtype=recipe.dtype)
    work = saved.parent.parent / WORK  # the run's working folder: never a user's file
    work.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        f16 = Path(tmp) / "unquantized-f16.gguf"
        export_model(base.model, base.tokenizer, "gguf", f16, outtype="f16", name=recipe.model)
        del base
        out = bench_gguf([str(f16), str(saved)], spec)
    out["baseline_is"] = f"{recipe.model}, unquantized, as an F16 GGUF"
    return out


def _bench(recipe: Recipe, saved: Path, bits: set[int | None]) -> dict[str, Any]:
    from secateur.bench import BenchSpec, bench_job

    settings = recipe.bench
    runtime = settings.runtime
    if runtime == "auto":
        runtime = "int4" if bits == {4} else "int8" if bits == {8} else "none"
    spec = BenchSpec(prompt_lengths=settings.lengths, decode_tokens=settings.decode_tokens,
                     repeats=settings.repeats, threads=settings.threads)
    out = bench_job(recipe.model, [str(saved)], spec, recipe.dtype,
                    runtime=None if runtime == "none" else runtime,
                    head=settings.head if runtime != "none" else "float16")
    out["runtime"] = runtime
    out["head"] = settings.head if runtime != "none" else "float16"
    return out
