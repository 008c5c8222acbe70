"""One int4 kernel call for the linears of a layer that read the same input (q/k/v, gate/up).

At batch 1 a small linear's time is mostly the call, not the arithmetic: fusing q/k/v and
gate/up turns seven kernel calls per Llama layer into four. The model's code still calls each
projection; each becomes a `FusedOutput` that runs the fused kernel on the first call with a
given input and hands the others their rows of that result (same tensor, same version: the
result of a pure function of it). Which linears share an input is the adapter's knowledge
(`attention_inputs`, `mlp_inputs`); a model no adapter knows is left unfused.
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.runtime.base import RuntimeLinear, adapted_layers
from secateur.runtime.int4 import Int4Linear


class _Shared:
    """The fused linear's last input and outputs, until every member has taken its piece."""

    def __init__(self, fused: Int4Linear, members: int) -> None:
        self.fused = fused
        self.members = members
        self.x: torch.Tensor | None = None
        self.version = -1
        self.outputs: list[torch.Tensor] = []
        self.left = 0

    def piece(self, x: torch.Tensor, index: int) -> torch.Tensor:
        # inference tensors (torch.inference_mode) keep no version counter: there, identity
        # and the members' countdown alone say the result is still this input's
        version = -2 if x.is_inference() else x._version
        if self.x is not x or self.version != version or self.left == 0:
            self.outputs = self.fused(x)
            self.x, self.version, self.left = x, version, self.members
        out = self.outputs[index]
        self.left -= 1
        if self.left == 0:  # let the input and the outputs go
            self.x, self.outputs = None, []
        return out


class FusedOutput(RuntimeLinear):
    """One member of a fused group: its rows of the fused linear's output. The first member
    holds the fused linear as a submodule (its buffers are counted and saved once)."""

    def __init__(self, shared: _Shared, index: int, rows: slice, in_features: int,
                 holder: bool) -> None:
        super().__init__(in_features, rows.stop - rows.start, None)
        self.index = index
        self.rows = rows
        self.__dict__["_shared"] = shared  # not a submodule: only the holder registers it
        if holder:
            self.fused = shared.fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared.piece(x, self.index)

    def weight_bytes(self) -> int:
        return 0  # the fused linear, a module of the model too, reports its own

    def dense_weight(self) -> torch.Tensor:
        return self._shared.fused.dense_weight()[self.rows]

    def logical_parameters(self) -> list[torch.Tensor]:
        bias = self._shared.fused.bias
        return [self.dense_weight()] + ([] if bias is None else [bias[self.rows]])


def fusable(linears: list[nn.Module]) -> bool:
    if len(linears) < 2 or not all(type(m) is Int4Linear for m in linears):
        return False
    first = linears[0]
    return all(m.backend == "avx2" and m.perm is None and not m.splits
               and m.group == first.group and m.in_features == first.in_features
               for m in linears)


def fuse_int4(linears: list[Int4Linear]) -> list[FusedOutput]:
    """The members standing in for `linears`, one fused Int4Linear behind them."""
    first = linears[0]
    biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in linears]
    any_bias = any(m.bias is not None for m in linears)
    fused = Int4Linear(torch.cat([m.packed for m in linears]),
                       torch.cat([m.scale_zeros for m in linears], 1).contiguous(),
                       first.group, first.in_features,
                       sum(m.out_features for m in linears),
                       bias=torch.cat(biases) if any_bias else None, backend="avx2")
    fused.splits = [m.out_features for m in linears]
    shared = _Shared(fused, len(linears))
    members, start = [], 0
    for i, m in enumerate(linears):
        members.append(FusedOutput(shared, i, slice(start, start + m.out_features),
                                   first.in_features, holder=i == 0))
        start += m.out_features
    return members


def fuse_shared_inputs(model: nn.Module) -> int:
    """Fuse every group of int4 linears that reads one input, in place; how many groups."""
    from secateur.runtime.convert import replace_module

    found = adapted_layers(model)
    if found is None:
        return 0
    adapter, layers = found
    names = {id(m): n for n, m in model.named_modules()}
    done = 0
    for layer in layers:
        for group in (adapter.attention_inputs, adapter.mlp_inputs):
            try:
                linears = [p.module for p in group(layer)]
            except AttributeError:  # a branch removed by depth pruning
                continue
            if not fusable(linears):
                continue
            for old, new in zip(linears, fuse_int4(linears), strict=True):
                replace_module(model, names[id(old)], new)
            done += 1
    return done
