"""End-to-end jobs behind CLI commands: prune (+ evaluate, save) and evaluate."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secateur import distributed
from secateur.api import CalibrationConfig, count_parameters, peak_rss_mib, run_step
from secateur.config import MethodConfig
from secateur.data.sources import TextSource, load_text
from secateur.device import device_record, resolve_device, timer
from secateur.engine.capture import compute_dtype
from secateur.engine.checkpoint import remove_checkpoint
from secateur.errors import SecateurError
from secateur.eval.perplexity import perplexity
from secateur.eval.zeroshot import ZeroShotSpec, check_tasks, resolve_data
from secateur.eval.zeroshot import zeroshot as run_zeroshot
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.io import dir_bytes, write_json_atomic
from secateur.methods import build_method
from secateur.outputs import check_output_dir, check_output_file, model_bytes
from secateur.report.depth import has_curve, is_depth_summary, plot_removals
from secateur.workdir import WorkDir, check_free, with_exit_stack


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
                        device: torch.device | None = None) -> dict[str, Any]:
    """`source`, when the caller already loaded `spec.data`, saves parsing it again; `device`:
    the model runs there for the evaluation (None: where it is)."""
    source = source or load_text(spec.data, split="test")
    return perplexity(loaded.model, loaded.tokenizer, source, spec.seqlen, spec.max_windows,
                      spec.protocol, spec.bos, progress, batch_size=spec.batch_size,
                      compute_dtype=spec.compute_dtype, device=device).to_dict()


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
) -> dict[str, Any]:
    """Load, evaluate dense, prune, evaluate pruned, save; the result as a JSON-able dict.

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
    result: dict[str, Any] = {"model": model_name, "method": config.method, "seed":
                              calibration.seed}
    dense_params = count_parameters(loaded.model)
    timings: dict[str, float] = {}
    if evaluation.data is not None and dense_perplexity is not None:
        result["dense_perplexity"] = dense_perplexity
        result["dense_perplexity_source"] = "given"
    elif evaluation.data is not None:
        result.update(_dense_perplexity(loaded, model_name, evaluation, eval_text, dtype,
                                        progress, timings, dev))
    # in --out's working folder, where a rerun with --resume finds it; kept until the output
    # is saved (replacing --out removes it)
    checkpoint = None if work is None else work.folder("layers")
    if work is not None and not resume:
        work.discard("layers")
    run = run_step(loaded, config, calibration, progress=progress, checkpoint=checkpoint,
                   device=dev)
    timings["prune_seconds"] = run.seconds
    if evaluation.data is not None:
        t = timer(dev)
        pruned = evaluate_perplexity(loaded, evaluation, progress, eval_text, dev)
        timings["eval_seconds"] = timer(dev) - t
        result["perplexity"] = pruned["perplexity"]
        result["tokens"] = pruned["tokens"]
        result["protocol"] = pruned["protocol"]
    pruned_params = count_parameters(loaded.model)
    result.update({
        "sparsity": run.sparsity,
        "parameters": {"dense": dense_params, "pruned": pruned_params},
        "timings": timings,
        "peak_rss_mib": peak_rss_mib(),
        **device_record(dev),  # device, and a CUDA device's name and peak allocation
        "calibration": run.calibration,
        "distributed": distributed.record(),
        "options": run.config,
        "summary": run.summary,
        "layers": run.layers,
    })
    if out is not None:
        from secateur.quant.state import is_quantized

        if gguf_preset is not None:  # llama.cpp's block types, the codes as rounded
            from secateur.export import export_model
            from secateur.quant.ggml import ggml_states

            result["gguf"] = export_model(
                loaded.model, loaded.tokenizer, "gguf", Path(out), overwrite, gguf_preset,
                model_name, (model_name,), quantized=ggml_states(loaded.model),
                has_imatrix=True)
        elif is_quantized(loaded.model):  # compressed-tensors pack-quantized, as vLLM loads
            from secateur.formats.packed_save import save_packed

            save_packed(loaded.model, loaded.tokenizer, Path(out), result, overwrite)
        elif compact:
            from secateur.formats.compact import save_compact

            save_compact(loaded.model, loaded.tokenizer, Path(out), result, overwrite,
                         nm=getattr(config, "nm", None))
        else:
            save_model(loaded.model, loaded.tokenizer, Path(out), result, overwrite)
        result["out"] = str(out)
        result["bytes_on_disk"] = dir_bytes(Path(out))
    if checkpoint is not None:
        remove_checkpoint(checkpoint)
    if is_depth_summary(run.summary) and has_curve(run.summary):
        plots = [p for p in (json_path and Path(json_path).with_suffix(".png"),
                             out and Path(out) / "removals.png") if p is not None]
        result["removal_plot"] = [str(plot_removals(result, p)) for p in plots]
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result


