"""torch.distributed for the layer-wise engine: one process per rank, started by torchrun.

Calibration windows are split across ranks (each takes a contiguous share and propagates only
its own hidden states); every statistic is all-reduced before any solve; the matrices of a
layer are solved by different ranks (matrix i by rank i % world) and broadcast from the rank
that solved them, so every rank holds the same layer before the next one runs. Without
torchrun's environment (WORLD_SIZE unset or 1) every function here is a no-op on world 1, so a
single process runs exactly as before. Backend: gloo on CPU, nccl where CUDA is available.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from secateur.errors import SecateurError
from secateur.methods.base import LayerReport, LayerwiseMethod
from secateur.models.base import Projection
from secateur.quant.ggml import GGMLState, clear_ggml_state, ggml_state, set_ggml_state
from secateur.quant.state import QuantState, clear_quant_state, quant_state, set_quant_state
from secateur.stats import ColumnSquares, Hessian, Statistic
from secateur.stats.absmax import ColumnAbsMax

T = TypeVar("T")
# Every method-written attribute of a module starts with this (secateur_quant, secateur_ggml,
# secateur_act_quant): broadcasting them moves a solved matrix's grid along with its weight.
STATE_PREFIX = "secateur_"
# Rank 0 may evaluate the dense model while the others wait at their first collective.
TIMEOUT = timedelta(hours=2)


def init() -> None:
    """Join the process group torchrun described in the environment; idempotent."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=TIMEOUT)


def finish() -> None:
    if active():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def backend() -> str | None:
    return str(dist.get_backend()) if active() else None


def record() -> dict[str, Any]:
    """What a result JSON says about how the run was spread."""
    return {"world_size": world(), "backend": backend()}


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of `items` (sizes differ by at most one)."""
    n, w, r = len(items), world(), rank()
    if w == 1:
        return list(items)
    if n < w:
        raise SecateurError(f"{n} calibration windows cannot be split across {w} ranks: give "
                            f"--nsamples of at least {w}")
    return list(items[r * n // w:(r + 1) * n // w])


def owner(index: int) -> int:
    """The rank that solves the `index`-th matrix of a layer."""
    return index % world()


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" \
        else torch.device("cpu")


def _collective(tensor: torch.Tensor, fn: Any) -> None:
    """Run `fn(t)` on a copy on the backend's device (nccl: the GPU) and write it back."""
    device = _comm_device()
    if tensor.device == device and tensor.is_contiguous():
        fn(tensor)
        return
    moved = tensor.to(device).contiguous()
    fn(moved)
    tensor.copy_(moved)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place."""
    if active():
        _collective(tensor, lambda t: dist.all_reduce(t, dist.ReduceOp.SUM))
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        _collective(tensor, lambda t: dist.all_reduce(t, dist.ReduceOp.MAX))
    return tensor


def sum_scalars(*values: float) -> list[float]:
    """Each value summed over ranks, in float64."""
    if not active():
        return list(values)
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()


def _reduce_tokens(stat: Statistic) -> None:
    stat.tokens = int(all_reduce_sum(torch.tensor([stat.tokens], dtype=torch.int64))[0])


def reduce_statistic(stat: Statistic) -> None:
    """All ranks end with the statistic of every rank's windows together."""
    if isinstance(stat, ColumnSquares):
        all_reduce_sum(stat.sum)
    elif isinstance(stat, Hessian):
        all_reduce_sum(stat.sum)  # the full symmetric matrix (mirrored on read)
    elif isinstance(stat, ColumnAbsMax):
        all_reduce_max(stat.max)
    else:  # a new statistic must say how it combines; silently rank-local would be wrong
        raise SecateurError(f"no all-reduce for statistic {type(stat).__name__}")
    _reduce_tokens(stat)


def reduce_statistics(stats: Iterable[Statistic]) -> None:
    """Each distinct statistic once: projections sharing an input share the object."""
    if not active():
        return
    seen: set[int] = set()
    for stat in stats:
        if id(stat) not in seen:
            seen.add(id(stat))
            reduce_statistic(stat)


def broadcast_object(obj: T, src: int) -> T:
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=_comm_device())
    return box[0]


def broadcast_tensor(tensor: torch.Tensor, src: int) -> None:
    if active():
        _collective(tensor, lambda t: dist.broadcast(t, src))


def _states(module: nn.Module
            ) -> dict[str, tuple[dict[str, Any], QuantState | None, GGMLState | None]]:
    return {path: ({k: v for k, v in vars(m).items() if k.startswith(STATE_PREFIX)},
                   quant_state(m), ggml_state(m)) for path, m in module.named_modules()}


def broadcast_module(module: nn.Module, src: int) -> None:
    """Make `module` on every rank what it is on `src`: its parameters, buffers and the
    grids methods leave on its submodules."""
    if not active():
        return
    # The grids first: they are buffers that only `src` may have registered yet, and every
    # rank must hold the same tensors before they are broadcast one by one.
    states = broadcast_object(_states(module) if rank() == src else None, src)
    for path, (attrs, grid, blocks) in states.items():
        target = module.get_submodule(path)
        clear_quant_state(target)
        clear_ggml_state(target)
        for key in [k for k in vars(target) if k.startswith(STATE_PREFIX)]:
            delattr(target, key)
        for key, value in attrs.items():
            setattr(target, key, value)
        if grid is not None:
            set_quant_state(target, grid)
        if blocks is not None:
            set_ggml_state(target, blocks)
    for tensor in [*module.parameters(), *module.buffers()]:
        broadcast_tensor(tensor.data, src)


def solve_layer(method: LayerwiseMethod, index: int, layer: nn.Module,
                projections: dict[str, Projection],
                stats: dict[str, dict[str, Statistic]]) -> LayerReport:
    """`method.apply` on reduced statistics, its work split across ranks.

    A method whose matrices are independent (`splits_solves`) solves on each rank only the
    matrices that rank owns; each is then broadcast from its owner with its report. Any other
    method (W8A8's smoothing couples a layer's matrices) runs whole on every rank, and rank
    0's layer is broadcast so that no rank can drift."""
    if not active():
        return method.apply(index, projections, stats)
    if not method.splits_solves:
        report = method.apply(index, projections, stats)
        broadcast_module(layer, 0)
        return report
    names = list(projections)
    mine = {n: projections[n] for i, n in enumerate(names) if owner(i) == rank()}
    report = method.apply(index, mine, {n: stats[n] for n in mine})
    solved = dict(report.matrices)
    report.matrices = {}
    for i, name in enumerate(names):
        broadcast_module(projections[name].module, owner(i))
        report.matrices[name] = broadcast_object(solved.get(name), owner(i))
    return report
