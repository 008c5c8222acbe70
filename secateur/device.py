"""Where the computing runs: `--device auto|cpu|cuda|cuda:N`, checked before any model loads.

The model itself stays on the CPU (or on disk, streamed): layer-wise methods move one decoder
layer at a time to the device (`secateur.engine.sequential`), whole-model steps (evaluation,
depth search, LoRA/KD, Taylor scores) move the model there for the step and back after
(`on_device`). `auto` is CUDA when torch sees a CUDA device, else the CPU. On the CPU nothing
moves, so results are bit-identical to a run without the flag.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError

DEVICE_HELP = ("Where to compute: auto (cuda if available, else cpu), cpu, cuda or cuda:N; "
               "the model stays on the CPU and layers (or the model, for whole-model steps) "
               "move to the device.")
_SPELLING = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_spelling(name: str) -> str:
    """`name` if it is one of auto, cpu, cuda, cuda:N; else a ValueError (for pydantic)."""
    if not isinstance(name, str) or not _SPELLING.match(name.strip()):
        raise ValueError(f"device is auto, cpu, cuda or cuda:N, got {name!r}")
    return name.strip()


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device `name` means on this machine; one-line SecateurError (exit 2) when it
    names a CUDA device this machine does not have. Call it before loading anything."""
    if isinstance(name, torch.device):
        name = str(name)
    try:
        name = check_spelling("auto" if name is None else name)
    except ValueError as err:
        raise SecateurError(f"--{err}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA device (check CUDA_VISIBLE_DEVICES and the driver)")
        raise SecateurError(f"no CUDA device: --device {name} needs one, and {why}; use "
                            "--device cpu (or auto)")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise SecateurError(f"no CUDA device {device.index}: this machine has {count} "
                            f"(cuda:0 to cuda:{count - 1})")
    return device


def is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


@contextmanager
def on_device(model: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """The whole model on `device` inside the block, back where it was after (also on an
    error). On its own device nothing moves."""
    home = model_device(model)
    if device is None or device == home:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
        if is_cuda(device):
            torch.cuda.empty_cache()


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work, so that a timer reads what it ran (CUDA is async)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def timer(device: torch.device | None = None) -> float:
    """`time.perf_counter()` once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


def peak_device_mib(device: torch.device | None) -> float | None:
    """Peak memory torch allocated on a CUDA device so far; None on the CPU (see RSS)."""
    if not is_cuda(device):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def device_record(device: torch.device | None) -> dict[str, Any]:
    """What a result says about where it was computed."""
    device = device or torch.device("cpu")
    record: dict[str, Any] = {"device": str(device)}
    if is_cuda(device):
        record["device_name"] = torch.cuda.get_device_name(device)
        record["peak_device_mib"] = peak_device_mib(device)
    return record
