"""Exports for other runtimes: Nemotron-NAS (vLLM's DeciLM) and GGUF (llama.cpp).

Each exported file is read back with the format's own reader (gguf.GGUFReader, the config via
transformers' remote-code path, safetensors) and run by a small forward pass written here
from the runtime's rules, not from secateur's: vLLM's DeciLM decoder layer (block_configs,
ffn_mult rounding, no-op branches) and llama.cpp's `llama`/`deci` graphs (interleaved rotary
pairs, head_count 0 = no attention, a 0-wide FFN skips the whole layer). Their logits must
equal secateur's own model's.
"""

from __future__ import annotations

import ast
import json
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from secateur.errors import SecateurError
from secateur.formats.export import export
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.formats.nemotron_nas import ffn_mult_for
from secateur.models import adapter_for
from secateur.surgery.depth import Block, remove_blocks
from secateur.surgery.width import rewrite_config, shrink_layer
from tests.tiny_models import save_tiny

HIDDEN, HEAD_DIM, FFN = 64, 16, 512  # FFN a multiple of 256, so DeciLM's ffn_mult can say it


pytestmark = pytest.mark.usefixtures("one_thread")


def bpe_tokenizer():
    """Byte-level BPE with two merges: llama.cpp's gpt2 tokenizer needs merges in the file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": 256, "</s>": 257, "Ġt": 258, "th": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("t", "h")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=260, hidden_size=HIDDEN, intermediate_size=FFN,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=HEAD_DIM, max_position_embeddings=128, bos_token_id=256,
                      eos_token_id=257, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def mask(n: int, drop: list[int] | range) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[list(drop)] = True
    return m


def shrink(model, layer: int, kv_groups: list[int] = (), channels: int = 0):
    """secateur's width surgery on one layer: drop KV groups and the last `channels`."""
    adapter = adapter_for(model)
    heads = mask(adapter.layer_attention_shape(layer).num_kv_heads, kv_groups) if kv_groups \
        else None
    width = adapter.mlp_output(adapter.layers[layer]).in_features
    chans = mask(width, range(width - channels, width)) if channels else None
    shrink_layer(adapter, layer, heads, chans)


def save(model, path):
    save_model(model, bpe_tokenizer(), path)
    return path


@pytest.fixture
def stock_dir(tmp_path):
    return save(tiny_llama(), tmp_path / "stock")


@pytest.fixture
def deci_dir(tmp_path):
    """Widths DeciLM can say: MLPs of 256 in layers 1 and 3; layer 2 without attention,
    layer 0 without MLP."""
    model = tiny_llama(1)
    shrink(model, 1, channels=256)
    shrink(model, 3, channels=256)
    rewrite_config(model, adapter_for(model))
    remove_blocks(model, adapter_for(model), [Block(2, "attn"), Block(0, "mlp")])
    return save(model, tmp_path / "deci")


@pytest.fixture
def gguf_only_dir(tmp_path):
    """Widths only GGUF's deci can say: layer 1 with 2 of 4 query heads, a 320-wide MLP;
    and the two cases llama.cpp needs stand-ins for (layer 0 without attention, layer 2 with
    attention but without MLP)."""
    model = tiny_llama(2, tied=True)
    shrink(model, 1, kv_groups=[0], channels=192)
    rewrite_config(model, adapter_for(model))
    remove_blocks(model, adapter_for(model), [Block(0, "attn"), Block(2, "mlp")])
    return save(model, tmp_path / "gguf-only")


IDS = torch.tensor([[256, 72, 101, 258, 108, 259, 32, 119, 111, 114, 108, 100]])


def secateur_logits(path) -> torch.Tensor:
    with torch.no_grad():
        return load(path).model(IDS).logits[0].float()


# -- reference forward passes, written from the runtimes' rules -------------------------------
def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x, theta, interleaved):
    """Rotary embedding on (seq, heads, hd): llama.cpp's consecutive pairs or HF's halves."""
    seq, _, hd = x.shape
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = ang.cos()[:, None].float(), ang.sin()[:, None].float()
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :hd // 2], x[..., hd // 2:])
    ra, rb = a * cos - b * sin, a * sin + b * cos
    return torch.stack([ra, rb], -1).flatten(-2) if interleaved else torch.cat([ra, rb], -1)


