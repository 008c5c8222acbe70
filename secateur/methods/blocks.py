"""BlockPruner (Zhong et al., 2024): remove attention and MLP residual branches one at a time.

Each decoder layer is two blocks, its attention (MHA) branch and its MLP branch, each added to
the residual stream. At every step each remaining block is scored by the calibration perplexity
of the model with it removed (on top of the blocks already gone), and the lowest goes: about 2L
candidate evaluations per removed block, which `BlockSearch` makes cheap by reusing the hidden
states before each candidate's layer. `--blocks K`, or `--ratio R` meaning the smallest removal
reaching R of ALL parameters (embeddings included), the paper's definition.

A layer that loses both blocks is removed whole; single blocks are removed physically by
converting to secateur's own Llama-family class, saved with `auto_map`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from secateur.errors import SecateurError
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


class BlockPrunerConfig(GreedyDepthConfig):
    """BlockPruner: remove attention/MLP blocks greedily by calibration perplexity."""

    method = "blockpruner"
    unit = "blocks"
    blocks: int | None = Field(None, ge=1, description="Blocks (attention or MLP) to remove.")


@register_method(BlockPrunerConfig)
class BlockPruner(ModelMethod):
    def __init__(self, config: BlockPrunerConfig) -> None:
        super().__init__(config)
        self.target = DepthTarget(config)

    def run(self, context: PruneContext) -> dict[str, Any]:
        model, adapter = context.model, context.adapter
        if not adapter.saves_heterogeneous:
            raise SecateurError(
                f"blockpruner removes single attention/MLP blocks, which secateur can save only "
                f"for Llama models, not '{model.config.model_type}': use --method shortgpt or "
                "sleb")
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
        curve = [ppl(search.loss())]
        while not self.target.done(len(order), removed_params, total):
            candidates = [b for b in blocks if b not in order]
            attn_left = [b for b in candidates if b.part == "attn"]
            if len(attn_left) == 1:
                candidates.remove(attn_left[0])
            scores = search.score(candidates, desc=f"blockpruner removal {len(order) + 1}",
                                  shortlist=self.target.shortlist)
            # scores holds only candidates scored on every window (see --search-shortlist)
            best = min(scores, key=lambda b: (scores[b], -b.layer, b.part))
            search.remove(best)
            order.append(best)
            removed_params += sizes[best]
            curve.append(ppl(scores[best]))
        return finish(context, self.target, search, order, curve, total, removed_params,
                      {"block_parameters": {str(b): sizes[b] for b in blocks}})
