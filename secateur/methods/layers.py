"""Whole-layer depth pruning: ShortGPT (Men et al., 2024) and SLEB (Song et al., 2024).

ShortGPT scores each decoder layer once, on the dense model, by its Block Influence
BI_i = 1 - E_tokens[cos(x_i, x_{i+1})] (how much the layer turns the hidden state) and removes
the lowest-BI layers: one forward over the calibration windows (`--curve` adds a calibration
perplexity after every removal, a full pass each, for the removal plot). SLEB removes layers
greedily: every remaining layer is tried, the one whose removal leaves the lowest calibration
perplexity goes, and the scores are recomputed after each removal. Both save a stock config
with fewer layers.

How much to remove: `--layers K`, or `--ratio R` meaning the smallest removal whose parameters
reach R of ALL parameters (embeddings and head included, counted once when tied), the
definition BlockPruner's paper uses, so the three methods compare at equal ratio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from secateur.config import MethodConfig, StepKind
from secateur.errors import SecateurError
from secateur.methods.base import ModelMethod, PruneContext, register_method
from secateur.surgery.depth import Block, block_parameters, remove_blocks, total_parameters

RATIO_NOTE = ("ratio counts all parameters, embeddings and lm_head included (tied weights "
              "once), as the BlockPruner paper does")


SEARCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32,
                 "float16": torch.float16}
SearchDtype = Literal["auto", "bfloat16", "float32", "float16"]


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively (measured ~3.5x fp32 on such a CPU);
    without them torch emulates bf16 and a search step is ~5x SLOWER than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def search_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`auto`: bf16 (BlockPruner's reference choice) where the search's device runs it
    natively (a GPU, or a CPU with AVX-512 BF16/AMX), else exact fp32. Without `device`: a GPU
    if torch sees one."""
    if name == "auto":
        gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
        return torch.bfloat16 if gpu or cpu_has_bf16() else torch.float32
    return SEARCH_DTYPES[name]


class DepthConfig(MethodConfig):
    """How much a depth method removes, and how its calibration search runs."""

    kind: ClassVar[StepKind] = "prune"
    unit: ClassVar[str]  # the count field: "layers" or "blocks"

    ratio: float | None = Field(None, gt=0, lt=1, description="Share of ALL parameters to "
                                                             "remove (embeddings included).")
    search_samples: int | None = Field(None, ge=1, description="Search on the first N "
                                                               "calibration windows.")
    search_dtype: SearchDtype = Field("auto", description="dtype of the search's forward "
                                                              "passes (losses stay fp32).")

    @model_validator(mode="after")
    def _one_amount(self) -> DepthConfig:
        if (getattr(self, self.unit) is None) == (self.ratio is None):
            raise ValueError(f"{self.method} needs exactly one of {self.unit} (a count) or "
                             "ratio (share of all parameters to remove)")
        return self


class ShortGPTConfig(DepthConfig):
    """ShortGPT: remove the layers with the lowest Block Influence, scored once."""

    method = "shortgpt"
    unit = "layers"
    layers: int | None = Field(None, ge=1, description="Layers to remove.")
    # Off: the ranking needs one forward; each curve point is a full calibration pass (about
    # 100 s each for smollm2-135m at 32 x 512 tokens on 2 CPU cores). SLEB and BlockPruner
    # have no such switch: their curve is the loss their greedy search already computed.
    curve: bool = Field(False, description="Also compute the calibration perplexity after "
                                           "every removal (one full pass each).")


class GreedyDepthConfig(DepthConfig):
    search_shortlist: int | None = Field(
        None, ge=1, description="Screen candidates on a quarter of the search windows, score "
                                "only the K best on all (default: every candidate on all).")


class SLEBConfig(GreedyDepthConfig):
    """SLEB: remove whole layers greedily by calibration perplexity."""

    method = "sleb"
    unit = "layers"
    layers: int | None = Field(None, ge=1, description="Layers to remove.")


class DepthTarget:
    """How much a depth method removes: a block count, or a share of all parameters."""

    def __init__(self, config: DepthConfig) -> None:
        self.count = getattr(config, config.unit)
        self.ratio = config.ratio
        self.unit = config.unit.rstrip("s")
        self.flag = f"--{config.unit}"
        self.search_samples = config.search_samples
        self.shortlist = getattr(config, "search_shortlist", None)
        self.search_dtype_name = config.search_dtype
        self.search_dtype = search_dtype(config.search_dtype)

    def check_feasible(self, available: int, removable_params: int, total: int) -> None:
        """Fail before the search when the count or ratio cannot be reached at all."""
        if self.count is not None and self.count > available:
            raise SecateurError(f"cannot remove {self.count} {self.unit}s: at most {available} "
                                f"can go (the model must keep at least one)")
        if self.ratio is not None and removable_params < self.ratio * total:
            raise SecateurError(
                f"--ratio {self.ratio} cannot be met: removing every removable {self.unit} "
                f"removes {removable_params / total:.4f} of all {total:,} parameters (the rest "
                "is embeddings, head and norms); use a smaller --ratio")

    def done(self, removed: int, removed_params: int, total: int) -> bool:
        if self.count is not None:
            return removed >= self.count
        return removed_params >= self.ratio * total

    def record(self, removed_params: int, total: int) -> dict[str, Any]:
        achieved = removed_params / total
        out: dict[str, Any] = {"target": self.ratio, "achieved": achieved,
                               "removed_parameters": removed_params, "total_parameters": total,
                               "counts": RATIO_NOTE}
        if self.ratio is not None and abs(achieved - self.ratio) > 1e-4:
            out["statement"] = (f"a ratio of exactly {self.ratio} cannot be met with whole "
                                f"{self.unit}s; removed {achieved:.4f} (the smallest removal "
                                f"reaching {self.ratio})")
        return out


