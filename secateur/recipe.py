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

`run_recipe` is the one runner: every command builds a `Recipe` (one step, or many; `eval` an
`EvalRecipe` with none) and runs it here, with a `Layout` saying what that command writes and
returns (`secateur.jobs` holds the other commands' layouts; `RunFolder` is `secateur run`'s).
The runner checks and locks the output, reads the evaluation texts, loads the model, runs the
steps in order (`Layout.step`: `api.run_step`, or the streamed engine for a model never whole
in memory), and the layout measures and saves through `formats.save` (`output_format`/
`save_output`), the one rule for what an output is saved as.

Under `RunFolder` the model is saved after every step as secateur saves any output
(compressed-tensors pack-quantized once a step quantized, else Hugging Face safetensors,
per-layer widths included) with the results so far as JSON, in the output folder's working
folder (`secateur.workdir`, locked while the run lives). An interrupted run resumes from the
last finished step when started again with the same recipe: the model comes back through the
same loaders as any saved model, nothing is unpickled. The result JSON holds the recipe
itself, every step's record and the evaluation protocol.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from secateur.api import CalibrationConfig, StepResult, peak_rss_mib, run_step
from secateur.config import Config, ConfigError, MethodConfig
from secateur.data.sources import TextSource, load_text
from secateur.device import check_spelling, resolve_device
from secateur.errors import SecateurError
from secateur.eval.config import PerplexityConfig, ZeroShotConfig
from secateur.eval.perplexity import PerplexityResult
from secateur.formats.loader import load
from secateur.formats.save import SaveFormat, output_format, save_output
from secateur.inputs import check_step_order, check_yaml_size, path_values, read_recipe_text
from secateur.io import dir_bytes, mark_output, write_json_atomic
from secateur.methods import build_method
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
    teacher: str | None = Field(None, min_length=1,
                                description="The model distill and dwq steps learn from "
                                            "(default: model, as loaded before the steps).")

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
        steps = self.steps
        if steps and steps[0].method == "dwq" and _packed_on_disk(self.model):
            steps = steps[1:]  # the model itself was quantized: its grids are there to learn
        check_step_order(steps)  # known now, not after the earlier steps ran
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


class EvalRecipe(Recipe):
    """A recipe with no steps: the model measured as it is (`secateur eval`). Only a command
    builds one; a recipe a user writes needs a step, since a run that changes nothing would
    only save a copy of its model."""

    steps: list[MethodConfig] = Field(default_factory=list, max_length=0)


def _packed_on_disk(model: str) -> bool:
    from secateur.formats.packed_load import ct_quantization_config

    return Path(model).is_dir() and ct_quantization_config(Path(model)) is not None


def _fingerprint(recipe: dict[str, Any]) -> str:
    """What a resumed run must share with the interrupted one: all but the device."""
    return json.dumps({k: v for k, v in recipe.items() if k != "device"}, sort_keys=True)


@dataclass
class Run:
    """One run of a recipe as the runner hands it to its layout."""

    recipe: Recipe
    device: torch.device | None
    progress: bool
    texts: dict[str, TextSource]  # every perplexity text, read before the model loads
    # the model distill/dwq steps learn from, loaded once on first use
    teacher: Callable[[], Loaded]

    def perplexity(self, loaded: Loaded, config: PerplexityConfig) -> PerplexityResult:
        from secateur.eval.api import evaluate

        return evaluate(loaded, config, progress=self.progress, source=self.texts[config.data],
                        device=self.device)


class Layout:
    """What a command does around the recipe's steps: which output rules it checks, what it
    measures before and after, where the model and its record go, what it returns. The
    runner owns the order, so every command loads, steps, checkpoints and saves alike."""

    saves: bool = True  # False: the run writes nothing (a prune without --out, an eval)
    # False: the layout writes the model itself and its writer refuses what it cannot pack
    # (the streamed prune, layer by layer); else the runner checks before the first step
    checks_packing: bool = True
    on_step: Callable[[int, float], None] | None = None  # a training step's (step, loss)

    def open(self, run: Run, hold: contextlib.ExitStack) -> None:
        """Refuse outputs that may not be written and lock them; nothing is loaded yet. A
        layout may read evaluation texts into `run.texts` here, to fail in its own order."""

    def load(self, run: Run) -> Loaded | None:
        """The model the steps change. None only for a recipe with no steps whose model
        torch never holds (a GGUF file, which llama.cpp evaluates on its own)."""
        return load(run.recipe.model, dtype=run.recipe.dtype)

    def step(self, run: Run, loaded: Loaded, index: int) -> StepResult:
        """Carry out step `index` on `loaded`: `api.run_step`, with this layout's checkpoint
        folder and step callback. A layout whose model is never whole in memory (the
        streamed prune) runs its own engine here instead."""
        return run_step(loaded, run.recipe.steps[index], run.recipe.calibration,
                        teacher=run.teacher, progress=run.progress, device=run.device,
                        checkpoint=self.checkpoint(index), on_step=self.on_step)

    def start(self, run: Run, loaded: Loaded) -> int:
        """Measure (or restore) before the steps; returns how many steps are done already."""
        return 0

    def checkpoint(self, index: int) -> Path | None:
        """Where step `index` keeps its resumable state (finished layers, training state)."""
        return None

    def finished(self, run: Run, loaded: Loaded, record: StepResult) -> None:
        """Step `len(steps so far)` is done; `record` is what it did."""

    def finish(self, run: Run, loaded: Loaded) -> None:
        """Measure the stepped model and save it."""

    def close(self, run: Run) -> Any:
        """The typed result, once the model is saved and dropped; the output is still locked."""

    def released(self, result: Any) -> None:
        """After the lock is gone: what must see the output as it stays on disk."""


