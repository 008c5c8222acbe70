"""Tiny random-weight models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.models.gemma3 import Gemma3TextConfig

VOCAB = 260  # 256 bytes + specials: the byte tokenizer below covers any text


def _common(**kw):
    return dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=257, **kw)


def configs() -> dict:
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return {
        "llama": LlamaConfig(**_common(**llama_like)),
        "mistral": MistralConfig(**_common(**llama_like)),
        "qwen2": Qwen2Config(**_common(**llama_like)),
        # head_dim explicit (Qwen3's is not hidden / heads in real models) and q/k norms
        "qwen3": Qwen3Config(**_common(**llama_like, head_dim=16)),
        "gemma3_text": Gemma3TextConfig(**_common(**llama_like, head_dim=16,
                                                  sliding_window=8,
                                                  layer_types=["sliding_attention",
                                                               "full_attention",
                                                               "sliding_attention"],
                                                  final_logit_softcapping=30.0)),
        "opt": OPTConfig(**_common(hidden_size=64, ffn_dim=128, num_hidden_layers=3,
                                   num_attention_heads=4, max_position_embeddings=256,
                                   word_embed_proj_dim=64)),
        "gpt2": GPT2Config(**_common(n_embd=64, n_layer=3, n_head=4, n_positions=256)),
        "gpt_neox": GPTNeoXConfig(**_common(hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=3, num_attention_heads=4,
                                            max_position_embeddings=256)),
    }


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = configs()[family]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return model




def tiny_loaded(family: str = "llama", seed: int = 0):
    """A tiny model with the byte tokenizer and its adapter, as `load` would hand it over."""
    from secateur.models import adapter_for
    from secateur.models.loading import Loaded

    model = tiny_model(family, seed)
    return Loaded(model, byte_tokenizer(), adapter_for(model), family, "")


def byte_tokenizer():
    """A byte-level tokenizer (no merges) so tiny models can read any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"] = 256
    vocab["</s>"] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny(family: str, path, seed: int = 0):
    model = tiny_model(family, seed)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def make_step(**fields):
    """A method config from keyword fields: make_step(method="wanda", sparsity=0.5)."""
    from secateur.registry import make_config

    return make_config(fields)


@torch.no_grad()
def model_nll(model, wins) -> float:
    """Mean next-token NLL of `model` over windows of shape (1, T)."""
    total = tokens = 0.0
    for w in wins:
        logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
        total += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        tokens += w.shape[1] - 1
    return total / tokens
