"""A layer-wise prune of a model bigger than memory, from safetensors folder to saved folder.

`prune_streamed` runs the method's `prepare()` and the layer loop with one decoder layer
resident at a time (`secateur.formats.streaming`), writes each finished layer to its output
shard, and renames the finished folder into place. It reports the process's peak resident
memory against the model's size, which is the point of streaming.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from secateur.engine.checkpoint import remove_checkpoint
from secateur.engine.sequential import collect_layer_stats, prune_layerwise
from secateur.errors import SecateurError
from secateur.formats.streaming import StreamedWeights
from secateur.io import atomic_dir, write_json_atomic
from secateur.methods.base import LayerReport, LayerwiseMethod, PruneContext

MIB = 2**20


def peak_rss_bytes() -> int:
    """This process's peak resident set so far.

    Linux's VmHWM, not ru_maxrss: a process started by fork or vfork then exec inherits its
    parent's ru_maxrss (a test or job runner holding a model would be reported as ours)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class StreamedPrune:
    """What a streamed prune did and what it held in memory while doing it."""

    out: str
    layers: list[dict[str, Any]] = field(default_factory=list)  # LayerReport dicts
    summary: dict[str, Any] = field(default_factory=dict)  # the method's
    model_mib: float = 0.0  # all weights at the loaded dtype (a tied head counted once)
    largest_layer_mib: float = 0.0
    rest_mib: float = 0.0  # embeddings, head, norms (file-mapped when their dtype is kept)
    peak_rss_mib: float = 0.0  # the whole process's peak, imports included
    seconds: float = 0.0

    @property
    def peak_over_model(self) -> float:
        return self.peak_rss_mib / self.model_mib if self.model_mib else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "peak_over_model": self.peak_over_model}


def prune_streamed(
    loaded: Any,
    weights: StreamedWeights,
    method: LayerwiseMethod,
    calibration: list[torch.Tensor],
    out: Path,
    *,
    overwrite: bool = False,
    checkpoint: Path | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    metadata: Callable[[StreamedPrune], dict[str, Any]] | None = None,
    on_layer_done: Callable[[int], None] | None = None,
) -> StreamedPrune:
    """Prune `loaded` (from `load_streamed`, which also gave `weights`) into the folder `out`.

    `out` is checked before any work and appears only complete. `checkpoint` makes a killed
    run resumable (see `prune_layerwise`). `metadata(result)`, if given, is written to
    `out/secateur.json`.
    """
    if not isinstance(method, LayerwiseMethod):
        raise SecateurError(f"{type(method).__name__} needs the whole model in memory; only "
                            "layer-wise methods (magnitude, wanda, sparsegpt, gptq, rtn) can "
                            "stream")
    start = time.perf_counter()
    model, adapter = loaded.model, loaded.adapter
    rest = sum(t.numel() * t.element_size() for t in
               {id(t): t for t in model.state_dict(keep_vars=True).values()
                if not t.is_meta}.values())
    result = StreamedPrune(out=str(out), model_mib=weights.model_bytes / MIB,
                           largest_layer_mib=weights.largest_layer_bytes / MIB,
                           rest_mib=rest / MIB)
    context = PruneContext(
        model=model, tokenizer=loaded.tokenizer, adapter=adapter, calibration=calibration,
        seed=0, progress=progress, loaded=loaded,
        layerwise_stats=lambda needs, on_layer: collect_layer_stats(
            model, adapter, calibration, needs, on_layer, progress, stream=weights))
    with atomic_dir(Path(out), overwrite, inputs=[loaded.path]) as tmp:
        weights.begin(tmp)
        method.prepare(model, adapter, context)
        reports: list[LayerReport] = prune_layerwise(
            model, adapter, method, calibration, None, progress, device, checkpoint,
            stream=weights, keep_checkpoint=True, on_layer_done=on_layer_done)
        weights.finish(loaded.tokenizer)
        result.layers = [asdict(r) for r in reports]
        result.summary = method.summary()
        result.seconds = time.perf_counter() - start
        result.peak_rss_mib = peak_rss_bytes() / MIB
        if metadata is not None:
            write_json_atomic(tmp / "secateur.json", metadata(result))
    if checkpoint is not None:  # only now: a kill before the rename must still resume
        remove_checkpoint(checkpoint)
    return result