def attention(x, wq, wk, wv, wo, heads, kv, hd, theta, interleaved):
    seq = x.shape[0]
    q = rotate((x @ wq.T).view(seq, heads, hd), theta, interleaved)
    k = rotate((x @ wk.T).view(seq, kv, hd), theta, interleaved)
    v = (x @ wv.T).view(seq, kv, hd)
    rep = heads // kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / hd**0.5
    scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, heads * hd)
    return out @ wo.T


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def ffn_mult_to_intermediate_size(ffn_mult: float, n_embd: int) -> int:
    """vLLM nemotron_nas.py's rule, restated."""
    size = int(2 * ffn_mult * n_embd / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def decilm_expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The parameters vLLM's DeciLMDecoderLayer builds for these block_configs."""
    h, hd, heads = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i, b in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not b["attention"]["no_op"]:
            kv = heads // b["attention"]["n_heads_in_group"]
            shapes.update({p + "input_layernorm.weight": (h,),
                           p + "self_attn.q_proj.weight": (heads * hd, h),
                           p + "self_attn.k_proj.weight": (kv * hd, h),
                           p + "self_attn.v_proj.weight": (kv * hd, h),
                           p + "self_attn.o_proj.weight": (h, heads * hd)})
        if not b["ffn"]["no_op"]:
            inter = ffn_mult_to_intermediate_size(round(b["ffn"]["ffn_mult"], 6), h)
            shapes.update({p + "post_attention_layernorm.weight": (h,),
                           p + "mlp.gate_proj.weight": (inter, h),
                           p + "mlp.up_proj.weight": (inter, h),
                           p + "mlp.down_proj.weight": (h, inter)})
    return shapes


def decilm_logits(folder) -> torch.Tensor:
    """vLLM's DeciLM forward: per layer, attention unless no_op, then FFN unless no_op."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
    eps, hd, heads = cfg["rms_norm_eps"], cfg["head_dim"], cfg["num_attention_heads"]
    x = w["model.embed_tokens.weight"][IDS[0]]
    for i, b in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."
        if not b["attention"]["no_op"]:
            kv = heads // b["attention"]["n_heads_in_group"]
            x = x + attention(rms(x, w[p + "input_layernorm.weight"], eps),
                              *(w[p + f"self_attn.{n}_proj.weight"] for n in "qkvo"),
                              heads, kv, hd, cfg["rope_theta"], interleaved=False)
        if not b["ffn"]["no_op"]:
            x = x + swiglu(rms(x, w[p + "post_attention_layernorm.weight"], eps),
                           *(w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")))
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return rms(x, w["model.norm.weight"], eps) @ head.T


def field(reader, key):
    return reader.fields[key].contents()


def per_layer(value, n: int) -> list[int]:
    return list(value) if isinstance(value, list) else [value] * n


def gguf_logits(path, ffns: list[int] | None = None) -> torch.Tensor:
    """llama.cpp's llama/deci graph (src/models/deci.cpp), f32 weights; `ffns` overrides the
    file's feed_forward_length."""
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    n = field(r, f"{arch}.block_count")
    heads = per_layer(field(r, f"{arch}.attention.head_count"), n)
    kvs = per_layer(field(r, f"{arch}.attention.head_count_kv"), n)
    ffns = ffns or per_layer(field(r, f"{arch}.feed_forward_length"), n)
    hd = field(r, f"{arch}.attention.key_length")
    eps = field(r, f"{arch}.attention.layer_norm_rms_epsilon")
    theta = field(r, f"{arch}.rope.freq_base")
    w = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in r.tensors}
    x = w["token_embd.weight"][IDS[0]]
    for il in range(n):
        p = f"blk.{il}."
        inp_sa = x
        cur = x if heads[il] == 0 else rms(x, w[p + "attn_norm.weight"], eps)
        if heads[il] > 0:
            cur = attention(cur, *(w[p + f"attn_{k}.weight"] for k in ("q", "k", "v", "output")),
                            heads[il], kvs[il], hd, theta, interleaved=True)
        if ffns[il] == 0:
            continue  # llama.cpp skips the rest of the layer, residual included
        ffn_inp = cur + inp_sa if heads[il] > 0 else cur
        x = ffn_inp + swiglu(rms(ffn_inp, w[p + "ffn_norm.weight"], eps),
                             *(w[p + f"ffn_{k}.weight"] for k in ("gate", "up", "down")))
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"], eps) @ head.T


