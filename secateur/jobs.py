"""End-to-end jobs behind CLI commands: prune or quantize (+ evaluate, save), recover,
distill and DWQ (+ evaluate, save), evaluate; and the one rule for the format an output is
saved in."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from secateur import distributed
from secateur.api import CalibrationConfig, count_parameters, peak_rss_mib, run_step
from secateur.config import MethodConfig
from secateur.data.sources import TextSource, load_text
from secateur.device import device_record, resolve_device, timer
from secateur.engine.capture import compute_dtype
from secateur.engine.checkpoint import remove_checkpoint
from secateur.errors import SecateurError
from secateur.eval.perplexity import PerplexityResult, perplexity
from secateur.eval.zeroshot import ZeroShotSpec, check_tasks, resolve_data
from secateur.eval.zeroshot import zeroshot as run_zeroshot
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.io import dir_bytes, write_json_atomic
from secateur.methods import build_method
from secateur.models.loading import Loaded
from secateur.outputs import check_output_dir, check_output_file, model_bytes
from secateur.report.depth import has_curve, is_depth_summary, plot_removals
from secateur.results import (
    DensePerplexity,
    EvalResult,
    PruneResult,
    RecoveryResult,
    StreamedResult,
    Where,
)
from secateur.workdir import WorkDir, check_free, with_exit_stack

if TYPE_CHECKING:
    from secateur.recovery.distill import DistillConfig
    from secateur.recovery.dwq import DWQConfig
    from secateur.recovery.lora import LoRAConfig
    from secateur.recovery.training import TrainResult

    # train(student, teacher or None, checkpoint folder) -> the run's result
    Trainer = Callable[[Loaded, Loaded | None, Path], TrainResult]


@dataclass
class EvalSpec:
    data: str | None = "wiki"
    seqlen: int | None = None
    max_windows: int | None = None
    protocol: str = "sparsegpt"
    bos: str = "auto"
    batch_size: int = 8
    compute_dtype: str | None = None


def evaluate_perplexity(loaded, spec: EvalSpec, progress: bool = True,
                        source: TextSource | None = None,
                        device: torch.device | None = None) -> PerplexityResult:
    """`source`, when the caller already loaded `spec.data`, saves parsing it again; `device`:
    the model runs there for the evaluation (None: where it is)."""
    source = source or load_text(spec.data, split="test")
    return perplexity(loaded.model, loaded.tokenizer, source, spec.seqlen, spec.max_windows,
                      spec.protocol, spec.bos, progress, batch_size=spec.batch_size,
                      compute_dtype=spec.compute_dtype, device=device)


SaveFormat = Literal["auto", "safetensors", "compressed-tensors", "bitmask", "gguf"]


def output_format(model: torch.nn.Module, requested: SaveFormat = "auto",
                  like: str | Path | None = None) -> str:
    """What an output is saved as, for every command and recipe: llama.cpp's block types as
    GGUF, quantized linears pack-quantized (compressed-tensors), else what was asked for;
    `auto` keeps a bitmask (compact) input `like` compact and writes anything else as
    safetensors. A format that cannot hold the model is refused."""
    from secateur.formats.compact import is_compact
    from secateur.quant.ggml import ggml_states
    from secateur.quant.state import is_quantized

    if ggml_states(model):
        if requested not in ("auto", "gguf"):
            raise SecateurError(f"save_format {requested} cannot hold llama.cpp's block types: "
                                "use gguf (or auto)")
        return "gguf"
    if requested == "gguf":
        raise SecateurError("save_format gguf needs a gguf step (method: gguf, preset: ...)")
    quantized = is_quantized(model)
    if requested == "auto":
        if quantized:
            return "compressed-tensors"
        compact = like is not None and Path(like).is_dir() and is_compact(Path(like))
        return "bitmask" if compact else "safetensors"
    if quantized and requested != "compressed-tensors":
        raise SecateurError(f"save_format {requested} cannot hold quantized weights: use "
                            "compressed-tensors (or auto)")
    if requested == "compressed-tensors" and not quantized:
        raise SecateurError("save_format compressed-tensors needs a quantization step; use "
                            "auto or safetensors")
    return requested


def save_output(loaded: Loaded, fmt: str, target: Path, metadata: dict[str, Any],
                overwrite: bool = False, *, nm: str | None = None,
                gguf_preset: str | None = None, name: str = "model",
                inputs: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """Write `loaded` in `fmt` (from `output_format`) to `target`, a folder, or for gguf the
    .gguf file itself; a GGUF's export record is returned. `nm`: a bitmask's N:M pattern."""
    if fmt == "gguf":  # llama.cpp's block types, the codes as the step rounded them
        from secateur.export import export_model
        from secateur.quant.ggml import ggml_states

        return export_model(loaded.model, loaded.tokenizer, "gguf", target, overwrite,
                            gguf_preset, name, inputs, quantized=ggml_states(loaded.model),
                            has_imatrix=True)
    if fmt == "compressed-tensors":  # pack-quantized, as vLLM and transformers load it
        from secateur.formats.packed_save import save_packed

        save_packed(loaded.model, loaded.tokenizer, target, metadata, overwrite)
    elif fmt == "bitmask":
        from secateur.formats.compact import save_compact

        save_compact(loaded.model, loaded.tokenizer, target, metadata, overwrite, nm=nm)
    else:
        save_model(loaded.model, loaded.tokenizer, target, metadata, overwrite)
    return None


@with_exit_stack
def prune_job(
    hold: contextlib.ExitStack,
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
    build_method(config)  # not a method config: fail before the model loads
    dev = resolve_device(device)  # --device cuda without CUDA: before anything loads
    if not distributed.is_main():
        out = json_path = None
        evaluation = EvalSpec(None)
        progress = False
    if out is not None:  # a second run on this --out fails here, naming the first one's pid
        check_free(Path(out))
    gguf_preset = getattr(config, "preset", None) if config.method == "gguf" else None
    inputs = [model_name, calibration.source, evaluation.data]
    if out is not None and gguf_preset is not None:  # one .gguf file, not a folder
        from secateur.export.gguf import check_gguf_output

        check_gguf_output(Path(out), overwrite, tuple(str(i) for i in inputs if i))
    elif out is not None:
        from secateur.config import quantizes

        check_output_dir(Path(out), overwrite, inputs=inputs,  # a pruned copy: about as big
                         needed_bytes=None if quantizes(config) else model_bytes(model_name))
    if json_path is not None:
        check_output_file(Path(json_path), "--json", inputs=inputs, overwrite=overwrite)
    # --out's working folder (secateur.workdir), locked until the job ends
    if out is not None and gguf_preset is None:
        _say_layers_discarded(WorkDir(Path(out)), resume, overwrite)
    work = None if out is None or gguf_preset is not None else hold.enter_context(
        WorkDir(Path(out)))
    # Loaded once, before the model: a missing eval text fails before any pruning.
    eval_text = load_text(evaluation.data, split="test") if evaluation.data is not None else None
    loaded = load(model_name, dtype=dtype)
    if out is not None:
        from secateur.config import quantizes
        from secateur.formats.packed_save import check_packable

        # refused here, not after the whole run when saving
        if quantizes(config) and gguf_preset is None:
            check_packable(loaded.adapter)
    dense_params = count_parameters(loaded.model)
    timings: dict[str, float] = {}
    dense = None
    if evaluation.data is not None and dense_perplexity is not None:
        dense = DensePerplexity(dense_perplexity, "given")
    elif evaluation.data is not None:
        dense = _dense_perplexity(loaded, model_name, evaluation, eval_text, dtype, progress,
                                  timings, dev)
    # in --out's working folder, where a rerun with --resume finds it; kept until the output
    # is saved (replacing --out removes it)
    checkpoint = None if work is None else work.folder("layers")
    if work is not None and not resume:
        work.discard("layers")
    run = run_step(loaded, config, calibration, progress=progress, checkpoint=checkpoint,
                   device=dev)
    timings["prune_seconds"] = run.seconds
    scored = None
    if evaluation.data is not None:
        t = timer(dev)
        scored = evaluate_perplexity(loaded, evaluation, progress, eval_text, dev)
        timings["eval_seconds"] = timer(dev) - t
    result = PruneResult(
        model_name, config.method, calibration.seed, run,
        {"dense": dense_params, "pruned": count_parameters(loaded.model)}, timings,
        peak_rss_mib(), Where.of(device_record(dev)), distributed.record(), dense, scored)
    if out is not None:
        fmt = output_format(loaded.model, "bitmask" if compact else "auto")
        result.gguf = save_output(loaded, fmt, Path(out), result.to_json(), overwrite,
                                  nm=getattr(config, "nm", None), gguf_preset=gguf_preset,
                                  name=model_name, inputs=(model_name,))
        result.out = str(out)
        result.bytes_on_disk = dir_bytes(Path(out))
    if checkpoint is not None:
        remove_checkpoint(checkpoint)
    if is_depth_summary(run.summary) and has_curve(run.summary):
        plots = [p for p in (json_path and Path(json_path).with_suffix(".png"),
                             out and Path(out) / "removals.png") if p is not None]
        result.removal_plot = [str(plot_removals(result.to_json(), p)) for p in plots]
    if json_path is not None:
        write_json_atomic(Path(json_path), result.to_json())
    return result


def _dense_perplexity(loaded, model_name: str, evaluation: EvalSpec, eval_text: TextSource,
                      dtype: str, progress: bool, timings: dict[str, float],
                      device: torch.device | None = None) -> DensePerplexity:
    """The dense figure from the perplexity cache (`secateur.eval.cache`), else evaluated and
    stored there; says which, and the cache file."""
    from secateur.eval import cache

    key = cache.key_for(model_name, eval_text, evaluation, dtype, str(device or "cpu"))
    hit = cache.read(key) if key is not None else None
    if hit is not None:
        return DensePerplexity(hit[0]["perplexity"], "cache", str(hit[1]))
    t = timer(device)
    dense = evaluate_perplexity(loaded, evaluation, progress, eval_text, device)
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
             zeroshot: ZeroShotSpec | None = None, overwrite: bool = False,
             device: str | None = "auto") -> EvalResult:
    """Perplexity (unless evaluation.data is None) and, given a ZeroShotSpec, lm-eval tasks.
    `overwrite`: replace an existing JSON file."""
    if evaluation.data is None and zeroshot is None:
        raise SecateurError("nothing to evaluate: give --data or --tasks")
    from secateur.eval.gguf import is_gguf

    # llama.cpp scores a GGUF file on its own: the flag is checked for torch's runs only
    dev = None if is_gguf(model_name) else resolve_device(device)
    eval_text = load_text(evaluation.data, split="test") if evaluation.data is not None else None
    if zeroshot is not None:  # unknown task names fail before the model loads
        check_tasks(zeroshot.tasks, resolve_data(zeroshot.data))
    if json_path is not None:
        check_output_file(Path(json_path), "--json", inputs=[model_name, evaluation.data],
                          overwrite=overwrite)
    from secateur.eval.gguf import gguf_perplexity, is_gguf

    if is_gguf(model_name):  # a llama.cpp file: scored by llama.cpp, on the same windows
        if zeroshot is not None:
            raise SecateurError("zero-shot tasks run in transformers; evaluate the model "
                                "folder the GGUF was made from, or drop --tasks")
        result = EvalResult(model_name, runtime="llama.cpp", scored=gguf_perplexity(
            model_name, eval_text, evaluation.seqlen, evaluation.max_windows,
            evaluation.protocol, evaluation.bos), bytes_on_disk=Path(model_name).stat().st_size)
    else:
        loaded = load(model_name, dtype=dtype)
        result = EvalResult(model_name)
        if evaluation.data is not None:
            result.scored = evaluate_perplexity(loaded, evaluation, progress, eval_text, dev)
        if zeroshot is not None:
            result.zeroshot = run_zeroshot(loaded.model, loaded.tokenizer, zeroshot, dtype,
                                           device=dev)
        result.where = Where.of(device_record(dev))
        result.parameters = count_parameters(loaded.model)["parameters"]
    if json_path is not None:
        write_json_atomic(Path(json_path), result.to_json())
    return result


@with_exit_stack
def prune_streamed_job(hold: contextlib.ExitStack, model_name: str, config: MethodConfig,
                       calibration: CalibrationConfig,
                       out: Path, json_path: Path | None = None, overwrite: bool = False,
                       dtype: str = "float32", progress: bool = True,
                       resume: bool = False, device: str | None = "auto") -> StreamedResult:
    """A layer-wise prune with one decoder layer in memory at a time, written to `out`.

    The model never exists whole in memory, so it is evaluated by loading `out` afterwards
    (`secateur eval OUT`); the result records peak RSS against the model's size."""
    from secateur.api import resolve_data
    from secateur.engine.streamed import prune_streamed
    from secateur.formats.streaming import load_streamed

    method = build_method(config)
    dev = resolve_device(device)  # before anything loads
    check_free(Path(out))  # a second run on this --out fails here, naming the first one's pid
    inputs = [model_name, calibration.source]
    check_output_dir(Path(out), overwrite, inputs=inputs, needed_bytes=model_bytes(model_name))
    if json_path is not None:
        check_output_file(Path(json_path), "--json", inputs=inputs, overwrite=overwrite)
    _say_layers_discarded(WorkDir(Path(out)), resume, overwrite)
    work = hold.enter_context(WorkDir(Path(out)))  # locked until the job ends
    loaded, weights = load_streamed(model_name, dtype=dtype)
    windows, calib_record = resolve_data(loaded, calibration, calibration.seed)
    checkpoint = work.folder("layers")  # for --resume; goes when the output replaces --out
    if not resume:
        work.discard("layers")
    # the saved model's record: where it computed, not yet a CUDA device's peak
    start = StreamedResult(model_name, config.method, config.settings(), calib_record,
                           Where(str(dev)))
    with compute_dtype(calibration.compute_dtype):
        run = prune_streamed(loaded, weights, method, windows, Path(out), overwrite=overwrite,
                             checkpoint=checkpoint, progress=progress, device=dev,
                             metadata=lambda r: replace(start, run=r).to_json())
    result = replace(start, run=run, where=Where.of(device_record(dev)),
                     bytes_on_disk=dir_bytes(Path(out)))
    if json_path is not None:
        write_json_atomic(Path(json_path), result.to_json())
    return result


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
    from secateur.recovery.lora import train_lora

    return recovery_job(
        "lora", model_dir, out,
        lambda student, _, ckpt: train_lora(student, config, ckpt, progress, on_step),
        evaluation, json_path, overwrite, progress, device=device)


