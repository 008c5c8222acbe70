"""The commands behind the CLI as recipes: each builds a `Recipe` and runs it through
`recipe.run_recipe` with a `Layout` saying what that command writes and returns: prune or
quantize (`PruneJob`), recover, distill and DWQ (`RecoveryJob`), one step each; eval, a recipe
with no steps (`EvalRecipe`, `EvalJob`); and the streamed prune (`StreamedPruneJob`), whose
layout runs the streamed engine for its one step, since that model is never whole in memory."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from secateur import distributed
from secateur.api import CalibrationConfig, StepResult, count_parameters, peak_rss_mib
from secateur.config import MethodConfig
from secateur.data.sources import TextSource, load_text
from secateur.device import device_record, timer
from secateur.engine.capture import compute_dtype
from secateur.engine.checkpoint import remove_checkpoint
from secateur.errors import SecateurError
from secateur.eval.api import evaluate
from secateur.eval.config import PerplexityConfig, ZeroShotConfig
from secateur.eval.perplexity import PerplexityResult
from secateur.eval.zeroshot import ZeroShotSpec, check_tasks, resolve_data
from secateur.eval.zeroshot import zeroshot as run_zeroshot
from secateur.formats.loader import load
from secateur.formats.save import SaveFormat, output_format, save_output
from secateur.io import dir_bytes, write_json_atomic
from secateur.methods import build_method
from secateur.models.loading import DTYPES, Loaded
from secateur.outputs import check_output_dir, check_output_file, model_bytes
from secateur.recipe import EvalRecipe, Evaluation, Layout, Recipe, Run, run_recipe
from secateur.report.depth import has_curve, is_depth_summary, plot_removals
from secateur.results import (
    DensePerplexity,
    EvalResult,
    PruneResult,
    RecoveryResult,
    StreamedResult,
    Where,
)
from secateur.workdir import WorkDir, check_free

if TYPE_CHECKING:
    from secateur.recovery.distill import DistillConfig
    from secateur.recovery.dwq import DWQConfig
    from secateur.recovery.lora import LoRAConfig


@dataclass
class EvalSpec:
    data: str | None = "wiki"
    seqlen: int | None = None
    max_windows: int | None = None
    protocol: str = "sparsegpt"
    bos: str = "auto"
    batch_size: int = 8
    compute_dtype: str | None = None


def evaluate_perplexity(loaded: Loaded, spec: EvalSpec | PerplexityConfig, progress: bool = True,
                        source: TextSource | None = None,
                        device: torch.device | None = None) -> PerplexityResult:
    """`secateur.evaluate`'s perplexity, so a command and the Python verb measure through one
    function. `source`, when the caller already loaded `spec.data`, saves parsing it again;
    `device`: the model runs there for the evaluation (None: where it is)."""
    config = spec if isinstance(spec, PerplexityConfig) else PerplexityConfig(**asdict(spec))
    return evaluate(loaded, config, progress, source=source, device=device)


def _recipe(model: str, step: MethodConfig, evaluation: EvalSpec | None, *,
            calibration: CalibrationConfig | None = None, dtype: str = "float32",
            save_format: SaveFormat = "auto", teacher: str | None = None) -> Recipe:
    """A one-step command as the recipe it runs."""
    _check_dtype(dtype)
    return Recipe(model=str(model), dtype=dtype, steps=[step],
                  calibration=calibration or CalibrationConfig(),
                  evaluate=Evaluation(perplexity=_perplexity(evaluation)),
                  save_format=save_format, teacher=None if teacher is None else str(teacher))


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:  # the loader's words, before the recipe's own check
        raise SecateurError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")


def _perplexity(evaluation: EvalSpec | None) -> list[PerplexityConfig]:
    """A command's --eval flags as the recipe's perplexity list (no text: nothing)."""
    if evaluation is None or evaluation.data is None:
        return []
    return [PerplexityConfig(
        data=str(evaluation.data), seqlen=evaluation.seqlen, max_windows=evaluation.max_windows,
        protocol=evaluation.protocol, bos=evaluation.bos, batch_size=evaluation.batch_size,
        compute_dtype=evaluation.compute_dtype)]


def _quiet(_message: str) -> None:
    """A one-step command announces no steps."""


def prune_job(
    model_name: str,
    config: MethodConfig,
    calibration: CalibrationConfig,
    evaluation: EvalSpec,
    out: Path | None,
    json_path: Path | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
    progress: bool = True,
    compact: bool = False,
    dense_perplexity: float | None = None,
    resume: bool = False,
    device: str | None = "auto",
) -> PruneResult:
    """Load, evaluate dense, prune, evaluate pruned, save; `to_json()` of the result is what
    `json_path` and the saved model's record hold.

    A known dense_perplexity (same model and EvalSpec, e.g. a sweep's) skips the dense eval.
    Under torchrun only rank 0 evaluates, shows progress and writes; the others compute."""
    if not distributed.is_main():
        out = json_path = None
        evaluation = EvalSpec(None)
        progress = False
    recipe = _recipe(model_name, config, evaluation, calibration=calibration, dtype=dtype,
                     save_format="bitmask" if compact else "auto")
    layout = PruneJob(None if out is None else Path(out),
                      None if json_path is None else Path(json_path), overwrite,
                      dense_perplexity, resume)
    return run_recipe(recipe, progress=progress, say=_quiet, device=device, layout=layout)


class PruneJob(Layout):
    """`secateur prune` / `quantize`: the model saved in --out itself (a GGUF step's: --out is
    the .gguf file), dense and pruned perplexity, the finished layers kept in --out's working
    folder for --resume."""

    def __init__(self, out: Path | None, json_path: Path | None, overwrite: bool,
                 dense_perplexity: float | None, resume: bool) -> None:
        self.out, self.json_path, self.overwrite = out, json_path, overwrite
        self.given_dense, self.resume = dense_perplexity, resume
        self.saves = out is not None
        self.work: WorkDir | None = None
        self.layers: Path | None = None
        self.timings: dict[str, float] = {}

    def open(self, run: Run, hold: contextlib.ExitStack) -> None:
        from secateur.config import quantizes

        recipe, out = run.recipe, self.out
        config = recipe.steps[0]
        if out is not None:  # a second run on this --out fails here, naming the first's pid
            check_free(out)
        self.gguf_preset = getattr(config, "preset", None) if config.method == "gguf" else None
        texts = [p.data for p in recipe.evaluate.perplexity]
        inputs = [recipe.model, recipe.calibration.source, *(texts or [None])]
        if out is not None and self.gguf_preset is not None:  # one .gguf file, not a folder
            from secateur.formats.gguf import check_gguf_output

            check_gguf_output(out, self.overwrite, tuple(str(i) for i in inputs if i))
        elif out is not None:
            check_output_dir(out, self.overwrite, inputs=inputs,  # a pruned copy: about as big
                             needed_bytes=None if quantizes(config) else model_bytes(
                                 recipe.model))
        if self.json_path is not None:
            check_output_file(self.json_path, "--json", inputs=inputs,
                              overwrite=self.overwrite)
        if out is not None and self.gguf_preset is None:  # locked until the job ends
            _say_layers_discarded(WorkDir(out), self.resume, self.overwrite)
            self.work = hold.enter_context(WorkDir(out))

    def load(self, run: Run) -> Loaded:
        return load(run.recipe.model, dtype=run.recipe.dtype)

    def start(self, run: Run, loaded: Loaded) -> int:
        self.dense_params = count_parameters(loaded.model)
        self.dense = None
        evaluation = run.recipe.evaluate.perplexity
        if evaluation and self.given_dense is not None:
            self.dense = DensePerplexity(self.given_dense, "given")
        elif evaluation:
            self.dense = _dense_perplexity(loaded, run, self.timings)
        # in --out's working folder, where a rerun with --resume finds it; kept until the
        # output is saved (replacing --out removes it)
        if self.work is not None:
            self.layers = self.work.folder("layers")
            if not self.resume:
                self.work.discard("layers")
        return 0

    def checkpoint(self, index: int) -> Path | None:
        return self.layers

    def finished(self, run: Run, loaded: Loaded, record: StepResult) -> None:
        self.step = record
        self.timings["prune_seconds"] = record.seconds

    def finish(self, run: Run, loaded: Loaded) -> None:
        recipe, dev = run.recipe, run.device
        scored = None
        if recipe.evaluate.perplexity:
            t = timer(dev)
            scored = evaluate_perplexity(loaded, recipe.evaluate.perplexity[0], run.progress,
                                         run.texts[recipe.evaluate.perplexity[0].data], dev)
            self.timings["eval_seconds"] = timer(dev) - t
        result = PruneResult(
            recipe.model, self.step.method, recipe.calibration.seed, self.step,
            {"dense": self.dense_params, "pruned": count_parameters(loaded.model)},
            self.timings, peak_rss_mib(), Where.of(device_record(dev)), distributed.record(),
            self.dense, scored)
        if self.out is not None:
            fmt = output_format(loaded.model, recipe.save_format)
            result.gguf = save_output(loaded, fmt, self.out, result.to_json(), self.overwrite,
                                      nm=getattr(recipe.steps[0], "nm", None),
                                      gguf_preset=self.gguf_preset, name=recipe.model,
                                      inputs=(recipe.model,))
            result.out = str(self.out)
            result.bytes_on_disk = dir_bytes(self.out)
        if self.layers is not None:
            remove_checkpoint(self.layers)
        if is_depth_summary(self.step.summary) and has_curve(self.step.summary):
            plots = [p for p in (self.json_path and self.json_path.with_suffix(".png"),
                                 self.out and self.out / "removals.png") if p is not None]
            result.removal_plot = [str(plot_removals(result.to_json(), p)) for p in plots]
        if self.json_path is not None:
            write_json_atomic(self.json_path, result.to_json())
        self.result = result

    def close(self, run: Run) -> PruneResult:
        return self.result


def _dense_perplexity(loaded: Loaded, run: Run, timings: dict[str, float]) -> DensePerplexity:
    """The dense figure from the perplexity cache (`secateur.eval.cache`), else evaluated and
    stored there; says which, and the cache file."""
    from secateur.eval import cache

    spec, device = run.recipe.evaluate.perplexity[0], run.device
    text = run.texts[spec.data]
    key = cache.key_for(run.recipe.model, text, spec, run.recipe.dtype, str(device or "cpu"))
    hit = cache.read(key) if key is not None else None
    if hit is not None:
        return DensePerplexity(hit[0]["perplexity"], "cache", str(hit[1]))
    t = timer(device)
    dense = evaluate_perplexity(loaded, spec, run.progress, text, device)
    timings["dense_eval_seconds"] = timer(device) - t
    stored = cache.write(key, dense.to_dict()) if key is not None else None
    return DensePerplexity(dense.perplexity, "computed",
                           None if stored is None else str(stored))


def _say_layers_discarded(work: WorkDir, resume: bool, overwrite: bool) -> None:
    """A rerun without --resume starts afresh, throwing away an interrupted run's finished
    layers: never silently (with --overwrite the user asked for it)."""
    layers = work.folder("layers")
    if not resume and not overwrite and layers.is_dir() and any(layers.iterdir()):
        warnings.warn(f"'{work.out}' held the finished layers of an interrupted run; starting "
                      "over without them (rerun with --resume to continue from them instead)",
                      stacklevel=2)


def eval_job(model_name: str, evaluation: EvalSpec, json_path: Path | None = None,
             dtype: str = "float32", progress: bool = True,
             zeroshot: ZeroShotSpec | ZeroShotConfig | None = None, overwrite: bool = False,
             device: str | None = "auto") -> EvalResult:
    """Perplexity (unless evaluation.data is None) and, given a ZeroShotSpec, lm-eval tasks:
    a recipe with no steps (`EvalRecipe`) run with the layout `EvalJob`. `overwrite`:
    replace an existing JSON file."""
    if evaluation.data is None and zeroshot is None:
        raise SecateurError("nothing to evaluate: give --data or --tasks")
    from secateur.eval.gguf import is_gguf

    gguf = is_gguf(model_name)
    # llama.cpp scores a GGUF file on its own, at the file's types: --dtype and --device are
    # torch's, checked for torch's runs only
    if not gguf:
        _check_dtype(dtype)
    recipe = EvalRecipe(model=str(model_name), dtype="float32" if gguf else dtype,
                        evaluate=Evaluation(perplexity=_perplexity(evaluation)))
    layout = EvalJob(None if json_path is None else Path(json_path), overwrite, zeroshot,
                     gguf)
    return run_recipe(recipe, progress=progress, say=_quiet,
                      device="cpu" if gguf else device, layout=layout)


class EvalJob(Layout):
    """`secateur eval`: nothing saved, the model measured as it is (in llama.cpp for a GGUF
    file), the result written to --json. The zero-shot spec stays here rather than in the
    recipe: a sweep's `ZeroShotSpec` is handed to lm-eval exactly as given."""

    saves = False

    def __init__(self, json_path: Path | None, overwrite: bool,
                 zeroshot: ZeroShotSpec | ZeroShotConfig | None, gguf: bool) -> None:
        self.json_path, self.overwrite, self.zeroshot, self.gguf = (json_path, overwrite,
                                                                    zeroshot, gguf)

    def open(self, run: Run, hold: contextlib.ExitStack) -> None:
        recipe = run.recipe
        data = recipe.evaluate.perplexity[0].data if recipe.evaluate.perplexity else None
        # eval's order: a missing text, then an unknown task name, then --json, all before
        # the model loads
        if data is not None:
            run.texts[data] = load_text(data, split="test")
        if self.zeroshot is not None:
            check_tasks(self.zeroshot.tasks, resolve_data(self.zeroshot.data))
        if self.json_path is not None:
            check_output_file(self.json_path, "--json", inputs=[recipe.model, data],
                              overwrite=self.overwrite)
        if self.gguf and self.zeroshot is not None:
            raise SecateurError("zero-shot tasks run in transformers; evaluate the model "
                                "folder the GGUF was made from, or drop --tasks")

    def load(self, run: Run) -> Loaded | None:
        return None if self.gguf else load(run.recipe.model, dtype=run.recipe.dtype)

    def finish(self, run: Run, loaded: Loaded | None) -> None:
        from secateur.eval.gguf import gguf_perplexity

        recipe = run.recipe
        spec = recipe.evaluate.perplexity[0] if recipe.evaluate.perplexity else None
        if loaded is None:  # a llama.cpp file: scored by llama.cpp, on the same windows
            self.result = EvalResult(recipe.model, runtime="llama.cpp", scored=gguf_perplexity(
                recipe.model, run.texts[spec.data], spec.seqlen, spec.max_windows,
                spec.protocol, spec.bos), bytes_on_disk=Path(recipe.model).stat().st_size)
            return
        result = self.result = EvalResult(recipe.model)
        if spec is not None:
            result.scored = evaluate_perplexity(loaded, spec, run.progress,
                                                run.texts[spec.data], run.device)
        if self.zeroshot is not None:
            result.zeroshot = run_zeroshot(loaded.model, loaded.tokenizer, self.zeroshot,
                                           recipe.dtype, device=run.device)
        result.where = Where.of(device_record(run.device))
        result.parameters = count_parameters(loaded.model)["parameters"]

    def close(self, run: Run) -> EvalResult:
        if self.json_path is not None:
            write_json_atomic(self.json_path, self.result.to_json())
        return self.result


def prune_streamed_job(model_name: str, config: MethodConfig, calibration: CalibrationConfig,
                       out: Path, json_path: Path | None = None, overwrite: bool = False,
                       dtype: str = "float32", progress: bool = True,
                       resume: bool = False, device: str | None = "auto") -> StreamedResult:
    """A layer-wise prune with one decoder layer in memory at a time, written to `out`: a
    one-step recipe with the layout `StreamedPruneJob`.

    The model never exists whole in memory, so it is evaluated by loading `out` afterwards
    (`secateur eval OUT`); the result records peak RSS against the model's size."""
    recipe = _recipe(model_name, config, None, calibration=calibration, dtype=dtype)
    layout = StreamedPruneJob(Path(out), None if json_path is None else Path(json_path),
                              overwrite, resume)
    return run_recipe(recipe, progress=progress, say=_quiet, device=device, layout=layout)


class StreamedPruneJob(Layout):
    """`secateur prune --stream`: the model is never whole. `load` reads only the tensors
    outside the decoder layers, and `step` runs the streamed engine, which reads each layer,
    prunes it and writes it to --out as it goes (quantized layers packed there, so the runner
    has nothing to check or save after the step); nothing is evaluated."""

    checks_packing = False  # the streamed writer refuses a layer it cannot pack

    def __init__(self, out: Path, json_path: Path | None, overwrite: bool,
                 resume: bool) -> None:
        self.out, self.json_path, self.overwrite, self.resume = (out, json_path, overwrite,
                                                                 resume)

    def open(self, run: Run, hold: contextlib.ExitStack) -> None:
        recipe, out = run.recipe, self.out
        check_free(out)  # a second run on this --out fails here, naming the first one's pid
        inputs = [recipe.model, recipe.calibration.source]
        check_output_dir(out, self.overwrite, inputs=inputs,
                         needed_bytes=model_bytes(recipe.model))
        if self.json_path is not None:
            check_output_file(self.json_path, "--json", inputs=inputs, overwrite=self.overwrite)
        _say_layers_discarded(WorkDir(out), self.resume, self.overwrite)
        self.work = hold.enter_context(WorkDir(out))  # locked until the job ends

    def load(self, run: Run) -> Loaded:
        from secateur.formats.streaming import load_streamed

        loaded, self.weights = load_streamed(run.recipe.model, dtype=run.recipe.dtype)
        return loaded

    def start(self, run: Run, loaded: Loaded) -> int:
        from secateur.api import resolve_data

        calibration = run.recipe.calibration
        self.windows, self.calibration = resolve_data(loaded, calibration, calibration.seed)
        self.layers = self.work.folder("layers")  # for --resume; goes when the output is in
        if not self.resume:
            self.work.discard("layers")
        return 0

    def step(self, run: Run, loaded: Loaded, index: int) -> StepResult:
        from secateur.engine.streamed import prune_streamed

        recipe, dev = run.recipe, run.device
        config = recipe.steps[index]
        # the saved model's record: where it computed, not yet a CUDA device's peak
        start = StreamedResult(recipe.model, config.method, config.settings(),
                               self.calibration, Where(str(dev)))
        with compute_dtype(recipe.calibration.compute_dtype):
            streamed = prune_streamed(loaded, self.weights, build_method(config), self.windows,
                                      self.out, overwrite=self.overwrite,
                                      checkpoint=self.layers, progress=run.progress,
                                      device=dev,
                                      metadata=lambda r: replace(start, run=r).to_json())
        self.result = replace(start, run=streamed, where=Where.of(device_record(dev)))
        return StepResult(config.method, config.kind, config.settings(), self.calibration,
                          streamed.layers, streamed.summary, seconds=streamed.seconds,
                          peak_rss_mib=streamed.peak_rss_mib, device=self.result.where.device,
                          peak_device_mib=self.result.where.peak_device_mib)

    def finish(self, run: Run, loaded: Loaded) -> None:
        self.result.bytes_on_disk = dir_bytes(self.out)  # written by the step
        if self.json_path is not None:
            write_json_atomic(self.json_path, self.result.to_json())

    def close(self, run: Run) -> StreamedResult:
        return self.result


def checkpoint_dir(out: Path, name: str) -> Path:
    """Where a recovery `name` into `out` keeps its resumable state: in `out`'s own working
    folder (`secateur.workdir`), so a rerun of the same command resumes from it."""
    return WorkDir(Path(out)).folder(name)


def recover_job(model_dir: str, out: Path, config: LoRAConfig, evaluation: Any = None,
                json_path: Path | None = None, overwrite: bool = False,
                progress: bool = True,
                on_step: Callable[[int, float], None] | None = None,
                device: str | None = "auto") -> RecoveryResult:
    """Load a (pruned) model, evaluate, LoRA-train with checkpoints, merge, evaluate, save.

    `evaluation` is an `EvalSpec` (data None: no perplexity); `device`: where it evaluates and
    trains (auto, cpu, cuda, cuda:N)."""
    return recovery_job(model_dir, out, config, evaluation, json_path, overwrite, progress,
                        on_step=on_step, device=device)


def distill_job(student_dir: str, teacher: str, out: Path, config: DistillConfig,
                evaluation: Any = None, json_path: Path | None = None,
                overwrite: bool = False, progress: bool = True,
                on_step: Callable[[int, float], None] | None = None,
                device: str | None = "auto") -> RecoveryResult:
    """Load student and teacher, evaluate both, distill with checkpoints, evaluate, save.

    `evaluation` is an `EvalSpec` (data None: no perplexity). The result holds the
    dense-to-pruned perplexity gap and the share of it recovered."""
    from secateur.recovery.distill import check_models

    return recovery_job(student_dir, out, config, evaluation, json_path, overwrite, progress,
                        teacher=teacher, on_step=on_step, device=device,
                        check=lambda student, reference: check_models(student, reference,
                                                                      config))


def dwq_job(model_dir: str, teacher: str, out: Path, config: DWQConfig, evaluation: Any = None,
            json_path: Path | None = None, overwrite: bool = False, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> RecoveryResult:
    """Load a quantized (compressed-tensors) model and its teacher, evaluate, learn its grids
    with checkpoints, evaluate, save packed again."""
    from secateur.recovery.dwq import check_models

    return recovery_job(model_dir, out, config, evaluation, json_path, overwrite, progress,
                        teacher=teacher, on_step=on_step, check=check_models,
                        load_student=_with_grids)


def _with_grids(model_dir: str) -> Loaded:
    """A compressed-tensors folder with its grids restored (DWQ learns them); any other model
    as usual."""
    from secateur.formats.packed_load import ct_quantization_config, load_quantized

    if Path(model_dir).is_dir() and ct_quantization_config(Path(model_dir)) is not None:
        return load_quantized(model_dir)
    return load(model_dir)


def recovery_job(model_dir: str, out: Path, config: MethodConfig, evaluation: Any = None,
                 json_path: Path | None = None, overwrite: bool = False, progress: bool = True,
                 *, teacher: str | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 check: Callable[[Loaded, Loaded | None], None] | None = None,
                 load_student: Callable[[str], Loaded] | None = None,
                 device: str | None = "auto") -> RecoveryResult:
    """A recovery step as a one-step recipe: check outputs, load (and `check`) the model and
    any teacher, evaluate, train with a checkpoint in `out`'s working folder (locked: a
    second run on `out` fails at once), evaluate again, save, write the JSON. With a teacher
    the result also holds its perplexity and the share of the perplexity gap recovered.
    `device`: where evaluation and training run (the models are loaded on the CPU and saved
    from it)."""
    recipe = _recipe(model_dir, config, evaluation, teacher=teacher)
    layout = RecoveryJob(Path(out), None if json_path is None else Path(json_path), overwrite,
                         on_step, check, load_student)
    return run_recipe(recipe, progress=progress, say=_quiet, device=device, layout=layout)


class RecoveryJob(Layout):
    """`secateur recover` / `distill`: the trained model saved in --out as its input was
    (a compact input compact again, DWQ's grids packed again), perplexity before and after
    (and the teacher's), the training state in --out's working folder until then."""

    def __init__(self, out: Path, json_path: Path | None, overwrite: bool,
                 on_step: Callable[[int, float], None] | None,
                 check: Callable[[Loaded, Loaded | None], None] | None,
                 load_student: Callable[[str], Loaded] | None) -> None:
        self.out, self.json_path, self.overwrite = out, json_path, overwrite
        self.on_step, self.check, self.load_student = on_step, check, load_student

    def open(self, run: Run, hold: contextlib.ExitStack) -> None:
        recipe = run.recipe
        check_free(self.out)  # a second run on this --out fails here, in one line naming it
        inputs = [recipe.model] + ([recipe.teacher] if recipe.teacher else [])
        check_output_dir(self.out, self.overwrite, inputs=inputs)
        if self.json_path is not None:
            check_output_file(self.json_path, "--json", inputs=inputs, overwrite=self.overwrite)
        self.work = hold.enter_context(WorkDir(self.out))
        self.name = recipe.steps[0].method

    def load(self, run: Run) -> Loaded:
        return (self.load_student or load)(run.recipe.model)

    def start(self, run: Run, loaded: Loaded) -> int:
        recipe = run.recipe
        reference = run.teacher() if recipe.teacher else None
        if self.check is not None:
            self.check(loaded, reference)
        self.result = RecoveryResult(recipe.model, self.name, teacher=recipe.teacher)
        if recipe.evaluate.perplexity and reference is not None:
            self.result.teacher_perplexity = self._perplexity(run, reference).perplexity
        if recipe.evaluate.perplexity:
            self.result.perplexity_before = self._perplexity(run, loaded).perplexity
        return 0

    def _perplexity(self, run: Run, loaded: Loaded) -> PerplexityResult:
        spec = run.recipe.evaluate.perplexity[0]
        return evaluate_perplexity(loaded, spec, run.progress, run.texts[spec.data], run.device)

    def checkpoint(self, index: int) -> Path | None:
        return self.work.folder(self.name)

    def finished(self, run: Run, loaded: Loaded, record: StepResult) -> None:
        from secateur.recovery.training import TrainResult

        self.result.training = TrainResult.from_dict(record.summary)

    def finish(self, run: Run, loaded: Loaded) -> None:
        result = self.result
        if run.recipe.evaluate.perplexity:
            result.scored = self._perplexity(run, loaded)
            if result.teacher_perplexity is not None:
                gap = result.perplexity_before - result.teacher_perplexity
                # absent when the student was not worse than its teacher
                if gap > 0:
                    result.gap_recovered = (result.perplexity_before
                                            - result.scored.perplexity) / gap
        result.parameters = count_parameters(loaded.model)["parameters"]
        result.peak_rss_mib = peak_rss_mib()
        result.where = Where.of(device_record(run.device))
        # replaces `out`, the checkpoint too
        save_output(loaded, output_format(loaded.model, like=run.recipe.model), self.out,
                    result.to_json(), self.overwrite)
        self.work.discard(self.name)

    def close(self, run: Run) -> RecoveryResult:
        return self.result

    def released(self, result: RecoveryResult) -> None:
        # sized once the lock has gone, as the output stays on disk
        result.out = str(self.out)
        result.bytes_on_disk = dir_bytes(self.out)
        if self.json_path is not None:
            write_json_atomic(self.json_path, result.to_json())
