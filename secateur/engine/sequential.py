"""The layer-wise engine: calibration activations flow through one decoder layer at a time.

Per layer: run it on its inputs with hooks gathering exactly the statistics the method
declares (these dense outputs are also the reference for the reconstruction error), let the
method act, re-run the layer, and hand its outputs on. Only one layer's activations are
resident; with `device`, only the current layer moves to the accelerator. A checkpoint
folder makes a killed run resumable (`secateur.engine.checkpoint`); a `StreamedWeights`
keeps only the current layer's weights in memory (`secateur.formats.streaming`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur import distributed
from secateur.engine.capture import (
    CapturedInputs,
    LayerCall,
    call_layer,
    capture_layer_inputs,
    full_precision,
)
from secateur.engine.checkpoint import LayerCheckpoint, fingerprint
from secateur.errors import SecateurError
from secateur.formats.streaming import StreamedWeights
from secateur.methods.base import LayerReport, LayerwiseMethod
from secateur.models.base import ModelAdapter, Projection
from secateur.stats import Statistic

LayerStats = dict[str, dict[str, Statistic]]


@torch.no_grad()
def _run(layer: nn.Module, inputs: list[torch.Tensor], call: LayerCall) -> list[torch.Tensor]:
    return [call_layer(layer, x, call) for x in inputs]


def _device(layer: nn.Module) -> torch.device:
    param = next(layer.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def _on(stat: Statistic, device: torch.device) -> Statistic:
    """The statistic's accumulators on the layer's device: X^T X of activations on a GPU is
    summed there (in fp32 or fp64 as the statistic says), not copied back per window."""
    if device.type != "cpu":
        for name, value in vars(stat).items():
            if isinstance(value, torch.Tensor):
                setattr(stat, name, value.to(device))
    return stat


class _Seen(Exception):
    """Raised once every projection has seen its input, when the layer's output is unused."""


@torch.no_grad()
def run_with_stats(
    layer: nn.Module,
    projections: dict[str, Projection],
    needs: tuple[type[Statistic], ...],
    inputs: list[torch.Tensor],
    call: LayerCall,
    *,
    share: bool = False,
    outputs: bool = True,
) -> tuple[list[torch.Tensor], LayerStats]:
    """The layer's outputs, and each projection's input statistics gathered on the way.

    `share`: projections called on the very tensor the projection before them got (q/k/v,
    gate/up) share that projection's statistic objects, which see each token once.
    `outputs=False`: each window stops as soon as the last projection has seen its input
    (the rest of the layer, e.g. the down projection, is not computed); returns no outputs.
    """
    stats: LayerStats = {
        name: {cls.name: _on(cls(p.in_features), _device(layer))
               for cls in needs} for name, p in projections.items()
    }
    owner: dict[str, str] = {}  # name -> the projection whose statistics it shares
    window = {"index": 0, "seen": 0, "last": None, "last_name": ""}

    def hook(_mod, args, _name):
        x = args[0]
        same = share and window["last"] is x  # the live tensor, not an equal one
        if window["index"] == 0 and same:
            owner[_name] = owner.get(window["last_name"], window["last_name"])
            stats[_name] = stats[owner[_name]]
        elif (_name in owner) != same:
            raise RuntimeError(f"{_name}: the projections sharing an input changed between "
                               "calibration windows")
        if not same:
            with full_precision(x):
                for stat in stats[_name].values():
                    stat.add(x.detach())
        window["last"], window["last_name"] = x, _name
        window["seen"] += 1
        if not outputs and window["seen"] == len(projections):
            raise _Seen

    handles = [proj.module.register_forward_pre_hook(
        lambda m, a, _name=name: hook(m, a, _name)) for name, proj in projections.items()]
    result: list[torch.Tensor] = []
    try:
        for x in inputs:
            window.update(seen=0, last=None, last_name="")
            try:
                out = call_layer(layer, x, call)
                if outputs:
                    result.append(out)
            except _Seen:
                pass
            window["index"] += 1
    finally:
        for h in handles:
            h.remove()
    # under torch.distributed: every rank's windows counted before anything is decided
    distributed.reduce_statistics(s for per in stats.values() for s in per.values())
    return result, stats


@torch.no_grad()
def input_groups(layer: nn.Module, projections: dict[str, Projection], x: torch.Tensor,
                 call: LayerCall) -> list[list[str]]:
    """The projections in the order the layer calls them, consecutive ones fed the very same
    input tensor in one group: q/k/v, o, gate/up, down for a Llama layer (GPTQ's
    true-sequential groups), found by running the layer once rather than by name."""
    groups: list[list[str]] = []
    last: dict[str, torch.Tensor | None] = {"x": None}

    def hook(_mod, args, _name):
        if groups and last["x"] is args[0]:
            groups[-1].append(_name)
        else:
            groups.append([_name])
        last["x"] = args[0]

    handles = [proj.module.register_forward_pre_hook(
        lambda m, a, _name=name: hook(m, a, _name)) for name, proj in projections.items()]
    try:
        call_layer(layer, x, call)
    finally:
        for h in handles:
            h.remove()
    missing = set(projections) - {n for g in groups for n in g}
    if missing:
        raise RuntimeError(f"projections never called by the layer: {sorted(missing)}")
    return groups


