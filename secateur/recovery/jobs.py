"""The end-to-end recovery job behind `secateur recover` and `secateur distill`, and what the
recovery steps share: saving like the input, the model a step trains, the checkpoint folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from secateur.device import model_device, on_device, resolve_device
from secateur.methods.base import PruneContext
from secateur.models.loading import Loaded
from secateur.recovery.training import TrainResult
from secateur.workdir import WorkDir, check_free

# train(student, teacher or None, checkpoint folder) -> the run's result
Trainer = Callable[[Loaded, Loaded | None, Path], TrainResult]


def save_like_input(loaded: Loaded, model_dir: str, out: Path, result: dict[str, Any],
                    overwrite: bool) -> None:
    """A compact (bitmask) input is saved compact again, a model holding quantization grids
    (DWQ's) packed again, anything else as safetensors."""
    from secateur.quant.state import is_quantized
    from secateur.surgery.compact import is_compact, save_compact
    from secateur.surgery.save import save_model

    source = Path(model_dir)
    if is_quantized(loaded.model):
        from secateur.quant.pack import save_packed

        save_packed(loaded.model, loaded.tokenizer, out, result, overwrite)
    elif source.is_dir() and is_compact(source):
        save_compact(loaded.model, loaded.tokenizer, out, result, overwrite)
    else:
        save_model(loaded.model, loaded.tokenizer, out, result, overwrite)


def recovery_loaded(context: PruneContext) -> Loaded:
    """The model a recovery step trains: the API's Loaded, or one built from the context."""
    if context.loaded is not None:
        return context.loaded
    return Loaded(context.model, context.tokenizer, context.adapter, "", "")


@contextmanager
def training_on(device: torch.device | None, student: Loaded,
                teacher: Loaded | None = None) -> Iterator[None]:
    """Student (and teacher) on `device` for the training, back home after, also when the
    training replaced `student.model` (a LoRA merge). On CUDA the student trains with
    gradient checkpointing (activations recomputed in the backward: a layer's worth of
    them resident, not the whole model's); the CPU path is unchanged."""
    home = model_device(student.model)
    with ExitStack() as stack:
        stack.enter_context(on_device(student.model, device))
        if teacher is not None:
            stack.enter_context(on_device(teacher.model, device))
        checkpointing = (device is not None and device.type == "cuda"
                         and getattr(student.model, "supports_gradient_checkpointing", False))
        if checkpointing:
            student.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            yield
        finally:
            if checkpointing and hasattr(student.model, "gradient_checkpointing_disable"):
                student.model.gradient_checkpointing_disable()
    student.model.to(home)


def checkpoint_dir(out: Path, name: str) -> Path:
    """Where a recovery into `out` keeps its resumable state: in `out`'s own working folder
    (`secateur.workdir`), so a rerun of the same command resumes from it."""
    return WorkDir(Path(out)).folder(name)


def recovery_job(name: str, model_dir: str, out: Path, train: Trainer, evaluation: Any = None,
                 json_path: Path | None = None, overwrite: bool = False, progress: bool = True,
                 teacher: str | None = None,
                 check: Callable[[Loaded, Loaded | None], None] | None = None,
                 load_student: Callable[[str], Loaded] | None = None,
                 device: str | None = "auto") -> dict[str, Any]:
    """Check outputs, load (and `check`) the model and any teacher, evaluate, train with a
    checkpoint in `out`'s working folder (locked: a second run on `out` fails at once),
    evaluate again, save, write the JSON. With a teacher the result also holds its perplexity
    and the share of the perplexity gap recovered. `device`: where evaluation and training
    run (the models are loaded on the CPU and saved from it)."""
    from secateur.io import dir_bytes, write_json_atomic
    from secateur.outputs import check_output_dir, check_output_file

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
    result["out"] = str(out)
    result["bytes_on_disk"] = dir_bytes(out)
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result


def _recover(name: str, model_dir: str, work: WorkDir, train: Trainer, evaluation: Any,
             overwrite: bool, progress: bool, teacher: str | None,
             check: Callable[[Loaded, Loaded | None], None] | None,
             load_student: Callable[[str], Loaded] | None,
             device: torch.device | None = None) -> dict[str, Any]:
    """`recovery_job` once `out` is checked and locked: everything up to the saved model
    (`load_student`: how the model is read, default `load`)."""
    from secateur.bench.memory import peak_rss_mib
    from secateur.data.sources import load_text
    from secateur.device import device_record
    from secateur.jobs import evaluate_perplexity
    from secateur.models.loading import load
    from secateur.params import count_parameters

    out = work.out
    evaluate = evaluation is not None and evaluation.data is not None
    eval_text = load_text(evaluation.data, split="test") if evaluate else None
    student = (load_student or load)(model_dir)
    reference = load(teacher) if teacher else None
    if check is not None:
        check(student, reference)
    result: dict[str, Any] = {"model": str(model_dir), "recovery": name}
    if teacher:
        result["teacher"] = str(teacher)
    if evaluate and reference is not None:
        result["teacher_perplexity"] = evaluate_perplexity(reference, evaluation, progress,
                                                           eval_text, device)["perplexity"]
    if evaluate:
        result["perplexity_before"] = evaluate_perplexity(student, evaluation, progress,
                                                          eval_text, device)["perplexity"]
    ckpt = work.folder(name)
    with training_on(device, student, reference):
        result[name] = train(student, reference, ckpt).to_dict()
    if evaluate:
        after = evaluate_perplexity(student, evaluation, progress, eval_text, device)
        result["perplexity"], result["protocol"] = after["perplexity"], after["protocol"]
        if reference is not None:
            gap = result["perplexity_before"] - result["teacher_perplexity"]
            # 1 is all the way back to the teacher; absent when the student was not worse
            if gap > 0:
                result["gap_recovered"] = (result["perplexity_before"] - after["perplexity"]) / gap
    result["parameters"] = count_parameters(student.model)["parameters"]
    result["peak_rss_mib"] = peak_rss_mib()
    result.update(device_record(device))
    save_like_input(student, model_dir, out, result, overwrite)  # replaces `out`, ckpt too
    work.discard(name)
    return result
