"""The Python API behind the CLI: load, prune, evaluate."""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from secateur.data.sources import load_text
from secateur.data.windows import calibration_windows
from secateur.engine.block_search import BlockSearch
from secateur.engine.capture import capture_layer_inputs
from secateur.engine.sequential import collect_layer_stats, prune_layerwise
from secateur.eval.perplexity import context_length
from secateur.methods import LayerwiseMethod, PruneContext, PruneOptions, build_method
from secateur.models.loading import Loaded
from secateur.params import count_parameters as count_parameters  # re-exported API


@dataclass
class CalibrationSpec:
    source: str = "c4-sample"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass
class PruneRun:
    method: str
    options: dict[str, Any]
    calibration: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_data(loaded: Loaded, spec: CalibrationSpec) -> tuple[list[torch.Tensor], dict]:
    ctx = context_length(loaded.model)
    seqlen = min(spec.seqlen, ctx) if ctx else spec.seqlen
    source = load_text(spec.source, split="train")
    windows = calibration_windows(loaded.tokenizer, source, spec.nsamples, seqlen, spec.seed)
    record = {"source": source.name, "origin": source.origin, "nsamples": spec.nsamples,
              "seqlen": seqlen, "seed": spec.seed,
              "sampler": "random document longer than seqlen, random start (SparseGPT/Wanda)"}
    return windows, record


def prune(
    loaded: Loaded,
    options: PruneOptions,
    calibration: CalibrationSpec | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> PruneRun:
    """Prune `loaded.model` in place with the method `options.method` names."""
    method = build_method(options)  # validates the options before any slow work
    spec = calibration or CalibrationSpec()
    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    windows, calib_record = calibration_data(loaded, spec)
    model, adapter = loaded.model, loaded.adapter
    context = PruneContext(
        model=model, tokenizer=loaded.tokenizer, adapter=adapter, calibration=windows,
        seed=spec.seed,
        capture=lambda: capture_layer_inputs(model, adapter, windows),
        layerwise_stats=lambda needs, on_layer: collect_layer_stats(
            model, adapter, windows, needs, on_layer, progress),
        block_search=lambda subset=None, batch_size=8, dtype=None: BlockSearch(
            model, adapter, windows if subset is None else subset, batch_size, progress, dtype),
    )
    run = PruneRun(method=options.method, options=asdict(options), calibration=calib_record)
    if isinstance(method, LayerwiseMethod):
        method.prepare(model, adapter, context)
        reports = prune_layerwise(model, adapter, method, windows, options.sequential,
                                  progress, device)
        run.layers = [asdict(r) for r in reports]
        run.summary = method.summary()
    else:
        run.summary = method.run(context)
    run.seconds = time.perf_counter() - start
    run.peak_rss_mib = peak_rss_mib()
    return run


def achieved_sparsity(run: PruneRun) -> float | None:
    """Zeros over all pruned matrices' weights."""
    zeros = total = 0.0
    for layer in run.layers:
        for m in layer["matrices"].values():
            zeros += m["sparsity"] * m["numel"]
            total += m["numel"]
    return zeros / total if total else None
