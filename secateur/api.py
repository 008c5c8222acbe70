"""The Python API: one verb per kind of step, a typed config saying what.

    loaded = secateur.load("smollm2-135m")
    secateur.prune(loaded, WandaConfig(sparsity=0.5), data="c4-sample")
    secateur.quantize(loaded, GPTQConfig(bits=4, group_size=128), data=CalibrationConfig(...))
    secateur.evaluate(loaded, PerplexityConfig(data="wiki"))

`data` is a text source name (`c4-sample`, `wiki`, a Hub dataset), a local text path, a
`CalibrationConfig`, or ready token windows (a (n, seqlen) tensor or a list of (1, seqlen)
tensors).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from secateur.bench.memory import peak_rss_mib
from secateur.config import Config, MethodConfig, StepKind
from secateur.data.sources import load_text
from secateur.data.windows import calibration_windows, fit_seqlen
from secateur.device import device_record, on_device, resolve_device, synchronize
from secateur.engine.block_search import BlockSearch
from secateur.engine.capture import compute_dtype
from secateur.engine.sequential import collect_layer_stats, prune_layerwise
from secateur.errors import SecateurError
from secateur.eval.config import ComputeDtype
from secateur.eval.perplexity import context_length
from secateur.formats.loader import load
from secateur.methods import LayerwiseMethod, PruneContext, build_method
from secateur.models.base import adapter_for
from secateur.models.loading import Loaded
from secateur.params import count_parameters as count_parameters  # re-exported API


class CalibrationConfig(Config):
    """Which calibration windows: SparseGPT/Wanda's sampler over a text source."""

    source: str = Field("c4-sample", description="Calibration text.")
    nsamples: int = Field(128, ge=1, description="Calibration windows.")
    seqlen: int = Field(2048, ge=2, description="Tokens per calibration window.")
    seed: int = Field(0, ge=0, description="Picks calibration windows and breaks ties.")
    compute_dtype: ComputeDtype = Field(
        "float32", description="dtype of the calibration forwards that gather statistics "
                               "(bfloat16: autocast; X^T X and column norms stay fp32/fp64).")

    def __init__(self, source: str = "c4-sample", nsamples: int = 128, seqlen: int = 2048,
                 seed: int = 0, **kw: Any) -> None:
        super().__init__(source=source, nsamples=nsamples, seqlen=seqlen, seed=seed, **kw)


Data = str | Path | CalibrationConfig | torch.Tensor | Sequence[torch.Tensor] | None


@dataclass
class Count:
    """`count_parameters`' record, read typed."""

    parameters: int
    nonzero: int

    @classmethod
    def of(cls, record: dict[str, int]) -> Count:
        return cls(record["parameters"], record["nonzero"])


@dataclass
class LayerSummary:
    """One layer of a layer-wise step as a table row."""

    index: int
    target: float | None
    sparsity: float | None  # zeros over the layer's matrices that report a sparsity
    relative_error: float | None


@dataclass
class StepResult:
    """What one step did: its settings, per-layer reports, summary, cost."""

    method: str
    kind: str
    config: dict[str, Any]
    calibration: dict[str, Any] | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, dict[str, int]] = field(default_factory=dict)  # before / after
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    perplexity: float | None = None  # after the step, when a recipe asks for it
    device: str = "cpu"  # where it computed; beside RSS, a CUDA device's peak allocation
    peak_device_mib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def after(self) -> Count:
        return Count.of(self.parameters["after"])

    def layer_summaries(self) -> list[LayerSummary]:
        out = []
        for layer in self.layers:
            # w8a8's matrices record errors, not sparsity
            sized = [m for m in layer["matrices"].values() if "sparsity" in m and "numel" in m]
            total = sum(m["numel"] for m in sized)
            zeros = sum(m["sparsity"] * m["numel"] for m in sized)
            out.append(LayerSummary(layer["index"], layer.get("target"),
                                    zeros / total if total else None,
                                    layer.get("relative_error")))
        return out

    @property
    def sparsity(self) -> float | None:
        """Zeros over all weights of the matrices a layer-wise method touched."""
        zeros = total = 0.0
        for layer in self.layers:
            for m in layer["matrices"].values():
                if "sparsity" in m:
                    zeros += m["sparsity"] * m["numel"]
                    total += m["numel"]
        return zeros / total if total else None


