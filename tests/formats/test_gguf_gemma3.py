"""Gemma 3 as GGUF in llama.cpp: a tiny random Gemma 3 (sliding-window layers, q/k norms,
sandwich norms, (1 + w) norms, SentencePiece-style vocabulary) written by secateur runs in
llama.cpp as it does in transformers, tokenizes the same, and gets llama.cpp's own preset
types."""

from __future__ import annotations

import gguf
import pytest
import torch

from secateur.errors import SecateurError
from secateur.formats.export import export_model
from secateur.runtime import llama_cpp as runtime
from tests.runtime.test_llama_cpp import (
    compare_preset_tables,
    quantized_in_both,
    transformers_perplexity,
)

VOCAB = 320


def spm_tokenizer():
    """A byte-fallback BPE over '▁'-joined words, shaped like Gemma's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdehilnorst":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("▁", "s"),
              ("e", "r"), ("o", "n"), ("▁a", "n"), ("▁an", "d"), ("a", "t"), ("▁s", "t")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 2)])
    assert len(vocab) <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def tiny_gemma3(layers: int = 6, hidden: int = 64):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        query_pre_attn_scalar=32, sliding_window=8, max_position_embeddings=128,
        layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention"
                     for i in range(layers)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}},
        bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # Gemma initializes norms at 0 (scale 1): make the +1 shift matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model


def windows(n: int = 4, seqlen: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(4, VOCAB, (1, seqlen), generator=g) for _ in range(n)]


def test_f32_gguf_scores_as_transformers_across_sliding_windows(tmp_path):
    torch.set_num_threads(1)
    model = tiny_gemma3()
    out = tmp_path / "g.gguf"
    written = export_model(model, spm_tokenizer(), "gguf", out, outtype="f32")
    assert written["architecture"] == "gemma3"
    fields = gguf.GGUFReader(out).fields
    pattern = fields["gemma3.attention.sliding_window_pattern"]
    assert [bool(pattern.parts[i][0]) for i in pattern.data] == [True, True, False] * 2
    wins = windows(seqlen=40)  # longer than the window of 8: the sliding layers matter
    theirs = runtime.perplexity(out, wins)["perplexity"]
    ours = transformers_perplexity(model, wins)
    assert abs(theirs / ours - 1) < 1e-4, (theirs, ours)


def test_vocabulary_tokenizes_as_the_tokenizer(tmp_path):
    import llama_cpp

    tok = spm_tokenizer()
    out = tmp_path / "g.gguf"
    export_model(tiny_gemma3(2), tok, "gguf", out, outtype="f32")
    text = "the and stand their heather on toast, 3 ñ then!"
    vocab = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=True) == tok(text)["input_ids"]
    assert vocab.tokenize(b"hello", add_bos=True)[0] == 2


@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m"])
def test_quantized_gemma3_runs_in_llama_cpp_as_in_transformers(tmp_path, preset):
    model = tiny_gemma3()
    out, theirs, ours = quantized_in_both(tmp_path, model, spm_tokenizer(), preset,
                                          windows(8, 64), windows())
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)  # llama.cpp's 8-bit activations
    # the codes in the file are the quantize step's own: dequantized, they are the weights
    reader = {t.name: t for t in gguf.GGUFReader(out).tensors}
    t = reader["blk.0.ffn_gate.weight"]
    deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float()
    assert torch.equal(deq, model.model.layers[0].mlp.gate_proj.weight.detach())
    norm = torch.from_numpy(reader["blk.0.attn_q_norm.weight"].data.copy()).float()
    assert torch.allclose(norm, model.model.layers[0].self_attn.q_norm.weight + 1)


@pytest.mark.parametrize("preset", ["q4_0", "q4_k_m", "q6_k"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_gemma3_preset_table_is_llama_cpps_own_choice(tmp_path, preset, with_imatrix):
    # 256-wide rows: K-quants without fallbacks
    compare_preset_tables(tmp_path, tiny_gemma3(8, hidden=256), preset, with_imatrix,
                          spm_tokenizer())


def test_pruned_gemma3_is_refused_in_one_line(tmp_path):
    model = tiny_gemma3(2)
    layer = model.model.layers[0].mlp
    layer.gate_proj.weight = torch.nn.Parameter(layer.gate_proj.weight[:64].clone())
    with pytest.raises(SecateurError, match="gemma3 needs"):
        export_model(model, spm_tokenizer(), "gguf", tmp_path / "p.gguf", outtype="f32")
    assert not (tmp_path / "p.gguf").exists()
