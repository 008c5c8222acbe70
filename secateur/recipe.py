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

`run_recipe` runs the steps in order on one model in memory. After every step the model and
the results so far are checkpointed in the output folder, so an interrupted run resumes from
the last finished step when started again with the same recipe. The result JSON holds the
recipe itself, every step's record and the evaluation protocol.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from secateur.api import CalibrationConfig, StepResult, peak_rss_mib, run_step
from secateur.config import Config, ConfigError, MethodConfig
from secateur.errors import SecateurError
from secateur.eval.config import PerplexityConfig, ZeroShotConfig
from secateur.methods import make_config
from secateur.models.loading import DTYPES, Loaded, load
from secateur.params import count_parameters
from secateur.surgery.save import atomic_dir, check_output_dir, dir_bytes, write_json_atomic

SaveFormat = Literal["auto", "safetensors", "compressed-tensors", "bitmask"]


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
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    steps: list[MethodConfig] = Field(min_length=1)
    evaluate: Evaluation = Field(default_factory=Evaluation)
    # auto: compressed-tensors pack-quantized when a step quantized, else safetensors
    save_format: SaveFormat = "auto"
    bench: BenchSettings | None = None

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
        return cls.from_yaml(path.read_text())

    def fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class RecipeResult:
    recipe: dict[str, Any]
    dense: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    out: str | None = None
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    resumed_from_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeResult:
        return cls(**data)


CHECKPOINT = ".checkpoint"
STATE = "secateur.json"  # the name output checks recognise as secateur's


def _checkpoint(out: Path) -> Path:
    return out / CHECKPOINT


def _save_checkpoint(out: Path, loaded: Loaded, result: RecipeResult) -> None:
    # A whole-module pickle: any class a step produced (per-layer widths, removed blocks,
    # quantization state on linears) comes back exactly; it never leaves this folder.
    with atomic_dir(_checkpoint(out), overwrite=True) as tmp:
        torch.save(loaded.model, tmp / "model.pt")
        write_json_atomic(tmp / STATE, result.to_dict())


def _load_checkpoint(out: Path, recipe: Recipe) -> tuple[Any, RecipeResult] | None:
    path = _checkpoint(out)
    if not (path / STATE).is_file():
        return None
    state = RecipeResult.from_dict(json.loads((path / STATE).read_text()))
    if json.dumps(state.recipe, sort_keys=True) != recipe.fingerprint():
        raise SecateurError(f"'{out}' holds a checkpoint of a different recipe: use another "
                            "--out, or --overwrite to start afresh")
    model = torch.load(path / "model.pt", weights_only=False)
    return model, state


def _perplexity(loaded: Loaded, config: PerplexityConfig, progress: bool) -> dict[str, Any]:
    from secateur.eval.api import evaluate

    return evaluate(loaded, config, progress=progress).to_dict()


def _evaluate(loaded: Loaded, evaluation: Evaluation, progress: bool,
              first: dict[str, Any] | None = None) -> dict[str, Any]:
    """`first`: the first text's result when it was just measured on this very model."""
    from secateur.eval.api import evaluate

    out: dict[str, Any] = {"perplexity": [
        first if i == 0 and first is not None else _perplexity(loaded, p, progress)
        for i, p in enumerate(evaluation.perplexity)]}
    if evaluation.zeroshot is not None:
        out["zeroshot"] = evaluate(loaded, evaluation.zeroshot, progress=progress).to_dict()
    out["parameters"] = count_parameters(loaded.model)
    return out


def _teacher_loader(recipe: Recipe) -> Any:
    cache: dict[str, Loaded] = {}

    def teacher() -> Loaded:
        if "t" not in cache:
            cache["t"] = load(recipe.model, dtype=recipe.dtype)
        return cache["t"]

    return teacher


