"""Gemma 3 as one GGUF file for llama.cpp's `gemma3` architecture.

What convert_hf_to_gguf.py's Gemma3Model writes, for the text decoder of every layer
complete and alike (pruned Gemma layouts have no llama.cpp architecture, so they are refused):
- every RMSNorm weight shifted by +1, because Gemma scales by (1 + w) and llama.cpp by w;
- no q/k row permutation: llama.cpp runs Gemma's rotary in the NEOX (rotate-half) layout
  transformers uses;
- sliding-window layers as a per-layer pattern and their own rotary base, read from the
  config's `layer_types` and `rope_parameters` rather than llama.cpp's "every 6th layer"
  default, so a model with another pattern is written as it is;
- the tokenizer as llama.cpp's SentencePiece (`llama`) vocabulary. Without the original
  `tokenizer.model`, each piece's score is minus the rank of the first BPE merge that makes
  it: llama.cpp merges the highest-scoring pair first and the tokenizer merges the lowest
  rank first, so the two split text alike (checked against the original GGUF's vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.formats.llama_layout import DecoderDims, LayerShape
from secateur.quant.state import weights_state_dict

ARCH = "gemma3"
# per-layer tensors: transformers' short name -> gguf MODEL_TENSOR
HF_TO_GGUF = {
    "input_layernorm": "ATTN_NORM", "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT",
    "self_attn.q_norm": "ATTN_Q_NORM", "self_attn.k_norm": "ATTN_K_NORM",
    "post_attention_layernorm": "ATTN_POST_NORM", "pre_feedforward_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
    "post_feedforward_layernorm": "FFN_POST_NORM",
}
ROLE = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
NORM_SHIFT = 1.0


@dataclass
class Gemma3Layout(DecoderDims):
    """A stock Gemma 3 text decoder as the GGUF writer needs it."""

    sliding_window: int
    swa_layers: list[bool]
    rope_theta: float
    rope_theta_swa: float
    final_logit_softcapping: float | None
    layers: list[LayerShape]
    tensors: dict[str, torch.Tensor]
    tie_word_embeddings: bool = True

    @property
    def is_stock(self) -> bool:
        return True


def _expected(c: Any, n: int, hd: int, heads: int, kv: int, ffn: int, tied: bool
              ) -> dict[str, tuple[int, ...]]:
    h = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h),
                                          "model.norm.weight": (h,)}
    if not tied:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(n):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "pre_feedforward_layernorm.weight": (h,),
            p + "post_feedforward_layernorm.weight": (h,),
            p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
            p + "mlp.down_proj.weight": (h, ffn)})
    return shapes


def _rope_thetas(c: Any) -> tuple[float, float]:
    params = dict(getattr(c, "rope_parameters", None) or {})
    full = params.get("full_attention", params)
    local = params.get("sliding_attention", {})
    for kind, p in (("full", full), ("sliding", local)):
        if (p.get("rope_type") or "default") != "default":
            raise SecateurError(f"Gemma 3's {kind}-attention rope type '{p.get('rope_type')}' is "
                                "not exported to GGUF (only the default rotary is)")
    theta = float(full.get("rope_theta", getattr(c, "rope_theta", 1_000_000.0)))
    theta_swa = float(local.get("rope_theta", getattr(c, "rope_local_base_freq", 10_000.0)))
    return theta, theta_swa


def read_gemma3_layout(model: nn.Module, name: str) -> Gemma3Layout:
    """The model's config and tensors as llama.cpp's gemma3 reads them; one line if it is not
    a stock Gemma 3 text decoder."""
    c = model.config
    tied = bool(getattr(c, "tie_word_embeddings", True))
    tensors = {k: v.detach() for k, v in weights_state_dict(model).items()}
    if tied:
        tensors.pop("lm_head.weight", None)
    n, hd = c.num_hidden_layers, c.head_dim
    heads, kv, ffn = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    want = _expected(c, n, hd, heads, kv, ffn, tied)
    extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
    if extra or missing:
        what = f"has '{extra[0]}'" if extra else f"lacks '{missing[0]}'"
        raise SecateurError(f"'{name}' {what}: llama.cpp's gemma3 architecture takes only stock "
                            "Gemma 3 layers (every layer complete and the same width)")
    for key, shape in want.items():
        if tuple(tensors[key].shape) != shape:
            raise SecateurError(f"'{key}' has shape {tuple(tensors[key].shape)} but llama.cpp's "
                                f"gemma3 needs {shape}: pruned Gemma widths are not exported "
                                "to GGUF")
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise SecateurError(f"llama.cpp's gemma3 runs GELU (tanh); this model's activation is "
                            f"'{act}'")
    if getattr(c, "attn_logit_softcapping", None) is not None:
        raise SecateurError("attention logit softcapping has no gemma3 GGUF field")
    scalar = getattr(c, "query_pre_attn_scalar", hd)
    big = n == 62  # llama.cpp scales the 27B's queries by hidden/heads, every other by head_dim
    if float(scalar) != float(c.hidden_size // heads if big else hd):
        raise SecateurError(f"query_pre_attn_scalar {scalar} is not what llama.cpp's gemma3 "
                            f"assumes for a {n}-layer model")
    types = list(getattr(c, "layer_types", None) or [])
    window = int(getattr(c, "sliding_window", 0) or 0)
    swa = [t == "sliding_attention" for t in types] if types else [False] * n
    if len(swa) != n:
        raise SecateurError(f"layer_types names {len(swa)} layers for {n}")
    theta, theta_swa = _rope_thetas(c)
    return Gemma3Layout(
        name=name, hidden_size=c.hidden_size, head_dim=hd, vocab_size=c.vocab_size,
        rms_norm_eps=float(c.rms_norm_eps),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 131072)),
        sliding_window=window, swa_layers=swa, rope_theta=theta, rope_theta_swa=theta_swa,
        final_logit_softcapping=getattr(c, "final_logit_softcapping", None),
        layers=[LayerShape(heads, kv, ffn)] * n, tensors=tensors, tie_word_embeddings=tied)


def tensor_order(layout: Gemma3Layout) -> list[tuple[str, str, torch.Tensor]]:
    """(gguf name, transformers name, tensor as written) in file order; norms shifted."""
    import gguf

    name = gguf.TENSOR_NAMES
    t = layout.tensors
    out = [(name[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", "model.embed_tokens.weight",
            t["model.embed_tokens.weight"]),
           (name[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight", "model.norm.weight",
            t["model.norm.weight"] + NORM_SHIFT)]
    if not layout.tie_word_embeddings:
        out.append((name[gguf.MODEL_TENSOR.OUTPUT] + ".weight", "lm_head.weight",
                    t["lm_head.weight"]))
    for i in range(len(layout.layers)):
        for short, tensor in HF_TO_GGUF.items():
            hf = f"model.layers.{i}.{short}.weight"
            w = t[hf] + NORM_SHIFT if short.endswith("norm") else t[hf]
            out.append((name[getattr(gguf.MODEL_TENSOR, tensor)].format(bid=i) + ".weight", hf,
                        w))
    return out


def roles(layout: Gemma3Layout) -> dict[str, str]:
    """gguf matrix name -> llama.cpp's role for the preset rules."""
    out = {}
    for key, hf, _ in tensor_order(layout):
        short = hf.removeprefix("model.layers.").partition(".")[2].removesuffix(".weight")
        if hf == "model.embed_tokens.weight":
            out[key] = "token_embd"
        elif hf == "lm_head.weight":
            out[key] = "output"
        elif short in ROLE:
            out[key] = ROLE[short]
    return out