def gguf_tensor_shapes(path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in (out, in) order, as transformers writes them."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
            for t in gguf.GGUFReader(path).tensors}


# -- GGUF --------------------------------------------------------------------------------------
def test_stock_model_is_a_llama_gguf_with_its_tokenizer(stock_dir, tmp_path):
    out = tmp_path / "m.gguf"
    result = export(stock_dir, "gguf", out, outtype="f32")
    assert result["architecture"] == "llama" and result["stock_shape"]
    r = gguf.GGUFReader(out)
    assert field(r, "general.architecture") == "llama"
    assert [field(r, f"llama.{k}") for k in ("block_count", "attention.head_count",
                                               "attention.head_count_kv",
                                               "feed_forward_length", "attention.key_length",
                                               "rope.dimension_count", "embedding_length")
            ] == [4, 4, 2, FFN, HEAD_DIM, HEAD_DIM, HIDDEN]
    shapes = gguf_tensor_shapes(out)
    assert len(shapes) == 3 + 4 * 9
    assert shapes["blk.3.attn_k.weight"] == (2 * HEAD_DIM, HIDDEN)
    assert shapes["blk.0.ffn_down.weight"] == (HIDDEN, FFN)
    assert shapes["output.weight"] == shapes["token_embd.weight"] == (260, HIDDEN)
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 260 and tokens[258] == "Ġt" and tokens[256] == "<s>"
    assert field(r, "tokenizer.ggml.merges") == ["Ġ t", "t h"]
    types = field(r, "tokenizer.ggml.token_type")
    assert types[256] == types[257] == gguf.TokenType.CONTROL and types[65] == 1
    assert field(r, "tokenizer.ggml.bos_token_id") == 256
    assert field(r, "tokenizer.ggml.eos_token_id") == 257
    want = secateur_logits(stock_dir)
    assert (gguf_logits(out) - want).abs().max() < 1e-4
    # transformers' own GGUF reader (undoes the q/k permutation, rebuilds the tokenizer) agrees
    again = load(out)
    with torch.no_grad():
        assert (again.model(IDS).logits[0] - want).abs().max() < 1e-5
    text = "the cat sat on the mat"
    assert again.tokenizer(text).input_ids == bpe_tokenizer()(text).input_ids


