"""BlockPruner's ranking criteria: the paper's `loss` and `loss_per_param` (see blocks.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from secateur.api import CalibrationConfig, calibration_data, prune
from secateur.config import ConfigError
from secateur.engine.block_search import BlockSearch
from secateur.methods import build_method
from secateur.methods.base import PruneContext
from secateur.models import adapter_for
from secateur.surgery.depth import Block, block_parameters, remove_blocks, total_parameters
from tests.tiny_models import make_step, model_nll, tiny_loaded, tiny_model

CALIB = CalibrationConfig("wiki", nsamples=4, seqlen=32, seed=0)
EXACT = {"search_dtype": "float32"}


pytestmark = pytest.mark.usefixtures("one_thread")


# -- a constructed case: the search's losses are given, so the two rules must differ ---------
# Tiny Llama: an attention block is 12,288 parameters, an MLP block 24,576. NLL increases are
# additive here. 0.attn raises the NLL least (0.010), so the paper's rule takes it first; 0.mlp
# raises it by 0.015 for twice the parameters, the least per parameter.
INCREASE = {"0.attn": 0.010, "1.attn": 0.012, "2.attn": 0.030,
            "0.mlp": 0.015, "1.mlp": 0.050, "2.mlp": 0.040}
DENSE_NLL = 2.0


class GivenLosses:
    """Stands for BlockSearch: the NLL of a removal set is the dense NLL plus its increases."""

    def __init__(self) -> None:
        self.removed: list[Block] = []
        self.ranks: list[dict[Block, float]] = []  # what `rank` gave, per step

    def _nll(self, blocks: list[Block]) -> float:
        return DENSE_NLL + sum(INCREASE[str(b)] for b in blocks)

    def loss(self) -> float:
        return self._nll(self.removed)

    def score(self, candidates, desc="", shortlist=None, rank=None):
        scores = {c: self._nll([*self.removed, c]) for c in candidates}
        if rank is not None:
            self.ranks.append({c: rank(c, v - self.loss()) for c, v in scores.items()})
        return scores

    def remove(self, block: Block) -> None:
        self.removed.append(block)

    def summary(self) -> dict:
        return {}


def run_given(**fields) -> tuple[dict, GivenLosses]:
    loaded = tiny_loaded()
    fake = GivenLosses()
    context = PruneContext(loaded.model, loaded.tokenizer, loaded.adapter, [], seed=0,
                           progress=False, block_search=lambda *a, **k: fake)
    summary = build_method(make_step(method="blockpruner", **fields)).run(context)
    return summary, fake


def test_constructed_case_orders_differ_between_the_rules():
    faithful, _ = run_given(blocks=4)
    per_param, fake = run_given(blocks=4, criterion="loss_per_param")
    # 2.attn (0.030) is next by loss, but the last attention block always stays
    assert faithful["removed"] == ["0.attn", "1.attn", "0.mlp", "2.mlp"]
    # per parameter: 0.mlp 6.1e-7, 0.attn 8.1e-7, 1.attn 9.8e-7, 2.mlp 1.6e-6, 1.mlp 2.0e-6
    assert per_param["removed"] == ["0.mlp", "0.attn", "1.attn", "2.mlp"]
    assert faithful["removed"][:3] != per_param["removed"][:3]
    assert per_param["criterion"] == "loss_per_param" and faithful["criterion"] == "loss"
    # the rank handed to the search's screening is the increase per parameter
    assert fake.ranks[0][Block(0, "mlp")] == pytest.approx(0.015 / 24576)
    assert fake.ranks[0][Block(2, "attn")] == pytest.approx(0.030 / 12288)
    # the curve is the real NLL path, not the criterion's values
    assert per_param["calibration_perplexity"][1] == pytest.approx(torch.tensor(2.015).exp())


def test_constructed_case_stops_at_the_parameter_ratio():
    total = total_parameters(tiny_model("llama"))
    ratio = 20000 / total  # one MLP block (24,576) or two attention blocks reach it
    faithful, _ = run_given(ratio=ratio)
    per_param, _ = run_given(ratio=ratio, criterion="loss_per_param")
    assert faithful["removed"] == ["0.attn", "1.attn"]
    assert per_param["removed"] == ["0.mlp"]
    for s in (faithful, per_param):
        assert s["ratio"]["achieved"] >= ratio
        assert s["ratio"]["removed_parameters"] == 24576


# -- the real search: each rule picks what an independent computation says ------------------
def independent_greedy(model, wins, steps: int, per_param: bool) -> list[str]:
    """Greedy by really pruned copies of the model, no BlockSearch involved."""
    adapter = adapter_for(model)
    sizes = {Block(i, p): block_parameters(adapter, Block(i, p))
             for i in range(adapter.num_layers) for p in ("attn", "mlp")}
    order: list[Block] = []
    now = model_nll(model, wins)
    for _ in range(steps):
        nll = {}
        for b in sizes:
            if b in order:
                continue
            m = copy.deepcopy(model)
            remove_blocks(m, adapter_for(m), [*order, b])
            nll[b] = model_nll(m, wins)
        key = {b: (v - now) / sizes[b] for b, v in nll.items()} if per_param else nll
        best = min(key, key=lambda b: (key[b], -b.layer, b.part))
        order.append(best)
        now = nll[best]
    return [str(b) for b in order]


@pytest.mark.parametrize("criterion", ["loss", "loss_per_param"])
def test_real_search_order_matches_an_independent_greedy(criterion):
    loaded = tiny_loaded()
    reference = copy.deepcopy(loaded.model)
    run = prune(loaded, make_step(method="blockpruner", blocks=3, criterion=criterion, **EXACT),
                CALIB, progress=False)
    wins = calibration_data(tiny_loaded(), CALIB)[0]
    assert run.summary["removed"] == independent_greedy(reference, wins, 3,
                                                        criterion == "loss_per_param")


def test_default_is_the_papers_rule_with_the_same_order():
    default = prune(tiny_loaded(), make_step(method="blockpruner", blocks=3, **EXACT), CALIB,
                    progress=False).summary
    explicit = prune(tiny_loaded(), make_step(method="blockpruner", blocks=3, criterion="loss",
                                              **EXACT), CALIB, progress=False).summary
    assert make_step(method="blockpruner", blocks=1).criterion == "loss"
    assert default["removed"] == explicit["removed"]
    assert default["calibration_perplexity"] == explicit["calibration_perplexity"]


def test_shortlist_screens_by_the_callers_rank():
    model = tiny_model("llama")
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(3)
    wins = [torch.randint(0, 256, (1, 24), generator=g) for _ in range(8)]
    sizes = {Block(i, p): block_parameters(adapter, Block(i, p))
             for i in range(3) for p in ("attn", "mlp")}
    candidates = list(sizes)

    def rank(b: Block, increase: float) -> float:
        return increase / sizes[b]

    quick = BlockSearch(model, adapter, wins, batch_size=2, progress=False)
    scores = quick.score(candidates, shortlist=2, rank=rank)
    # the screening set is the first quarter of the batches: the first two windows
    screen = BlockSearch(model, adapter, wins[:2], batch_size=2, progress=False)
    now = screen.loss()
    screened = screen.score(candidates)
    by_rank = sorted(candidates, key=lambda c: ((screened[c] - now) / sizes[c], -c.layer, c.part))
    assert set(scores) == set(by_rank[:2])
    exact = BlockSearch(model, adapter, wins, batch_size=2, progress=False).score(candidates)
    for c in scores:
        assert scores[c] == pytest.approx(exact[c], rel=1e-6)


@pytest.mark.parametrize("fields,match", [
    (dict(method="blockpruner", blocks=1, criterion="per_param"), "criterion"),
    (dict(method="sleb", layers=1, criterion="loss_per_param"), "criterion: not a field"),
])
def test_bad_criterion_fails_with_one_line(fields, match):
    with pytest.raises(ConfigError, match=match) as err:
        make_step(**fields)
    assert "\n" not in str(err.value)
