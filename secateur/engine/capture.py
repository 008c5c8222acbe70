"""Capture what each decoder layer is called with, without hard-coding any call signature.

Every decoder layer is swapped for a recorder that stores its arguments and returns the hidden
states unchanged, then the model runs once. The model itself computes the attention masks,
position ids and rotary `position_embeddings` (per layer type, for Gemma 3's local/global
layers), so the layer-wise loop stays right when transformers changes how layers are called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secateur.models.base import ModelAdapter


@dataclass
class LayerCall:
    """Everything a layer's forward takes besides the hidden states."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CapturedInputs:
    hidden: list[torch.Tensor]  # layer 0's input per window, each (1, seq, hidden)
    calls: list[LayerCall]  # per layer


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, index: int, last: int, sink: CapturedInputs) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.sink.hidden.append(hidden_states.detach())
        if len(self.sink.calls) == self.index:
            kwargs["use_cache"] = False
            kwargs.pop("past_key_values", None)
            kwargs.pop("cache", None)  # transformers >= 5.24 names the cache `cache`
            kwargs.pop("layer_past", None)
            self.sink.calls.append(LayerCall(args, kwargs))
        # Later windows share the first window's arguments (same length, no padding), so only
        # the first runs past layer 0; nobody needs the lm_head's logits either.
        if self.index == self.last or len(self.sink.calls) == self.last + 1:
            raise _Stop
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: ModelAdapter, windows: list[torch.Tensor]
) -> CapturedInputs:
    """Layer 0's input for every window and every layer's call arguments."""
    if not windows:
        raise ValueError("capture_layer_inputs needs at least one window")
    layers = adapter.layers
    originals = list(layers)
    sink = CapturedInputs([], [])
    for i in range(len(originals)):
        layers[i] = _Recorder(i, len(originals) - 1, sink)
    try:
        for ids in windows:
            with contextlib.suppress(_Stop):
                model(input_ids=ids, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return sink


# dtype of the layer forwards that only feed statistics, set for a run by `compute_dtype`
_COMPUTE_DTYPE: ContextVar[torch.dtype | None] = ContextVar("secateur_compute_dtype",
                                                            default=None)


@contextmanager
def compute_dtype(dtype: str | None) -> Iterator[None]:
    """Run `call_layer` under autocast to `dtype` ("bfloat16") inside the block; "float32" or
    None: the weights' own dtype. Statistics hooks accumulate in fp32/fp64 either way
    (`full_precision`)."""
    value = None if dtype in (None, "float32") else getattr(torch, dtype)
    token = _COMPUTE_DTYPE.set(value)
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


def full_precision(x: torch.Tensor):
    """A context in which no autocast lowers what a statistic computes from `x`."""
    return torch.autocast(x.device.type, enabled=False)


def call_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    dtype = _COMPUTE_DTYPE.get()
    if dtype is None:
        out = layer(hidden, *call.args, **call.kwargs)
    else:
        with torch.autocast(hidden.device.type, dtype=dtype):
            out = layer(hidden, *call.args, **call.kwargs)
    out = out[0] if isinstance(out, tuple) else out
    # the next layer (and the error report) gets the weights' dtype, as a plain forward would
    return out if dtype is None else out.to(hidden.dtype)