def test_heterogeneous_model_is_a_deci_gguf_with_stand_ins(gguf_only_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert export(gguf_only_dir, "gguf", out, outtype="f32")["architecture"] == "deci"
    r = gguf.GGUFReader(out)
    assert field(r, "general.architecture") == "deci"
    # layer 0: attention removed -> a one-head zero stand-in (llama.cpp reads head size there)
    # layer 1: 2 query heads over 1 KV head, 320 channels; layer 2: MLP removed -> 1 channel
    assert field(r, "deci.attention.head_count") == [1, 2, 4, 4]
    assert field(r, "deci.attention.head_count_kv") == [1, 1, 2, 2]
    assert field(r, "deci.feed_forward_length") == [FFN, 320, 1, FFN]
    shapes = gguf_tensor_shapes(out)
    assert "output.weight" not in shapes  # tied: llama.cpp reuses token_embd
    assert shapes["blk.0.attn_q.weight"] == (HEAD_DIM, HIDDEN)
    assert shapes["blk.1.attn_q.weight"] == (2 * HEAD_DIM, HIDDEN)
    assert shapes["blk.1.attn_k.weight"] == (HEAD_DIM, HIDDEN)
    assert shapes["blk.1.ffn_gate.weight"] == (320, HIDDEN)
    assert shapes["blk.2.ffn_down.weight"] == (HIDDEN, 1)
    tensors = {t.name: np.array(t.data) for t in r.tensors}
    assert not tensors["blk.0.attn_output.weight"].any()
    assert not tensors["blk.2.ffn_down.weight"].any()
    want = secateur_logits(gguf_only_dir)
    assert (gguf_logits(out) - want).abs().max() < 1e-4


def test_without_stand_ins_llama_cpp_would_compute_another_model(gguf_only_dir, tmp_path):
    """The stand-ins are needed: llama.cpp's rule for a 0-wide FFN drops the attention."""
    out = tmp_path / "m.gguf"
    export(gguf_only_dir, "gguf", out, outtype="f32")
    want = secateur_logits(gguf_only_dir)
    assert (gguf_logits(out) - want).abs().max() < 1e-4
    assert (gguf_logits(out, ffns=[FFN, 320, 0, FFN]) - want).abs().max() > 1e-2


@pytest.mark.parametrize("outtype,matrix", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_weight_types(deci_dir, tmp_path, outtype, matrix):
    out = tmp_path / "m.gguf"
    export(deci_dir, "gguf", out, outtype=outtype)
    r = gguf.GGUFReader(out)
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.1.ffn_up.weight"] == kinds["token_embd.weight"] == matrix
    assert kinds["blk.1.ffn_norm.weight"] == "F32"
    assert field(r, "general.file_type") == {"f16": 1, "q8_0": 7}[outtype]
    # the one-channel stand-in MLP of layer 0 is too short for a q8_0 block: f16 instead
    assert kinds["blk.0.ffn_down.weight"] == "F16"
    # dequantized, the weights are still secateur's (q8_0: 8-bit blocks of 32)
    got = {t.name: t for t in r.tensors}["blk.1.ffn_up.weight"]
    want = load(deci_dir).model.model.layers[1].mlp.up_proj.weight.detach().numpy()
    err = np.abs(gguf.quants.dequantize(got.data, got.tensor_type) - want).max()
    assert err < {"f16": 1e-3, "q8_0": 2e-3}[outtype]


# -- Nemotron-NAS ------------------------------------------------------------------------------
def test_nemotron_nas_block_configs_weights_and_logits(deci_dir, tmp_path):
    out = tmp_path / "nas"
    export(deci_dir, "nemotron-nas", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas"
    assert cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["num_attention_heads"] == 4 and cfg["head_dim"] == HEAD_DIM
    blocks = cfg["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True, False]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, 2, None, 2]
    assert [b["ffn"]["no_op"] for b in blocks] == [True, False, False, False]
    assert [b["ffn"]["ffn_mult"] for b in blocks] == [None, 6.0, 12.0, 6.0]
    assert all(not b[k]["replace_with_linear"] for b in blocks for k in ("attention", "ffn"))
    weights = load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == decilm_expected_shapes(cfg)
    want = secateur_logits(deci_dir)
    assert (decilm_logits(out) - want).abs().max() < 1e-4
    # vLLM reads block_configs as objects through the config class saved beside the weights
    remote = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "DeciLMConfig" and remote.model_type == "nemotron-nas"
    assert remote.block_configs[2].attention.no_op
    assert remote.block_configs[1].ffn.ffn_mult == 6.0
    assert remote.block_configs[3].attention.n_heads_in_group == 2


@pytest.mark.reload
def test_nemotron_nas_folder_loads_in_transformers(tmp_path):
    """The folder vLLM reads also runs in transformers through the code saved in it."""
    model = tiny_llama(5)
    remove_blocks(model, adapter_for(model), [Block(0, "attn"), Block(1, "attn"),
                                              Block(2, "mlp")])
    src = save(model, tmp_path / "src")
    out = tmp_path / "nas"
    export(src, "nemotron-nas", out)
    for name in ("configuration_decilm.py", "modeling_decilm.py"):  # travels without secateur
        tree = ast.parse((out / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        assert imported <= {"__future__", "copy", "dataclasses", "typing", "torch",
                            "transformers"}
    # layer 0 lost its attention: vLLM's DeciLM needs an attention before the first MLP, so
    # the export writes one whose weights are zero (one KV head)
    blocks = json.loads((out / "config.json").read_text())["block_configs"]
    assert blocks[0]["attention"] == {"no_op": False, "replace_with_linear": False,
                                      "n_heads_in_group": 4}
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, False]
    assert [b["ffn"]["no_op"] for b in blocks] == [False, False, True, False]
    weights = load_file(out / "model.safetensors")
    assert not weights["model.layers.0.self_attn.o_proj.weight"].any()
    assert (decilm_logits(out) - secateur_logits(src)).abs().max() < 1e-4
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__name__ == "DeciLMForCausalLM"
    assert remote.model.layers[1].self_attn is None and remote.model.layers[2].mlp is None
    # built by the stock __init__s on a per-layer copy, the modules still read the model's
    # config, where the attention implementation is set after they are built
    blocks = [b for layer in remote.model.layers for b in (layer.self_attn, layer.mlp)
              if b is not None]
    assert len(blocks) == 6 and all(b.config is remote.config for b in blocks)
    with torch.no_grad():
        assert (remote(IDS).logits[0] - secateur_logits(src)).abs().max() < 1e-4
        gen = remote.generate(IDS, max_new_tokens=5, do_sample=False)
        x = IDS
        for _ in range(5):  # layer 1 has no attention: the KV cache must still be right
            x = torch.cat([x, remote(x, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(gen, x)


def test_stock_nemotron_nas_and_tied_embeddings(tmp_path):
    src = save(tiny_llama(3, tied=True), tmp_path / "tied")
    out = tmp_path / "nas"
    export(src, "nemotron-nas", out, outtype="bf16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["torch_dtype"] == "bfloat16"
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert {k: tuple(v.shape) for k, v in weights.items()} == decilm_expected_shapes(cfg)
    assert (decilm_logits(out) - secateur_logits(src)).abs().max() < 0.1  # bf16 weights


@pytest.mark.parametrize("hidden,size,mult", [
    (576, 1536, 4.0), (64, 256, 6.0), (8192, 28672, 5.25), (4096, 11008, 4.03125),
    (576, 1280, 10 / 3), (4096, 11000, None), (64, 320, None)])
def test_ffn_mult_reproduces_exact_widths_or_none(hidden, size, mult):
    got = ffn_mult_for(size, hidden)
    if mult is None:
        assert got is None
    else:
        assert got == pytest.approx(mult, abs=1e-6)
        assert ffn_mult_to_intermediate_size(round(got, 6), hidden) == size


# -- refusals: one line, nothing written -------------------------------------------------------
def test_nemotron_nas_refuses_widths_it_cannot_say(gguf_only_dir, tmp_path):
    out = tmp_path / "nas"
    with pytest.raises(SecateurError, match=r"one query-head count .* \[2, 4\]"):
        export(gguf_only_dir, "nemotron-nas", out)
    assert not out.exists() and not list(tmp_path.glob(".nas*"))


def test_nemotron_nas_refuses_mlp_width_without_ffn_mult(tmp_path):
    model = tiny_llama(4)
    shrink(model, 2, channels=100)
    rewrite_config(model, adapter_for(model))
    src = save(model, tmp_path / "odd")
    with pytest.raises(SecateurError, match="layer 2: MLP width 412 has no DeciLM ffn_mult"):
        export(src, "nemotron-nas", tmp_path / "nas")
    assert not (tmp_path / "nas").exists()


def run_cli(monkeypatch, capsys, *args):
    from secateur.cli import main

    capsys.readouterr()  # what setup printed is not the command's
    monkeypatch.setattr(sys, "argv", ["secateur", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exports_and_refuses_in_one_line(stock_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m.gguf"
    code, stdout, _ = run_cli(monkeypatch, capsys, "export", stock_dir, "--format", "gguf",
                              "--out", out, "--json", tmp_path / "r.json")
    assert code == 0 and out.is_file() and "llama" in stdout
    assert json.loads((tmp_path / "r.json").read_text())["architecture"] == "llama"
    before = out.stat().st_mtime_ns
    code, _, err = run_cli(monkeypatch, capsys, "export", stock_dir, "--format", "gguf",
                           "--out", out)
    assert code == 2 and "already exists: pass --overwrite" in err
    assert len(err.strip().splitlines()) == 1 and out.stat().st_mtime_ns == before
    code, _, err = run_cli(monkeypatch, capsys, "export", stock_dir, "--format", "onnx",
                           "--out", tmp_path / "x")
    assert code == 2 and "--format is one of nemotron-nas, gguf" in err


@pytest.mark.parametrize("family,message", [
    ("qwen2", "is not Llama-shaped: it has 'model.layers.0.self_attn.k_proj.bias'"),
    ("opt", "is not Llama-shaped"), ("gpt2", "is not Llama-shaped")])
def test_cli_refuses_other_families(tmp_path, monkeypatch, capsys, family, message):
    src = save_tiny(family, tmp_path / family)
    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("nemotron-nas", tmp_path / "nas")):
        code, _, err = run_cli(monkeypatch, capsys, "export", src, "--format", fmt,
                               "--out", out)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0]
        assert not out.exists()