def run_recipe(recipe: Recipe, out: Path | None = None, overwrite: bool = False,
               progress: bool = True, say: Callable[[str], None] = print,
               inputs: Iterable[str | Path] = (), device: str | None = None, *,
               layout: Layout | None = None) -> Any:
    """Run every step in order on one model: the one runner behind every command.

    `layout` says what the command writes and returns; the default is `secateur run`'s
    (model/, result.json and recipe.yaml in `out`, checkpointed after every step and resumed
    from the last finished one) and returns a `RecipeResult`. `inputs`: paths the run reads
    besides those the recipe names (the recipe file itself), which `out` may not be, hold or
    replace. `device` overrides the recipe's own."""
    if recipe.dtype not in DTYPES:
        raise ConfigError(f"Recipe.dtype: one of {', '.join(DTYPES)}")
    for step in recipe.steps:  # a config without a handler fails before anything loads
        build_method(step)
    dev = resolve_device(recipe.device if device is None else device)
    if layout is None:
        if out is None:
            raise SecateurError("a recipe run needs an output folder")
        layout = RunFolder(Path(out), overwrite, say, inputs)
    with contextlib.ExitStack() as hold:
        run = Run(recipe, dev, progress, {}, _teacher_loader(recipe))
        layout.open(run, hold)
        # read before the model: a missing text fails before any work
        for p in recipe.evaluate.perplexity:
            if p.data not in run.texts:
                run.texts[p.data] = load_text(p.data, split="test")
        loaded = layout.load(run)
        if loaded is None and recipe.steps:
            raise SecateurError(f"'{recipe.model}' is not a model torch can change: its "
                                "recipe can only evaluate it")
        if layout.saves and layout.checks_packing and _packs(recipe):
            from secateur.formats.packed_save import check_packable

            check_packable(loaded.adapter)  # refused here, not when saving after the run
        for i in range(layout.start(run, loaded), len(recipe.steps)):
            say(f"step {i + 1}/{len(recipe.steps)}: {recipe.steps[i].method}")
            layout.finished(run, loaded, layout.step(run, loaded, i))
        layout.finish(run, loaded)
        del loaded  # saved: what follows (a bench) loads the models afresh, side by side
        result = layout.close(run)
    layout.released(result)
    return result


def _packs(recipe: Recipe) -> bool:
    """Whether the output will be pack-quantized (a gguf step's output is a GGUF instead)."""
    from secateur.config import quantizes

    return (recipe.save_format in ("auto", "compressed-tensors")
            and any(quantizes(step) for step in recipe.steps)
            and not any(step.method == "gguf" for step in recipe.steps))


def _teacher_loader(recipe: Recipe) -> Callable[[], Loaded]:
    cache: dict[str, Loaded] = {}

    def teacher() -> Loaded:
        if "t" not in cache:
            cache["t"] = load(recipe.teacher or recipe.model, dtype=recipe.dtype)
        return cache["t"]

    return teacher


CHECKPOINT = "recipe"  # in --out's working folder (secateur.workdir)
STATE = "recipe.json"  # the commit point: the results so far and which model folder is current
_MODEL = re.compile(r"^step-\d{3,}$")
RUN_FILES = ("recipe.yaml", "model", "result.json")  # what a run writes in its --out


