"""Write a Llama-shaped model as one GGUF file for llama.cpp, with its tokenizer.

Stock shapes (every layer complete and alike) use llama.cpp's `llama` architecture.
Per-layer widths and removed branches use its `deci` architecture (Nemotron-NAS), which reads
`head_count`, `head_count_kv` and `feed_forward_length` as per-layer arrays; a layer with
`head_count` 0 has no attention branch. Two limits of llama.cpp's deci code are met with
stand-ins that add exactly zero (every weight 0), because the runtime would otherwise load
the file and compute something else:
- it takes the head size from layer 0, so a first layer without attention gets a one-head
  attention whose projections are zero;
- a layer whose `feed_forward_length` is 0 is skipped whole, attention included, so a layer
  that kept its attention but lost its MLP gets a one-channel MLP of zeros.
Layers with neither branch are the identity and are left out.

Q and K rows are permuted per head from transformers' rotate-half rotary layout to the
interleaved pairs llama.cpp's `llama`/`deci` rotary works on (as convert_hf_to_gguf.py does).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secateur.errors import SecateurError
from secateur.formats import gguf_gemma3
from secateur.formats.gguf_gemma3 import Gemma3Layout
from secateur.formats.llama_layout import LayerShape, LlamaLayout, read_layout
from secateur.io import atomic_file
from secateur.outputs import check_output_file
from secateur.quant.ggml import GGMLState, pack, rtn_ggml
from secateur.quant.ggml_presets import PRESETS, TensorSlot, tensor_types

PLAIN_OUTTYPES = ("f32", "f16", "q8_0")
# llama.cpp's presets other than q8_0 (kept on gguf's reference rounding above): each matrix in
# the preset's ggml type, filled by secateur's rounding (GPTQ where a quantize step left its
# codes on the model, importance-weighted nearest rounding otherwise)
OUTTYPES = PLAIN_OUTTYPES + tuple(p for p in PRESETS if p != "q8_0")

HF_TO_GGUF = {  # per-layer tensors: transformers' name -> gguf's MODEL_TENSOR
    "input_layernorm": "ATTN_NORM", "self_attn.q_proj": "ATTN_Q", "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V", "self_attn.o_proj": "ATTN_OUT",
    "post_attention_layernorm": "FFN_NORM", "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN",
}


def read_gguf_layout(model: torch.nn.Module, name: str) -> LlamaLayout | Gemma3Layout:
    """The model as the GGUF writer's architecture for its family (the adapter says which:
    llama/deci or gemma3); one line if llama.cpp has no architecture for it."""
    from secateur.models.base import adapter_for

    if adapter_for(model).gguf_architecture == gguf_gemma3.ARCH:
        return gguf_gemma3.read_gemma3_layout(model, name)
    return read_layout(model, name)


def check_gguf_output(out: Path, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """Fail before any work if the file `out` cannot or may not be written (the shared rule,
    `secateur.outputs`: never an input or a file inside one, an existing file only with
    --overwrite)."""
    check_output_file(out, "--out", inputs, overwrite=overwrite)


# -- tokenizer ----------------------------------------------------------------------------
def _pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from tokenizer.json's shape.

    A wrong name makes llama.cpp split text differently without any error, so an unknown
    pre-tokenizer is refused rather than guessed."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+"
                              "|\\p{N}{1,3}"):
            return "llama-bpe"
    raise SecateurError(f"GGUF export knows the GPT-2, SmolLM and Llama-3 byte-level "
                        f"pre-tokenizers; this tokenizer's is {kinds}")


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], str, dict]:
    """Tokens, token types and pre-tokenizer name as convert_hf_to_gguf's get_vocab_base."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SecateurError("GGUF export needs a fast (tokenizers) tokenizer saved with the "
                            "model")
    tok_json = json.loads(backend.to_str())
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise SecateurError(f"GGUF export writes byte-level BPE tokenizers (GPT-2 style); this "
                            f"one is {(tok_json.get('model') or {}).get('type')}")
    if not tok_json["model"].get("merges"):
        raise SecateurError("the tokenizer has no BPE merges, which llama.cpp's gpt2 tokenizer "
                            "requires")
    pre = _pre_tokenizer_name(tok_json)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SecateurError(f"the tokenizer has id {max(vocab.values())} but the model only "
                            f"{vocab_size} embeddings")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, pre, tok_json


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    import gguf

    tokens, types, pre, _ = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads the saved files
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens)).add_to_gguf(
            writer, quiet=True)


