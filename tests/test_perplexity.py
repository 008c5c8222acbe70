import dataclasses
import math

import pytest
import torch

from secateur.data import load_text
from secateur.errors import SecateurError
from secateur.eval.perplexity import perplexity
from tests.tiny_models import byte_tokenizer, tiny_model


def _small_wiki():
    src = load_text("wiki")
    return dataclasses.replace(src, documents=src.documents[:20])


def _reference_ppl(model, tok, text, seqlen, nwin):
    """The SparseGPT/Wanda eval loop, written independently: HF's own shifted loss."""
    ids = tok(text, return_tensors="pt").input_ids
    nlls = []
    for i in range(nwin):
        window = ids[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            loss = model(window, labels=window).loss
        nlls.append(loss.float() * seqlen)
    return torch.exp(torch.stack(nlls).sum() / (nwin * seqlen)).item()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_independent_reference_loop(family):
    model, tok = tiny_model(family), byte_tokenizer()
    src = _small_wiki()
    ours = perplexity(model, tok, src, seqlen=64, max_windows=5, progress=False)
    ref = _reference_ppl(model, tok, src.joined(), 64, 5)
    assert ours.perplexity == pytest.approx(ref, rel=1e-5)
    assert ours.tokens == 5 * 63
    p = ours.protocol
    assert (p.dataset, p.join, p.seqlen, p.stride, p.windows, p.bos) == (
        "wiki", "\n\n", 64, 64, 5, "default")
    assert "torch" in p.versions and "transformers" in p.versions
    # A random model over 260 byte tokens sits near the uniform perplexity.
    assert 100 < ours.perplexity < 600


def test_llm_pruner_protocol_uses_128_and_context_caps_seqlen():
    model, tok = tiny_model("llama"), byte_tokenizer()
    src = _small_wiki()
    r = perplexity(model, tok, src, max_windows=2, protocol="llm-pruner", progress=False)
    assert r.protocol.seqlen == 128 and r.protocol.name == "llm-pruner"
    capped = perplexity(model, tok, src, max_windows=1, progress=False)
    assert capped.protocol.seqlen == 256  # tiny model's context, below the default 2048
    assert math.isfinite(capped.perplexity)


def test_bad_eval_arguments():
    model, tok = tiny_model("llama"), byte_tokenizer()
    src = _small_wiki()
    with pytest.raises(SecateurError, match="at least 2"):
        perplexity(model, tok, src, seqlen=0, progress=False)
    with pytest.raises(SecateurError, match="unknown protocol"):
        perplexity(model, tok, src, protocol="mine", progress=False)


def test_auto_bos_puts_bos_on_every_gemma_window():
    tok = byte_tokenizer()
    src = _small_wiki()
    gemma = perplexity(tiny_model("gemma3_text"), tok, src, seqlen=32, max_windows=2,
                       progress=False)
    llama = perplexity(tiny_model("llama"), tok, src, seqlen=32, max_windows=2, progress=False)
    assert gemma.protocol.bos == "each" and llama.protocol.bos == "default"
