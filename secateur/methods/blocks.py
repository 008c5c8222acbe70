"""BlockPruner (Zhong et al., 2024): remove attention and MLP residual branches one at a time.

Each decoder layer is two blocks, its attention (MHA) branch and its MLP branch, each added to
the residual stream. At every step each remaining block is scored by the calibration perplexity
of the model with it removed (on top of the blocks already gone), and the lowest goes: about 2L
candidate evaluations per removed block, which `BlockSearch` makes cheap by reusing the hidden
states before each candidate's layer. `--blocks K`, or `--ratio R` meaning the smallest removal
reaching R of ALL parameters (embeddings included), the paper's definition.

`--criterion loss_per_param` ranks candidates by the NLL increase per parameter removed instead
(see `BlockPrunerConfig`); the default `loss` is the paper's rule, unchanged.

A layer that loses both blocks is removed whole; single blocks are removed physically by
converting to secateur's own Llama-family class, saved with `auto_map`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from pydantic import Field

from secateur.methods.base import ModelMethod, PruneContext, register_method
from secateur.methods.layers import (
    DepthTarget,
    GreedyDepthConfig,
    finish,
    ppl,
    start_search,
)
from secateur.surgery.depth import (
    Block,
    block_parameters,
    has_branch,
    total_parameters,
)

log = logging.getLogger(__name__)

Criterion = Literal["loss", "loss_per_param"]


class BlockPrunerConfig(GreedyDepthConfig):
    """BlockPruner: remove attention/MLP blocks greedily by calibration perplexity.

    `criterion` is how each greedy step ranks the remaining blocks:

    - `loss` (default, the paper's rule, Zhong et al. 2024): the block whose removal leaves the
      lowest calibration NLL, whatever its size.
    - `loss_per_param`: the block with the lowest NLL increase per parameter removed,
      (NLL(without block) - NLL(now)) / parameters(block). Under a parameter budget the greedy
      step is a knapsack step, and the ratio of cost to weight is the classic greedy rule for
      it; ZipLM (Kurtic et al. 2023) ranks structures the same way (loss increase per unit of
      what is saved). BlockPruner's rule treats a block as one unit of progress, which fits
      Llama-2-7B, where attention is a third of a layer, but not GQA models: in SmolLM2 an
      attention block holds a quarter of a layer's weights (0.9M vs the MLP's 2.7M), so the
      paper's rule spends its first removals on many cheap attention blocks and reaches a
      ratio with more damage than ShortGPT's whole layers (Block Influence, Men et al. 2024)
      or SLEB's greedy layers (Song et al. 2024). FinerCut (Zhang et al. 2024) also prunes
      attention and MLP blocks one at a time, by how much the output changes, and counts
      blocks, not parameters; it too has no notion of a block's size.
    """

    method = "blockpruner"
    unit = "blocks"
    blocks: int | None = Field(None, ge=1, description="Blocks (attention or MLP) to remove.")
    criterion: Criterion = Field(
        "loss", description="Rank candidates by calibration loss (loss, the paper's rule) or "
                            "by loss increase per parameter removed (loss_per_param).")


@register_method(BlockPrunerConfig)
class BlockPruner(ModelMethod):
    def __init__(self, config: BlockPrunerConfig) -> None:
        super().__init__(config)
        self.target = DepthTarget(config)

    def run(self, context: PruneContext) -> dict[str, Any]:
        model, adapter = context.model, context.adapter
        n = adapter.num_layers
        total = total_parameters(model)
        # a model pruned before (secateur's own class) may already lack some branches
        blocks = [Block(i, part) for i in range(n) for part in ("attn", "mlp")
                  if has_branch(adapter, i, part)]
        sizes = {b: block_parameters(adapter, b) for b in blocks}
        # at least one attention block must stay (a model without any is not a language model)
        smallest_attn = min(sizes[b] for b in blocks if b.part == "attn")
        self.target.check_feasible(len(blocks) - 1, sum(sizes.values()) - smallest_attn, total)
        search = start_search(context, self.target)
        order: list[Block] = []
        removed_params = 0
        nll = search.loss()
        curve = [ppl(nll)]
        per_param = self.config.criterion == "loss_per_param"
        while not self.target.done(len(order), removed_params, total):
            candidates = [b for b in blocks if b not in order]
            attn_left = [b for b in candidates if b.part == "attn"]
            if len(attn_left) == 1:
                candidates.remove(attn_left[0])
            desc = f"blockpruner removal {len(order) + 1}"
            if per_param:
                scores = search.score(candidates, desc=desc, shortlist=self.target.shortlist,
                                      rank=lambda b, increase: increase / sizes[b])
                key = {b: (v - nll) / sizes[b] for b, v in scores.items()}
            else:
                scores = search.score(candidates, desc=desc, shortlist=self.target.shortlist)
                key = scores
            # scores holds only candidates scored on every window (see --search-shortlist)
            best = min(key, key=lambda b: (key[b], -b.layer, b.part))
            search.remove(best)
            order.append(best)
            removed_params += sizes[best]
            nll = scores[best]
            curve.append(ppl(nll))
            log.info("blockpruner (%s) removal %d: %s, calibration ppl %.4f, ratio %.4f",
                     self.config.criterion, len(order), best, math.exp(nll),
                     removed_params / total)
        return finish(context, self.target, search, order, curve, total, removed_params,
                      {"block_parameters": {str(b): sizes[b] for b in blocks},
                       "criterion": self.config.criterion})
