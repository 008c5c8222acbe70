"""The layer-wise engine: calibration activations flow through one decoder layer at a time.

Per layer: run it on its inputs with hooks gathering exactly the statistics the method
declares (these dense outputs are also the reference for the reconstruction error), let the
method act, re-run the layer, and hand its outputs on. Only one layer's activations are
resident; with `device`, only the current layer moves to the accelerator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.engine.capture import CapturedInputs, LayerCall, call_layer, capture_layer_inputs
from secateur.methods.base import LayerReport, LayerwiseMethod
from secateur.models.base import ModelAdapter, Projection
from secateur.stats import Statistic

LayerStats = dict[str, dict[str, Statistic]]


@torch.no_grad()
def _run(layer: nn.Module, inputs: list[torch.Tensor], call: LayerCall) -> list[torch.Tensor]:
    return [call_layer(layer, x, call) for x in inputs]


@torch.no_grad()
def run_with_stats(
    layer: nn.Module,
    projections: dict[str, Projection],
    needs: tuple[type[Statistic], ...],
    inputs: list[torch.Tensor],
    call: LayerCall,
) -> tuple[list[torch.Tensor], LayerStats]:
    """The layer's outputs, and each projection's input statistics gathered on the way."""
    stats: LayerStats = {
        name: {cls.name: cls(p.in_features) for cls in needs} for name, p in projections.items()
    }
    handles = []
    for name, proj in projections.items():
        if not needs:
            break

        def hook(_mod, args, _name=name):
            for stat in stats[_name].values():
                stat.add(args[0].detach())

        handles.append(proj.module.register_forward_pre_hook(hook))
    try:
        outputs = _run(layer, inputs, call)
    finally:
        for h in handles:
            h.remove()
    return outputs, stats


def relative_error(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    num = sum(((p - d).double() ** 2).sum() for p, d in zip(pruned, dense, strict=True))
    den = sum((d.double() ** 2).sum() for d in dense)
    return float((num / den).sqrt()) if den > 0 else 0.0


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
) -> None:
    """Capture layer 0's inputs, then for each layer call `visit`, whose return value becomes
    the next layer's inputs."""
    captured = captured or capture_layer_inputs(model, adapter, calibration)
    hidden = _to(captured.hidden, device)
    layers = adapter.layers
    for index in tqdm(range(len(layers)), desc=desc, disable=not progress):
        layer = layers[index]
        if device is not None:
            layer.to(device)
        hidden = visit(index, layer, hidden, _call_to(captured.calls[index], device))
        if device is not None:
            layer.to("cpu")


def prune_layerwise(
    model: nn.Module,
    adapter: ModelAdapter,
    method: LayerwiseMethod,
    calibration: list[torch.Tensor],
    sequential: bool = True,
    progress: bool = True,
    device: torch.device | None = None,
) -> list[LayerReport]:
    """Run a layer-wise method over every decoder layer; one report per layer.

    `sequential=False` feeds every layer the dense model's activations (the Wanda paper's
    variant) instead of the already-pruned layers' outputs.
    """
    reports: list[LayerReport] = []

    def visit(index, layer, inputs, call):
        projections = adapter.linears(layer)
        dense, stats = run_with_stats(layer, projections, method.needs, inputs, call)
        report = method.apply(index, projections, stats)
        del stats
        pruned = _run(layer, inputs, call)
        report.relative_error = relative_error(pruned, dense)
        reports.append(report)
        return pruned if sequential else dense

    walk_layers(model, adapter, calibration, visit, f"{method.name} layers", progress, device)
    return reports


def collect_layer_stats(
    model: nn.Module,
    adapter: ModelAdapter,
    calibration: list[torch.Tensor],
    needs: tuple[type[Statistic], ...],
    on_layer: Callable[[int, dict[str, Projection], LayerStats], None],
    progress: bool = True,
) -> None:
    """A dense pass that hands each layer's statistics to `on_layer` and prunes nothing."""

    def visit(index, layer, inputs, call):
        projections = adapter.linears(layer)
        outputs, stats = run_with_stats(layer, projections, needs, inputs, call)
        on_layer(index, projections, stats)
        return outputs

    walk_layers(model, adapter, calibration, visit, "statistics", progress)
