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


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "opt", "gpt_neox"])
def test_batched_windows_equal_one_at_a_time_in_fp32(family):
    """Batching and the chunked head (last hidden state -> logits in row chunks) change the
    float rounding only; Gemma's softcap and OPT's head path go through the adapter."""
    model, tok = tiny_model(family), byte_tokenizer()
    src = _small_wiki()
    one = perplexity(model, tok, src, seqlen=48, max_windows=7, batch_size=1, progress=False)
    many = perplexity(model, tok, src, seqlen=48, max_windows=7, batch_size=4, progress=False)
    assert many.perplexity == pytest.approx(one.perplexity, rel=1e-5)
    assert many.tokens == one.tokens == 7 * 47
    assert many.protocol == one.protocol  # batch size is not part of the protocol


def test_chunked_head_equals_the_models_own_logits():
    from secateur.eval.perplexity import HEAD_ROWS, batch_nll
    from secateur.models import adapter_for

    model = tiny_model("gemma3_text")  # softcapped logits: the head is more than lm_head
    ids = torch.randint(0, 256, (2, HEAD_ROWS // 2 + 40))  # 2 x 167 positions: 2 chunks
    chunked = batch_nll(model, ids, adapter_for(model))
    full = batch_nll(model, ids, None)  # the model's own full logits
    logits = model(input_ids=ids).logits[:, :-1].reshape(-1, 260)
    ref = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="sum")
    assert chunked.dtype == torch.float64
    assert chunked.item() == pytest.approx(ref.item(), rel=1e-6)
    assert full.item() == pytest.approx(ref.item(), rel=1e-6)


def test_bfloat16_compute_is_close_and_recorded():
    model, tok = tiny_model("llama"), byte_tokenizer()
    src = _small_wiki()
    fp32 = perplexity(model, tok, src, seqlen=64, max_windows=4, progress=False)
    bf16 = perplexity(model, tok, src, seqlen=64, max_windows=4, compute_dtype="bfloat16",
                      progress=False)
    assert (fp32.protocol.compute_dtype, bf16.protocol.compute_dtype) == ("float32", "bfloat16")
    assert bf16.protocol.dtype == "float32"  # the weights stay as they are
    assert next(model.parameters()).dtype == torch.float32
    assert bf16.perplexity != fp32.perplexity  # it did run in bf16
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=5e-3)


def test_compute_dtype_choices():
    tok = byte_tokenizer()
    src = _small_wiki()
    model = tiny_model("llama").to(torch.bfloat16)
    r = perplexity(model, tok, src, seqlen=32, max_windows=2, progress=False)
    assert (r.protocol.dtype, r.protocol.compute_dtype) == ("bfloat16", "bfloat16")
    with pytest.raises(SecateurError, match="load it with dtype float32"):
        perplexity(model, tok, src, seqlen=32, compute_dtype="float32", progress=False)
    with pytest.raises(SecateurError, match="unknown compute dtype"):
        perplexity(model, tok, src, seqlen=32, compute_dtype="int8", progress=False)
    with pytest.raises(SecateurError, match="batch-size"):
        perplexity(model, tok, src, seqlen=32, batch_size=0, progress=False)


def test_result_round_trips_through_its_dict():
    from secateur.eval.perplexity import PerplexityResult

    r = perplexity(tiny_model("llama"), byte_tokenizer(), _small_wiki(), seqlen=32,
                   max_windows=2, progress=False)
    assert PerplexityResult.from_dict(r.to_dict()) == r
    old = r.to_dict()
    del old["protocol"]["compute_dtype"]  # written before compute dtypes existed
    assert PerplexityResult.from_dict(old).protocol.compute_dtype == "float32"


def test_evaluate_with_a_perplexity_config():
    from secateur.eval.api import evaluate
    from secateur.eval.config import PerplexityConfig

    model, tok, src = tiny_model("llama"), byte_tokenizer(), _small_wiki()
    config = PerplexityConfig(seqlen=32, max_windows=3, batch_size=2, compute_dtype="bfloat16")
    r = evaluate(model, config, progress=False, tokenizer=tok, source=src)
    direct = perplexity(model, tok, src, 32, 3, compute_dtype="bfloat16", progress=False)
    assert r.perplexity == pytest.approx(direct.perplexity, rel=1e-5)
    assert (r.protocol.windows, r.protocol.compute_dtype) == (3, "bfloat16")
    with pytest.raises(SecateurError, match="needs its tokenizer"):
        evaluate(model, config, progress=False, source=src)
    with pytest.raises(SecateurError, match="PerplexityConfig.bos"):
        PerplexityConfig(bos="sometimes")