class RunFolder(Layout):
    """`secateur run`: the model in out/model, the record in out/result.json and the recipe
    in out/recipe.yaml; the model is checkpointed after every step, and an interrupted run
    resumes after the last finished one."""

    def __init__(self, out: Path, overwrite: bool = False,
                 say: Callable[[str], None] = print, inputs: Iterable[str | Path] = ()) -> None:
        self.out, self.overwrite, self.say, self.inputs = Path(out), overwrite, say, inputs
        self.work = WorkDir(self.out)
        self.start_time = time.perf_counter()
        self.last: PerplexityResult | None = None  # the first text's, after the latest step

    def open(self, run: Run, hold: contextlib.ExitStack) -> None:
        from secateur.config import quantizes

        recipe = run.recipe
        check_free(self.out)  # a second run on this --out fails here, in one line naming it
        self.resumable = (self.work.folder(CHECKPOINT) / STATE).is_file()
        # every --out rule (secateur.outputs): an earlier output is replaced only if secateur
        # wrote all of it, never the current folder or one holding an input
        replace = check_run_folder(
            self.out, self.overwrite, [*self.inputs, *path_values(recipe.to_dict())],
            self.resumable,
            None if any(quantizes(s) for s in recipe.steps) else model_bytes(recipe.model))
        self.clear = replace and self.overwrite
        hold.enter_context(self.work)
        self.start_time = time.perf_counter()

    def start(self, run: Run, loaded: Loaded) -> int:
        recipe = run.recipe
        if self.clear:
            _clear_for_overwrite(self.out)
            self.resumable = False
        if not self.resumable:
            self.work.discard(CHECKPOINT)  # steps saved but never committed: start afresh
        restored = (_load_checkpoint(self.work.folder(CHECKPOINT), recipe) if self.resumable
                    else None)
        if restored is not None:
            saved, self.result = restored
            loaded.model, loaded.adapter = saved.model, saved.adapter
            self.result.resumed_from_step = len(self.result.steps)
            self.say(f"resuming after step {len(self.result.steps)} of {len(recipe.steps)}")
        else:
            self.result = RecipeResult(recipe=recipe.to_dict())
            self.result.dense = _evaluate(run, loaded)
            (self.out / "recipe.yaml").write_text(recipe.to_yaml())
            mark_output(self.out, RUN_FILES)  # what a later --overwrite may replace
        return len(self.result.steps)

    def finished(self, run: Run, loaded: Loaded, record: StepResult) -> None:
        evaluation = run.recipe.evaluate
        self.last = None
        if evaluation.after_each_step and evaluation.perplexity:
            self.last = run.perplexity(loaded, evaluation.perplexity[0])
            record.perplexity = self.last.perplexity
        self.result.steps.append(record)
        _save_checkpoint(self.work.folder(CHECKPOINT), loaded, self.result)

    def finish(self, run: Run, loaded: Loaded) -> None:
        recipe, result, out = run.recipe, self.result, self.out
        # the last step's perplexity is the final model's: not measured twice
        result.final = _evaluate(run, loaded, self.last)
        result.out = str(out / "model")
        result.seconds = time.perf_counter() - self.start_time
        result.peak_rss_mib = peak_rss_mib()
        result.final.format = _save(loaded, recipe, out / "model", result.to_dict())
        result.final.bytes_on_disk = dir_bytes(out / "model")
        self.bits = {getattr(m.secateur_quant, "bits", None) for m in loaded.model.modules()
                     if hasattr(m, "secateur_quant")}

    def close(self, run: Run) -> RecipeResult:
        recipe, result, out = run.recipe, self.result, self.out
        if recipe.bench is not None and result.final.format == "gguf":
            result.final.bench = _bench_gguf(recipe, out / "model" / "model.gguf")
        elif recipe.bench is not None:
            result.final.bench = _bench(recipe, out / "model", self.bits)
        write_json_atomic(out / "result.json", result.to_dict())
        self.work.discard(CHECKPOINT)
        return result


def _save_checkpoint(folder: Path, loaded: Loaded, result: RecipeResult) -> None:
    """The model after step n in `step-00n/` as secateur saves outputs, then recipe.json naming
    it (replaced last, so a kill at any instant leaves the previous step or this one), then
    the previous step's folder goes."""
    from secateur.quant.state import is_quantized

    name = f"step-{len(result.steps):03d}"
    shutil.rmtree(folder / name, ignore_errors=True)  # a kill's leftover, never committed
    if is_quantized(loaded.model):
        from secateur.formats.packed_save import save_packed

        # the model's own dtype for the unquantized tensors: the model comes back exactly
        save_packed(loaded.model, loaded.tokenizer, folder / name, keep_dtype=None, own_state=True)
    else:
        from secateur.formats.hf import save_model

        # llama.cpp's block codes, if a gguf step rounded the model, go beside the weights
        save_model(loaded.model, loaded.tokenizer, folder / name, own_state=True)
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


def _evaluate(run: Run, loaded: Loaded, first: PerplexityResult | None = None) -> Measured:
    """`first`: the first text's result when it was just measured on this very model."""
    from secateur.eval.api import evaluate

    evaluation = run.recipe.evaluate
    out = Measured([first if i == 0 and first is not None else run.perplexity(loaded, p)
                    for i, p in enumerate(evaluation.perplexity)],
                   count_parameters(loaded.model))
    if evaluation.zeroshot is not None:
        out.zeroshot = evaluate(loaded, evaluation.zeroshot, progress=run.progress,
                                device=run.device).to_dict()
    return out


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


def _bench_gguf(recipe: Recipe, saved: Path) -> dict[str, Any]:
    """A GGUF output against the unquantized model's F16 GGUF, both in llama.cpp."""
    import tempfile

    from secateur.bench import BenchSpec
    from secateur.bench.gguf import bench_gguf
    from secateur.formats.export import export_model

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