# -- tensors ------------------------------------------------------------------------------
def _rotary_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from [first halves | second halves] to interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def gguf_layers(layout: LlamaLayout) -> list[LayerShape]:
    """The per-layer shapes written to the deci architecture, stand-ins included."""
    kept = [s for s in layout.layers if s.has_attention or s.has_mlp]
    out = []
    for j, s in enumerate(kept):
        heads, kv, ffn = s.num_heads, s.num_kv_heads, s.intermediate_size
        if j == 0 and not s.has_attention:
            heads, kv = 1, 1
        if s.has_attention and not s.has_mlp:
            ffn = 1
        out.append(LayerShape(heads, kv, ffn))
    return out


def _layer_tensors(layout: LlamaLayout) -> Iterator[tuple[int, str, torch.Tensor]]:
    """(gguf block index, HF short name, tensor) with stand-ins and q/k permuted."""
    hidden, hd = layout.hidden_size, layout.head_dim
    kept = [(i, s) for i, s in enumerate(layout.layers) if s.has_attention or s.has_mlp]
    for j, ((i, s), w) in enumerate(zip(kept, gguf_layers(layout), strict=True)):
        p = f"model.layers.{i}."
        if s.has_attention:
            for short in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                          "self_attn.v_proj", "self_attn.o_proj"):
                t = layout.tensors[p + short + ".weight"]
                if short == "self_attn.q_proj":
                    t = _rotary_permute(t, s.num_heads)
                elif short == "self_attn.k_proj":
                    t = _rotary_permute(t, s.num_kv_heads)
                yield j, short, t
        elif w.has_attention:  # zero stand-in: llama.cpp needs heads in layer 0
            yield j, "input_layernorm", torch.ones(hidden)
            for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                yield j, short, torch.zeros(hd, hidden)
            yield j, "self_attn.o_proj", torch.zeros(hidden, hd)
        if s.has_mlp:
            for short in ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                          "mlp.down_proj"):
                yield j, short, layout.tensors[p + short + ".weight"]
        elif w.has_mlp:  # zero stand-in: llama.cpp skips a 0-width layer's attention too
            yield j, "post_attention_layernorm", torch.ones(hidden)
            yield j, "mlp.gate_proj", torch.zeros(1, hidden)
            yield j, "mlp.up_proj", torch.zeros(1, hidden)
            yield j, "mlp.down_proj", torch.zeros(hidden, 1)


def _add_tensor(writer: Any, name: str, t: torch.Tensor, outtype: str) -> None:
    import gguf

    arr = t.detach().to(torch.float32).contiguous().numpy()
    if arr.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, arr)
    elif outtype == "q8_0" and arr.shape[-1] % gguf.GGML_QUANT_SIZES[
            gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, and q8_0's rows too short for a block
        writer.add_tensor(name, arr.astype(np.float16))


# llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / the presets' own numbers
FILE_TYPES = {"f32": 0, "f16": 1, **{k: v[0] for k, v in PRESETS.items()}}

ROLE = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}


def _rows_permutation(rows: int, heads: int) -> torch.Tensor:
    return _rotary_permute(torch.arange(rows, dtype=torch.float64)[:, None], heads)[:, 0].long()


def _add_block_tensor(writer: Any, name: str, t: torch.Tensor, ggml_type: str,
                      state: GGMLState | None, rows: torch.Tensor | None) -> None:
    """One matrix in a ggml block type: the quantize step's own codes where it left them
    (rows permuted as `t` was), else importance-weighted nearest rounding of `t`."""
    import gguf

    if ggml_type == "F16":
        writer.add_tensor(name, t.detach().to(torch.float16).numpy())
        return
    if state is None or state.type != ggml_type:
        _, state = rtn_ggml(t.detach().float(), ggml_type, name=name)
        rows = None  # rounded from the permuted tensor itself
    raw = pack(state)
    if rows is not None:
        raw = raw[rows.numpy()]
    writer.add_tensor(name, np.ascontiguousarray(raw),
                      raw_dtype=getattr(gguf.GGMLQuantizationType, ggml_type))