def _save(loaded: Loaded, recipe: Recipe, target: Path, metadata: dict[str, Any]) -> str:
    from secateur.quant.state import is_quantized

    fmt = recipe.save_format
    quantized = is_quantized(loaded.model)
    if fmt == "auto":
        fmt = "compressed-tensors" if quantized else "safetensors"
    if quantized and fmt != "compressed-tensors":
        raise SecateurError(f"save_format {fmt} cannot hold quantized weights: use "
                            "compressed-tensors (or auto)")
    if fmt == "compressed-tensors":
        if not quantized:
            raise SecateurError("save_format compressed-tensors needs a quantization step; use "
                                "auto or safetensors")
        from secateur.quant.pack import save_packed

        save_packed(loaded.model, loaded.tokenizer, target, metadata, overwrite=True)
    elif fmt == "bitmask":
        from secateur.surgery.compact import save_compact

        save_compact(loaded.model, loaded.tokenizer, target, metadata, overwrite=True)
    else:
        from secateur.surgery.save import save_model

        save_model(loaded.model, loaded.tokenizer, target, metadata, overwrite=True)
    return fmt


def run_recipe(recipe: Recipe, out: Path, overwrite: bool = False, progress: bool = True,
               say: Any = print) -> RecipeResult:
    """Run every step in order, checkpointing after each; resume from a checkpoint in `out`."""
    out = Path(out)
    if recipe.dtype not in DTYPES:
        raise ConfigError(f"Recipe.dtype: one of {', '.join(DTYPES)}")
    resumable = (_checkpoint(out) / STATE).is_file()
    replace = out.exists() and (overwrite or not resumable)
    # a recipe's own earlier output (recipe.yaml beside it) may be replaced whole
    if replace and not (overwrite and (out / "recipe.yaml").is_file()):
        check_output_dir(out, overwrite)
    start = time.perf_counter()
    loaded = load(recipe.model, dtype=recipe.dtype)
    if recipe.save_format in ("auto", "compressed-tensors"):
        from secateur.quant.pack import check_packable, quantizes

        if any(quantizes(step) for step in recipe.steps):  # before anything is written
            check_packable(loaded.adapter)
    if replace and overwrite:
        shutil.rmtree(out)
        resumable = False
    out.mkdir(parents=True, exist_ok=True)
    restored = _load_checkpoint(out, recipe) if resumable else None
    if restored is not None:
        loaded.model, result = restored
        from secateur.models.base import adapter_for

        loaded.adapter = adapter_for(loaded.model)
        result.resumed_from_step = len(result.steps)
        say(f"resuming after step {len(result.steps)} of {len(recipe.steps)}")
    else:
        result = RecipeResult(recipe=recipe.to_dict())
        result.dense = _evaluate(loaded, recipe.evaluate, progress)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
    teacher = _teacher_loader(recipe)
    first_ppl = recipe.evaluate.perplexity[0] if recipe.evaluate.perplexity else None
    last: dict[str, Any] | None = None  # the first text's result after the latest step
    for i in range(len(result.steps), len(recipe.steps)):
        step = recipe.steps[i]
        say(f"step {i + 1}/{len(recipe.steps)}: {step.method}")
        record: StepResult = run_step(loaded, step, recipe.calibration, teacher=teacher,
                                      progress=progress)
        last = None
        if recipe.evaluate.after_each_step and first_ppl is not None:
            last = _perplexity(loaded, first_ppl, progress)
            record.perplexity = last["perplexity"]
        result.steps.append(record.to_dict())
        _save_checkpoint(out, loaded, result)
    # the last step's perplexity is the final model's: not measured twice
    result.final = _evaluate(loaded, recipe.evaluate, progress, last)
    result.out = str(out / "model")
    result.seconds = time.perf_counter() - start
    result.peak_rss_mib = peak_rss_mib()
    fmt = _save(loaded, recipe, out / "model", result.to_dict())
    result.final["format"] = fmt
    result.final["bytes_on_disk"] = dir_bytes(out / "model")
    if recipe.bench is not None:
        bits = {getattr(m.secateur_quant, "bits", None) for m in loaded.model.modules()
                if hasattr(m, "secateur_quant")}
        del loaded  # the bench loads both models afresh, side by side
        result.final["bench"] = _bench(recipe, out / "model", bits)
    write_json_atomic(out / "result.json", result.to_dict())
    shutil.rmtree(_checkpoint(out), ignore_errors=True)
    return result


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
