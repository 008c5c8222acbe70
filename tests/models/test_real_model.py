"""The bundled real model (SmolLM2-135M): numbers that only a trained model can show."""

import dataclasses

import pytest

from secateur.api import CalibrationConfig, prune
from secateur.data import load_text
from secateur.eval.perplexity import perplexity
from tests.tiny_models import make_step

pytestmark = pytest.mark.slow

SEQLEN = 256
WINDOWS = 8


@pytest.fixture(scope="module")
def wiki():
    src = load_text("wiki")
    return dataclasses.replace(src, documents=src.documents[:200])


def _ppl(loaded, wiki):
    return perplexity(loaded.model, loaded.tokenizer, wiki, SEQLEN, WINDOWS,
                      progress=False).perplexity


def test_dense_perplexity_is_that_of_a_trained_model(smollm2, wiki):
    ppl = _ppl(smollm2, wiki)
    assert 10 < ppl < 40


@pytest.fixture(scope="module")
def pruned_ppl(smollm2, wiki):
    import copy

    from secateur.models import adapter_for
    from secateur.models.loading import Loaded

    out = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(smollm2.model)
        loaded = Loaded(model, smollm2.tokenizer, adapter_for(model), "smollm2-135m", "")
        prune(loaded, make_step(method=method, sparsity=0.5),
              CalibrationConfig("c4-sample", nsamples=8, seqlen=SEQLEN, seed=0), progress=False)
        out[method] = _ppl(loaded, wiki)
        del loaded, model
    return out


def test_wanda_and_sparsegpt_beat_magnitude_threefold(pruned_ppl):
    assert pruned_ppl["wanda"] * 3 < pruned_ppl["magnitude"], pruned_ppl
    assert pruned_ppl["sparsegpt"] * 3 < pruned_ppl["magnitude"], pruned_ppl
    # On this small model the two land close to each other.
    assert 0.67 < pruned_ppl["wanda"] / pruned_ppl["sparsegpt"] < 1.5, pruned_ppl