def _add_hparams(writer: Any, layout: LlamaLayout, arch_layers: list[LayerShape] | None,
                 outtype: str) -> None:
    writer.add_name(layout.name)
    writer.add_context_length(layout.max_position_embeddings)
    writer.add_embedding_length(layout.hidden_size)
    writer.add_layer_norm_rms_eps(layout.rms_norm_eps)
    writer.add_rope_freq_base(float(layout.rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_vocab_size(layout.vocab_size)
    writer.add_file_type(FILE_TYPES[outtype])
    if arch_layers is None:  # stock: scalars
        s = layout.layers[0]
        writer.add_block_count(len(layout.layers))
        writer.add_head_count(s.num_heads)
        writer.add_head_count_kv(s.num_kv_heads)
        writer.add_feed_forward_length(s.intermediate_size)
    else:
        writer.add_block_count(len(arch_layers))
        writer.add_head_count([s.num_heads for s in arch_layers])
        writer.add_head_count_kv([s.num_kv_heads for s in arch_layers])
        writer.add_feed_forward_length([s.intermediate_size for s in arch_layers])


def _slots(layout: LlamaLayout | Gemma3Layout) -> tuple[list[TensorSlot], int]:
    """Every matrix in the file's order with its llama.cpp role, and the block count."""
    import gguf

    if isinstance(layout, Gemma3Layout):
        role = gguf_gemma3.roles(layout)
        return ([TensorSlot(k, role[k], t.shape[1])
                 for k, _, t in gguf_gemma3.tensor_order(layout) if k in role],
                len(layout.layers))

    name = gguf.TENSOR_NAMES
    hidden = layout.hidden_size
    slots = [TensorSlot(name[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight", "token_embd", hidden)]
    if not layout.tie_word_embeddings:
        slots.append(TensorSlot(name[gguf.MODEL_TENSOR.OUTPUT] + ".weight", "output", hidden))
    blocks = set()
    for j, short, t in _layer_tensors(layout):
        blocks.add(j)
        if short in ROLE:
            key = name[getattr(gguf.MODEL_TENSOR, HF_TO_GGUF[short])].format(bid=j)
            slots.append(TensorSlot(key + ".weight", ROLE[short], t.shape[1]))
    return slots, len(blocks)


def gguf_tensor_types(layout: LlamaLayout | Gemma3Layout, preset: str, has_imatrix: bool
                      ) -> dict[str, str]:
    """The ggml type llama.cpp's preset gives every matrix of this layout's file."""
    slots, blocks = _slots(layout)
    first = layout.layers[0]  # llama.cpp's n_gqa(): query heads per KV head of layer 0
    n_gqa = first.num_heads // first.num_kv_heads if first.num_kv_heads else 0
    return tensor_types(preset, slots, blocks, has_imatrix, n_gqa)


def write_gguf(layout: LlamaLayout | Gemma3Layout, tokenizer: Any, out: Path,
               overwrite: bool = False, outtype: str = "f16", inputs: tuple[str, ...] = (),
               quantized: dict[str, GGMLState] | None = None, has_imatrix: bool = False
               ) -> dict[str, Any]:
    """One .gguf file (architecture `llama`, `deci` or `gemma3`); returns what was written.

    With a llama.cpp preset as `outtype`, `quantized` maps transformers weight names to the
    codes a quantize step chose (`secateur.quant.ggml`); they are written as they are, and
    every other matrix is rounded here into the preset's type."""
    import gguf

    if outtype not in OUTTYPES:
        raise SecateurError(f"GGUF weights are {', '.join(OUTTYPES)}, got '{outtype}'")
    check_gguf_output(out, overwrite, inputs)
    if tokenizer is None:
        raise SecateurError("GGUF export needs the model's tokenizer (llama.cpp reads it from "
                            "the file)")
    gemma = isinstance(layout, Gemma3Layout)
    if not gemma:
        _vocab(tokenizer, layout.vocab_size)  # refuse an unsupported tokenizer before writing
    arch_layers = None if gemma or layout.is_stock else gguf_layers(layout)
    arch = gguf_gemma3.ARCH if gemma else "llama" if arch_layers is None else "deci"
    preset = outtype if outtype in PRESETS and outtype not in PLAIN_OUTTYPES else None
    types = gguf_tensor_types(layout, preset, has_imatrix) if preset else {}
    states = quantized or {}
    hf_name = hf_weight_names(layout)

    def add(key: str, t: torch.Tensor, heads: int | None = None) -> None:
        if key not in types:
            _add_tensor(writer, key, t, outtype if preset is None else "f32")
            return
        state = states.get(hf_name.get(key, ""))
        rows = None if heads is None or state is None else _rows_permutation(t.shape[0], heads)
        _add_block_tensor(writer, key, t, types[key], state, rows)

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        if gemma:
            gguf_gemma3.add_hparams(writer, layout, FILE_TYPES[outtype])
            gguf_gemma3.add_spm_tokenizer(writer, tokenizer, layout.vocab_size)
            for key, _, t in gguf_gemma3.tensor_order(layout):
                add(key, t)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            return _written(arch, outtype, len(layout.layers), preset, types, hf_name, states)
        _add_hparams(writer, layout, arch_layers, outtype)
        _add_tokenizer(writer, tokenizer, layout.vocab_size)
        name = gguf.TENSOR_NAMES
        add(name[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight",
            layout.tensors["model.embed_tokens.weight"])
        _add_tensor(writer, name[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight",
                    layout.tensors["model.norm.weight"], outtype)
        if not layout.tie_word_embeddings:  # llama.cpp reuses token_embd when output is absent
            add(name[gguf.MODEL_TENSOR.OUTPUT] + ".weight", layout.tensors["lm_head.weight"])
        if layout.rope["rope_type"] == "llama3":
            writer.add_tensor(name[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                              _llama3_rope_factors(layout.rope, layout.head_dim).numpy())
        for j, short, t in _layer_tensors(layout):
            key = name[getattr(gguf.MODEL_TENSOR, HF_TO_GGUF[short])].format(bid=j)
            add(key + ".weight", t, _permuted_heads(layout, j, short))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return _written(arch, outtype, len(layout.layers if arch_layers is None else arch_layers),
                    preset, types, hf_name, states)


def _written(arch: str, outtype: str, layers: int, preset: str | None, types: dict[str, str],
             hf_name: dict[str, str], states: dict[str, GGMLState]) -> dict[str, Any]:
    written: dict[str, Any] = {"architecture": arch, "outtype": outtype, "layers": layers}
    if preset:
        written["tensor_types"] = types
        written["rounded_by_quantize_step"] = sorted(k for k in types
                                                     if hf_name.get(k) in states)
    return written


def _kept_layers(layout: LlamaLayout) -> list[int]:
    return [i for i, s in enumerate(layout.layers) if s.has_attention or s.has_mlp]


def hf_weight_names(layout: LlamaLayout | Gemma3Layout) -> dict[str, str]:
    """GGUF matrix name -> the transformers weight it was written from (stand-ins have none)."""
    import gguf

    if isinstance(layout, Gemma3Layout):
        return {k: hf for k, hf, _ in gguf_gemma3.tensor_order(layout)}

    name = gguf.TENSOR_NAMES
    out = {name[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight": "model.embed_tokens.weight",
           name[gguf.MODEL_TENSOR.OUTPUT] + ".weight": "lm_head.weight"}
    for j, i in enumerate(_kept_layers(layout)):
        for short, tensor in HF_TO_GGUF.items():
            hf = f"model.layers.{i}.{short}.weight"
            if hf in layout.tensors:
                out[name[getattr(gguf.MODEL_TENSOR, tensor)].format(bid=j) + ".weight"] = hf
    return out


def _permuted_heads(layout: LlamaLayout, block: int, short: str) -> int | None:
    """Head count whose rows `_layer_tensors` permuted for this matrix (q and k), else None."""
    if short not in ("self_attn.q_proj", "self_attn.k_proj"):
        return None
    s = layout.layers[_kept_layers(layout)[block]]
    if not s.has_attention:
        return None
    return s.num_heads if short == "self_attn.q_proj" else s.num_kv_heads