def apply_in_groups(method: LayerwiseMethod, index: int, layer: nn.Module,
                    projections: dict[str, Projection], inputs: list[torch.Tensor],
                    call: LayerCall) -> LayerReport:
    """Compress one group of projections at a time, each on statistics gathered with the
    groups before it already compressed (GPTQ's true-sequential): the o projection sees the
    attention output of quantized q/k/v, the down projection the quantized MLP input."""
    report = LayerReport(index)
    for group in input_groups(layer, projections, inputs[0], call):
        sub = {name: projections[name] for name in group}
        _, stats = run_with_stats(layer, sub, method.needs, inputs, call,
                                  share=method.shares_statistics, outputs=False)
        part = distributed.solve_layer(method, index, layer, sub, stats)
        report.matrices.update(part.matrices)
        report.target = part.target if part.target is not None else report.target
    return report


def relative_error(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    num = sum(float(((p - d).double() ** 2).sum()) for p, d in zip(pruned, dense, strict=True))
    den = sum(float((d.double() ** 2).sum()) for d in dense)
    num, den = distributed.sum_scalars(num, den)  # each rank saw its own windows
    return math.sqrt(num / den) if den > 0 else 0.0


def _to(inputs: list[torch.Tensor], device: torch.device | None) -> list[torch.Tensor]:
    return inputs if device is None else [x.to(device) for x in inputs]


def _call_to(call: LayerCall, device: torch.device | None) -> LayerCall:
    if device is None:
        return call

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return LayerCall(tuple(move(a) for a in call.args),
                     {k: move(v) for k, v in call.kwargs.items()})


def walk_layers(
    model: nn.Module,
    adapter: ModelAdapter,
    calibration: list[torch.Tensor],
    visit: Callable[[int, nn.Module, list[torch.Tensor], LayerCall], list[torch.Tensor]],
    desc: str,
    progress: bool = True,
    device: torch.device | None = None,
    captured: CapturedInputs | None = None,
    *,
    start: int = 0,
    hidden: list[torch.Tensor] | None = None,
    after: Callable[[int, nn.Module, list[torch.Tensor]], None] | None = None,
    stream: StreamedWeights | None = None,
) -> None:
    """Capture layer 0's inputs, then for each layer call `visit`, whose return value becomes
    the next layer's inputs.

    `start` and `hidden` continue an interrupted walk (layer `start` gets `hidden`). `after`
    sees each layer once it is back on the CPU, with its outputs. With `stream`, a layer is
    read from disk just before its visit and freed after `after`, and the embeddings and head
    are resident only while layer 0's inputs are captured.
    """
    if captured is None:
        if stream is not None:
            stream.load_rest()
        # under torch.distributed each rank propagates its own share of the windows
        captured = capture_layer_inputs(model, adapter, distributed.shard(calibration))
        if stream is not None:  # only decoder layers run from here on
            stream.unload_rest()
    hidden = _to(captured.hidden if hidden is None else hidden, device)
    layers = adapter.layers
    show = progress and distributed.is_main()  # one bar, not one per rank
    bar = tqdm(range(start, len(layers)), desc=desc, disable=not show, initial=start,
               total=len(layers))
    for index in bar:
        layer = layers[index]
        if stream is not None:
            stream.load_layer(index)
        home = _device(layer)  # back where it was: the CPU, unless the caller put it elsewhere
        if device is not None:
            layer.to(device)
        hidden = visit(index, layer, hidden, _call_to(captured.calls[index], device))
        if device is not None:
            layer.to(home)
        if after is not None:
            after(index, layer, hidden)
        if stream is not None:
            stream.unload_layer(index)


def _method_name(method: LayerwiseMethod) -> str:
    config = getattr(method, "config", None)
    return getattr(config, "method", None) or type(method).__name__


def prune_layerwise(
    model: nn.Module,
    adapter: ModelAdapter,
    method: LayerwiseMethod,
    calibration: list[torch.Tensor],
    sequential: bool | None = None,
    progress: bool = True,
    device: torch.device | None = None,
    checkpoint: Path | None = None,
    *,
    stream: StreamedWeights | None = None,
    keep_checkpoint: bool = False,
    on_layer_done: Callable[[int], None] | None = None,
) -> list[LayerReport]:
    """Run a layer-wise method over every decoder layer; one report per layer.

    `sequential=False` feeds every layer the dense model's activations (the Wanda paper's
    variant) instead of the already-pruned layers' outputs; None takes the method's own.

    `checkpoint`: a folder where each finished layer is saved with the next layer's inputs; a
    rerun with the same folder, model, method and calibration continues after the last
    finished layer and ends with bit-identical weights. Call `method.prepare()` before, as for
    a fresh run. The folder is deleted on success unless `keep_checkpoint`: a caller that
    saves the model afterwards keeps it and calls `checkpoint.remove_checkpoint(folder)` once
    the output is in place, so that a kill while saving still resumes.

    `stream`: the model came from `secateur.formats.streaming.load_streamed`; each layer is
    read just before it is processed and written to `stream`'s output folder after (call
    `stream.begin(folder)` first and `stream.finish(tokenizer)` after).

    `on_layer_done(index)` runs once layer `index` is finished (and checkpointed).

    A method that needs no statistics and reports no error (magnitude by default) runs no
    layer: `calibration` may then be empty.
    """
    if sequential is None:
        sequential = getattr(method, "sequential", True)
    if distributed.world() > 1:
        if stream is not None:
            raise SecateurError("--stream writes layers as it goes from one process; run it "
                                "without torchrun")
        # a checkpoint would hold only rank 0's share of the hidden states: no resume
        checkpoint = None
    ckpt: LayerCheckpoint | None = None
    resumed = None
    if checkpoint is not None:
        ckpt = LayerCheckpoint(checkpoint, fingerprint(model, method, calibration, sequential,
                                                       device, stream), adapter.layers_path)
        resumed = ckpt.resume()
    reports: list[LayerReport] = []
    start, hidden = 0, None
    if resumed is not None:
        assert ckpt is not None
        for index in range(resumed.done):
            if stream is not None:
                stream.adopt_layer(index, ckpt.layer_file(index))
            else:
                ckpt.restore_layer(index, adapter.layers[index])
        reports, start, hidden = resumed.reports, resumed.done, resumed.hidden
        torch.set_rng_state(resumed.rng)

    report_error = method.error_report
    last = len(adapter.layers) - 1
    # Masks from the weights alone (magnitude) without an error report: no layer runs, and
    # no calibration window is needed.
    runs_layers = bool(method.needs) or report_error
    captured = None if runs_layers else CapturedInputs([], [LayerCall()] * len(adapter.layers))

    def visit(index, layer, inputs, call):
        projections = adapter.linears(layer)
        if not runs_layers:
            reports.append(distributed.solve_layer(method, index, layer, projections,
                                       {n: {} for n in projections}))
            return inputs
        # The dense outputs feed the next layer (non-sequential) or the error report.
        dense_needed = report_error or not sequential
        if method.sequential_within_layer:
            dense = _run(layer, inputs, call) if dense_needed else []
            report = apply_in_groups(method, index, layer, projections, inputs, call)
        else:
            dense, stats = run_with_stats(layer, projections, method.needs, inputs, call,
                                          share=method.shares_statistics, outputs=dense_needed)
            report = distributed.solve_layer(method, index, layer, projections, stats)
            del stats
        pruned = None
        if report_error or (sequential and index < last):
            pruned = _run(layer, inputs, call)
        if report_error:
            report.relative_error = relative_error(pruned, dense)
        reports.append(report)
        out = pruned if sequential else dense
        return inputs if out is None else out  # after the last layer nobody reads it

    def after(index, layer, outputs):
        saved = ckpt.save(index, layer, outputs, reports) if ckpt is not None else None
        if stream is not None:
            if saved is not None:
                stream.adopt_layer(index, saved)
            else:
                stream.write_layer(index)
        if on_layer_done is not None:
            on_layer_done(index)

    walk_layers(model, adapter, calibration, visit, f"{_method_name(method)} layers", progress,
                device, captured, start=start, hidden=hidden, after=after, stream=stream)
    if ckpt is not None and not keep_checkpoint:
        ckpt.remove()
    return reports


def collect_layer_stats(
    model: nn.Module,
    adapter: ModelAdapter,
    calibration: list[torch.Tensor],
    needs: tuple[type[Statistic], ...],
    on_layer: Callable[[int, dict[str, Projection], LayerStats], None],
    progress: bool = True,
    stream: StreamedWeights | None = None,
    device: torch.device | None = None,
) -> None:
    """A dense pass that hands each layer's statistics to `on_layer` and prunes nothing;
    with `stream`, each layer is read from disk for its turn and freed after; with `device`,
    each layer runs there (`on_layer` gets the statistics on it, the layer back home)."""

    def visit(index, layer, inputs, call):
        projections = adapter.linears(layer)
        outputs, stats = run_with_stats(layer, projections, needs, inputs, call)
        on_layer(index, projections, stats)
        return outputs

    walk_layers(model, adapter, calibration, visit, "statistics", progress, device,
                stream=stream)