def search_windows(context: PruneContext, target: DepthTarget) -> list[torch.Tensor]:
    n = target.search_samples
    if n is None:
        return context.calibration
    if n > len(context.calibration):
        raise SecateurError(f"--search-samples {n} exceeds the {len(context.calibration)} "
                            "calibration windows: raise --nsamples or lower --search-samples")
    return context.calibration[:n]


def start_search(context: PruneContext, target: DepthTarget) -> Any:
    if context.block_search is None:
        raise SecateurError("this depth method needs the block-search engine; run it through "
                            "secateur.api.prune")
    windows = search_windows(context, target)
    # the shortlist screens on the first quarter of the batches: make sure there are four
    batch = 8 if target.shortlist is None else max(1, min(8, math.ceil(len(windows) / 4)))
    # the device the search runs on (the API moved the model there), not any GPU torch sees
    device = next(context.model.parameters()).device
    target.search_dtype = search_dtype(target.search_dtype_name, device)
    return context.block_search(windows, batch_size=batch, dtype=target.search_dtype)


def ppl(nll: float) -> float:
    return math.exp(nll)


def finish(context: PruneContext, target: DepthTarget, search: Any, order: list[Block],
           curve: list[float] | None, total: int, removed_params: int,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Physically remove `order`, and the summary every depth method returns (`curve` None:
    not computed, and not recorded)."""
    surgery = remove_blocks(context.model, context.adapter, order)
    # the real count after surgery (norms go with a removed block in secateur's own class)
    removed_params = total - total_parameters(context.model)
    summary: dict[str, Any] = {"removed": [str(b) for b in order]}
    if curve is not None:
        summary["calibration_perplexity"] = curve  # [dense, after 1st removal, after 2nd, ...]
    summary.update({
        "ratio": target.record(removed_params, total),
        "search": {**search.summary(), "shortlist": target.shortlist},
        "surgery": surgery,
    })
    summary.update(extra or {})
    return summary


class _WholeLayers(ModelMethod):
    """What both whole-layer methods share: the target, and sizing the layers before a search."""

    def __init__(self, config: DepthConfig) -> None:
        super().__init__(config)
        self.target = DepthTarget(config)

    def _start(self, context: PruneContext) -> tuple[int, int, list[int], Any]:
        """(layer count, total parameters, parameters per layer, search), feasibility checked."""
        n = context.adapter.num_layers
        total = total_parameters(context.model)
        sizes = [block_parameters(context.adapter, Block(i, "layer")) for i in range(n)]
        self.target.check_feasible(n - 1, sum(sizes) - min(sizes), total)
        return n, total, sizes, start_search(context, self.target)


@register_method(ShortGPTConfig)
class ShortGPT(_WholeLayers):

    def run(self, context: PruneContext) -> dict[str, Any]:
        n, total, sizes, search = self._start(context)
        cos_sum = torch.zeros(n, dtype=torch.float64)
        tokens = torch.zeros(n, dtype=torch.float64)

        def on_layer(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1)
            cos_sum[i] += cos.sum().cpu()  # the search may run on a GPU; the sums stay here
            tokens[i] += cos.numel()

        search.trace(on_layer)
        influence = (1 - cos_sum / tokens).tolist()
        ranking = sorted(range(n), key=lambda i: (influence[i], i))
        order: list[Block] = []
        removed_params = 0
        curve = [ppl(search.loss())] if self.config.curve else None
        for i in tqdm(ranking[:-1], desc="shortgpt removals", leave=False,
                      disable=not context.progress or curve is None):
            if self.target.done(len(order), removed_params, total):
                break
            block = Block(i, "layer")
            search.remove(block)
            order.append(block)
            removed_params += sizes[i]
            if curve is not None:
                curve.append(ppl(search.loss()))
        return finish(context, self.target, search, order, curve, total, removed_params,
                      {"block_influence": influence})


@register_method(SLEBConfig)
class SLEB(_WholeLayers):

    def run(self, context: PruneContext) -> dict[str, Any]:
        n, total, sizes, search = self._start(context)
        order: list[Block] = []
        removed_params = 0
        curve = [ppl(search.loss())]
        while not self.target.done(len(order), removed_params, total):
            remaining = [Block(i, "layer") for i in range(n) if Block(i, "layer") not in order]
            if len(remaining) == 1:
                break
            scores = search.score(remaining, desc=f"sleb removal {len(order) + 1}",
                                  shortlist=self.target.shortlist)
            # ties go to the later layer index, deterministically
            best = min(scores, key=lambda b: (scores[b], -b.layer))
            search.remove(best)
            order.append(best)
            removed_params += sizes[best.layer]
            curve.append(ppl(scores[best]))
        return finish(context, self.target, search, order, curve, total, removed_params)