def add_hparams(writer: Any, layout: Gemma3Layout, file_type: int) -> None:
    writer.add_name(layout.name)
    writer.add_context_length(layout.max_position_embeddings)
    writer.add_embedding_length(layout.hidden_size)
    writer.add_block_count(len(layout.layers))
    s = layout.layers[0]
    writer.add_feed_forward_length(s.intermediate_size)
    writer.add_head_count(s.num_heads)
    writer.add_head_count_kv(s.num_kv_heads)
    writer.add_layer_norm_rms_eps(layout.rms_norm_eps)
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_freq_base(layout.rope_theta)
    writer.add_vocab_size(layout.vocab_size)
    writer.add_file_type(file_type)
    if layout.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(layout.final_logit_softcapping))
    if layout.sliding_window and any(layout.swa_layers):
        writer.add_sliding_window(layout.sliding_window)
        writer.add_sliding_window_pattern(layout.swa_layers)
        writer.add_rope_freq_base_swa(layout.rope_theta_swa)


def add_spm_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """llama.cpp's SentencePiece vocabulary from a byte-fallback BPE tokenizer.json."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SecateurError("GGUF export needs a fast (tokenizers) tokenizer saved with the "
                            "model")
    tok = json.loads(backend.to_str())
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise SecateurError("Gemma's GGUF vocabulary is written from a SentencePiece-style BPE "
                            "tokenizer (byte fallback); this one is "
                            f"{model.get('type')} without byte fallback")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SecateurError(f"the tokenizer has id {max(vocab.values())} but the model only "
                            f"{vocab_size} embeddings")
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, r)
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        piece = reverse.get(i)
        if piece is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(piece)
        if piece == unk:
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added and added[i].special:
            scores.append(-1000.0)
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            scores.append(-1000.0)
            types.append(gguf.TokenType.USER_DEFINED)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            scores.append(-float(rank.get(piece, 0)))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if isinstance(value, int):
            add(value)
    # what the tokenizer really adds (its post-processor), not its add_bos_token attribute,
    # which transformers' GGUF-converted Gemma tokenizer leaves False while adding BOS
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id)