def _dense_perplexity(loaded, model_name: str, evaluation: EvalSpec, eval_text: TextSource,
                      dtype: str, progress: bool, timings: dict[str, float],
                      device: torch.device | None = None) -> dict[str, Any]:
    """The dense figure from the perplexity cache (`secateur.eval.cache`), else evaluated and
    stored there; says which, and the cache file."""
    from secateur.eval import cache

    key = cache.key_for(model_name, eval_text, evaluation, dtype, str(device or "cpu"))
    hit = cache.read(key) if key is not None else None
    if hit is not None:
        return {"dense_perplexity": hit[0]["perplexity"], "dense_perplexity_source": "cache",
                "dense_perplexity_cache": str(hit[1])}
    t = timer(device)
    dense = evaluate_perplexity(loaded, evaluation, progress, eval_text, device)
    timings["dense_eval_seconds"] = timer(device) - t
    stored = cache.write(key, dense) if key is not None else None
    return {"dense_perplexity": dense["perplexity"], "dense_perplexity_source": "computed",
            "dense_perplexity_cache": None if stored is None else str(stored)}


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
             device: str | None = "auto") -> dict[str, Any]:
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
        result = {"model": model_name, "runtime": "llama.cpp",
                  **gguf_perplexity(model_name, eval_text, evaluation.seqlen,
                                    evaluation.max_windows, evaluation.protocol,
                                    evaluation.bos).to_dict(),
                  "bytes_on_disk": Path(model_name).stat().st_size}
        if json_path is not None:
            write_json_atomic(Path(json_path), result)
        return result
    loaded = load(model_name, dtype=dtype)
    result: dict[str, Any] = {"model": model_name}
    if evaluation.data is not None:
        result.update(evaluate_perplexity(loaded, evaluation, progress, eval_text, dev))
    if zeroshot is not None:
        result["zeroshot"] = run_zeroshot(loaded.model, loaded.tokenizer, zeroshot, dtype,
                                          device=dev)
    result.update(device_record(dev))
    result["parameters"] = count_parameters(loaded.model)["parameters"]
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result


@with_exit_stack
def prune_streamed_job(hold: contextlib.ExitStack, model_name: str, config: MethodConfig,
                       calibration: CalibrationConfig,
                       out: Path, json_path: Path | None = None, overwrite: bool = False,
                       dtype: str = "float32", progress: bool = True,
                       resume: bool = False, device: str | None = "auto") -> dict[str, Any]:
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
    result: dict[str, Any] = {"model": model_name, "method": config.method,
                              "options": config.settings(), "calibration": calib_record,
                              "streamed": True, "device": str(dev)}
    with compute_dtype(calibration.compute_dtype):
        run = prune_streamed(loaded, weights, method, windows, Path(out), overwrite=overwrite,
                             checkpoint=checkpoint, progress=progress, device=dev,
                             metadata=lambda r: {**result, **r.to_dict()})
    result.update(run.to_dict())
    result.update(device_record(dev))
    result["bytes_on_disk"] = dir_bytes(Path(out))
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result