def distill_job(student_dir: str, teacher: str, out: Path, config: DistillConfig,
                evaluation: Any = None, json_path: Path | None = None,
                overwrite: bool = False, progress: bool = True,
                on_step: Callable[[int, float], None] | None = None,
                device: str | None = "auto") -> RecoveryResult:
    """Load student and teacher, evaluate both, distill with checkpoints, evaluate, save.

    `evaluation` is an `EvalSpec` (data None: no perplexity). The result holds the
    dense-to-pruned perplexity gap and the share of it recovered."""
    from secateur.recovery.distill import check_models, distill

    return recovery_job(
        "distill", student_dir, out,
        lambda student, reference, ckpt: distill(student, reference, config, ckpt, progress,
                                                 on_step),
        evaluation, json_path, overwrite, progress, teacher=teacher,
        check=lambda student, reference: check_models(student, reference, config),
        device=device)


def dwq_job(model_dir: str, teacher: str, out: Path, config: DWQConfig, evaluation: Any = None,
            json_path: Path | None = None, overwrite: bool = False, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> RecoveryResult:
    """Load a quantized (compressed-tensors) model and its teacher, evaluate, learn its grids
    with checkpoints, evaluate, save packed again."""
    from secateur.recovery.dwq import check_models, dwq

    return recovery_job(
        "dwq", model_dir, out,
        lambda student, reference, ckpt: dwq(student, reference, config, ckpt, progress,
                                             on_step),
        evaluation, json_path, overwrite, progress, teacher=teacher,
        check=check_models, load_student=_with_grids)


def _with_grids(model_dir: str) -> Loaded:
    """A compressed-tensors folder with its grids restored (DWQ learns them); any other model
    as usual."""
    from secateur.formats.packed_load import ct_quantization_config, load_quantized

    if Path(model_dir).is_dir() and ct_quantization_config(Path(model_dir)) is not None:
        return load_quantized(model_dir)
    return load(model_dir)


def recovery_job(name: str, model_dir: str, out: Path, train: Trainer, evaluation: Any = None,
                 json_path: Path | None = None, overwrite: bool = False, progress: bool = True,
                 teacher: str | None = None,
                 check: Callable[[Loaded, Loaded | None], None] | None = None,
                 load_student: Callable[[str], Loaded] | None = None,
                 device: str | None = "auto") -> RecoveryResult:
    """Check outputs, load (and `check`) the model and any teacher, evaluate, train with a
    checkpoint in `out`'s working folder (locked: a second run on `out` fails at once),
    evaluate again, save, write the JSON. With a teacher the result also holds its perplexity
    and the share of the perplexity gap recovered. `device`: where evaluation and training
    run (the models are loaded on the CPU and saved from it)."""
    dev = resolve_device(device)  # --device cuda without CUDA: before anything loads
    out = Path(out)
    check_free(out)  # a second run on this --out fails here, in one line naming the first
    inputs = [model_dir] + ([teacher] if teacher else [])
    check_output_dir(out, overwrite, inputs=inputs)
    if json_path is not None:
        check_output_file(Path(json_path), "--json", inputs=inputs, overwrite=overwrite)
    with WorkDir(out) as work:
        result = _recover(name, model_dir, work, train, evaluation, overwrite, progress,
                          teacher, check, load_student, dev)
    result.out = str(out)
    result.bytes_on_disk = dir_bytes(out)
    if json_path is not None:
        write_json_atomic(Path(json_path), result.to_json())
    return result


def _recover(name: str, model_dir: str, work: WorkDir, train: Trainer, evaluation: Any,
             overwrite: bool, progress: bool, teacher: str | None,
             check: Callable[[Loaded, Loaded | None], None] | None,
             load_student: Callable[[str], Loaded] | None,
             device: torch.device | None = None) -> RecoveryResult:
    """`recovery_job` once `out` is checked and locked: everything up to the saved model
    (`load_student`: how the model is read, default `load`)."""
    from secateur.recovery.training import training_on

    out = work.out
    evaluate = evaluation is not None and evaluation.data is not None
    eval_text = load_text(evaluation.data, split="test") if evaluate else None
    student = (load_student or load)(model_dir)
    reference = load(teacher) if teacher else None
    if check is not None:
        check(student, reference)
    result = RecoveryResult(str(model_dir), name, teacher=str(teacher) if teacher else None)
    if evaluate and reference is not None:
        result.teacher_perplexity = evaluate_perplexity(reference, evaluation, progress,
                                                        eval_text, device).perplexity
    if evaluate:
        result.perplexity_before = evaluate_perplexity(student, evaluation, progress,
                                                       eval_text, device).perplexity
    ckpt = work.folder(name)
    with training_on(device, student, reference):
        result.training = train(student, reference, ckpt)
    if evaluate:
        result.scored = evaluate_perplexity(student, evaluation, progress, eval_text, device)
        if reference is not None:
            gap = result.perplexity_before - result.teacher_perplexity
            # absent when the student was not worse than its teacher
            if gap > 0:
                result.gap_recovered = (result.perplexity_before - result.scored.perplexity) / gap
    result.parameters = count_parameters(student.model)["parameters"]
    result.peak_rss_mib = peak_rss_mib()
    result.where = Where.of(device_record(device))
    # a compact input is saved compact again, DWQ's grids packed again; replaces `out`,
    # the checkpoint too
    save_output(student, output_format(student.model, like=model_dir), out, result.to_json(),
                overwrite)
    work.discard(name)
    return result