def calibration_data(loaded: Loaded, spec: CalibrationConfig
                     ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    fit = fit_seqlen(spec.seqlen, context_length(loaded.model))
    seqlen = fit.used
    if fit.capped:
        warnings.warn(fit.warning(), stacklevel=2)
    source = load_text(spec.source, split="train")
    windows = calibration_windows(loaded.tokenizer, source, spec.nsamples, seqlen, spec.seed)
    record = {"source": source.name, "origin": source.origin, "nsamples": spec.nsamples,
              "seqlen": seqlen, "seed": spec.seed, "compute_dtype": spec.compute_dtype,
              "sampler": "random document longer than seqlen, random start (SparseGPT/Wanda)"}
    record.update(fit.record())
    return windows, record


def _given_windows(data: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    rows = list(data.unbind(0)) if isinstance(data, torch.Tensor) else list(data)
    if not rows:
        raise SecateurError("data holds no token windows")
    windows = []
    for row in rows:
        if not isinstance(row, torch.Tensor) or row.dtype not in (torch.int64, torch.int32):
            raise SecateurError("token windows must be integer tensors of token ids")
        windows.append(row.reshape(1, -1).long())
    return windows


def resolve_data(loaded: Loaded, data: Data, seed: int = 0
                 ) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Calibration windows and their record from whatever `data` the caller gave."""
    if isinstance(data, torch.Tensor) or (isinstance(data, Sequence)
                                          and not isinstance(data, str)):
        windows = _given_windows(data)
        return windows, {"source": "token windows given by the caller",
                         "nsamples": len(windows), "seqlen": windows[0].shape[1], "seed": seed}
    if data is None:
        spec = CalibrationConfig()
    elif isinstance(data, CalibrationConfig):
        spec = data
    else:
        spec = CalibrationConfig(source=str(data))
    return calibration_data(loaded, spec)


def as_loaded(model: Loaded | str | Path | torch.nn.Module, tokenizer: Any = None) -> Loaded:
    if isinstance(model, Loaded):
        return model
    if isinstance(model, str | Path):
        return load(model)
    if isinstance(model, torch.nn.Module):
        return Loaded(model, tokenizer, adapter_for(model), type(model).__name__, "in memory")
    raise SecateurError(f"expected a loaded model, a model name or an nn.Module, got "
                        f"{type(model).__name__}")


def run_step(
    model: Loaded | str | Path | torch.nn.Module,
    config: MethodConfig,
    data: Data = None,
    *,
    kind: StepKind | None = None,
    tokenizer: Any = None,
    teacher: Any = None,
    progress: bool = True,
    device: str | torch.device | None = "auto",
    checkpoint: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> StepResult:
    """Carry out one method on the model in place (a recovery may replace `loaded.model`).

    `device`: auto (CUDA if available), cpu, cuda, cuda:N, or None (where the model is). The
    model stays where it is: a layer-wise method moves one layer at a time to the device, a
    whole-model method (depth search, Taylor scores, LoRA/KD) the model for the step.

    `checkpoint`: a folder where a layer-wise method records every finished layer, or a
    recovery its training state; a rerun with the same settings continues from it (a
    layer-wise one bit-identically). The caller removes it
    (`secateur.engine.checkpoint.remove_checkpoint`) once the result is safely saved.
    `on_step(step, loss)`: called after every training step of a recovery."""
    method = build_method(config)  # refuses anything that is not a registered config
    dev = None if device is None else resolve_device(device)  # before the model loads
    if kind is not None and config.kind != kind:
        raise SecateurError(f"{config.method} is a {config.kind} method, not a {kind} one: "
                            f"call secateur.{config.kind} with it")
    loaded = as_loaded(model, tokenizer)
    seed = data.seed if isinstance(data, CalibrationConfig) else 0
    torch.manual_seed(seed)
    start = time.perf_counter()
    windows: list[torch.Tensor] = []
    calib_record = None
    if isinstance(method, LayerwiseMethod) or method.needs_calibration:
        windows, calib_record = resolve_data(loaded, data, seed)
    before = count_parameters(loaded.model)
    m, adapter = loaded.model, loaded.adapter
    forward_dtype = data.compute_dtype if isinstance(data, CalibrationConfig) else None
    context = PruneContext(
        model=m, tokenizer=loaded.tokenizer, adapter=adapter, calibration=windows, seed=seed,
        progress=progress, loaded=loaded,
        layerwise_stats=lambda needs, on_layer: _with_dtype(forward_dtype, collect_layer_stats,
                                                            m, adapter, windows, needs,
                                                            on_layer, progress, None, dev),
        block_search=lambda subset=None, batch_size=8, dtype=None: BlockSearch(
            m, adapter, windows if subset is None else subset, batch_size, progress, dtype),
        teacher=teacher, checkpoint=checkpoint, on_step=on_step,
    )
    result = StepResult(method=config.method, kind=config.kind, config=config.settings(),
                        calibration=calib_record)
    if dev is not None and dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if isinstance(method, LayerwiseMethod):
        method.prepare(m, adapter, context)
        with compute_dtype(forward_dtype):
            reports = prune_layerwise(m, adapter, method, windows, method.sequential,
                                      progress, dev, checkpoint,
                                      keep_checkpoint=checkpoint is not None)
        result.layers = [asdict(r) for r in reports]
        result.summary = method.summary()
        if config.kind == "quantize":
            from secateur.formats.packed_save import round_kept_tensors

            # embeddings and head are saved in float16 beside the packed linears: evaluate
            # exactly what will be saved
            round_kept_tensors(m)
    else:
        result.summary = _run_on(method, context, loaded, dev)
    result.parameters = {"before": before, "after": count_parameters(loaded.model)}
    synchronize(dev)
    result.seconds = time.perf_counter() - start
    result.peak_rss_mib = peak_rss_mib()
    record = device_record(dev)
    result.device, result.peak_device_mib = record["device"], record.get("peak_device_mib")
    return result


def _run_on(method: Any, context: PruneContext, loaded: Loaded,
            device: torch.device | None) -> dict[str, Any]:
    """A whole-model method with the model (and its calibration windows) on `device` for the
    step, back home after, also when a recovery replaced the module."""
    m = context.model
    home = next(m.parameters()).device
    if device is not None and device != home:
        context.calibration = [w.to(device) for w in context.calibration]
    with on_device(m, device):
        summary = method.run(context)
    if loaded.model is not m:  # a recovery merged adapters into a new module
        loaded.model.to(home)
        loaded.adapter = adapter_for(loaded.model)
    return summary


def _with_dtype(dtype: str | None, fn: Any, *args: Any) -> Any:
    with compute_dtype(dtype):
        return fn(*args)


def prune(model: Loaded | str | Path | torch.nn.Module, config: MethodConfig, data: Data = None,
          **kw: Any) -> StepResult:
    """Prune in place: `prune(loaded, WandaConfig(sparsity=0.5), data="c4-sample")`."""
    return run_step(model, config, data, kind="prune", **kw)


def quantize(model: Loaded | str | Path | torch.nn.Module, config: MethodConfig,
             data: Data = None, **kw: Any) -> StepResult:
    """Quantize in place: `quantize(loaded, GPTQConfig(bits=4, group_size=128))`."""
    return run_step(model, config, data, kind="quantize", **kw)


def recover(model: Loaded | str | Path | torch.nn.Module, config: MethodConfig,
            **kw: Any) -> StepResult:
    """Recover quality by training: `recover(loaded, LoRAConfig(steps=200))`."""
    return run_step(model, config, None, kind="recover", **kw)
