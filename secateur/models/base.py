"""The architecture contract: everything that differs between model families lives in an adapter.

Methods and the engine only see decoder layers as opaque modules plus `Projection`s, always as
`(out_features, in_features)` weights, so GPT-2's transposed `Conv1D` never leaks out of here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models import mask as _mask

# model_type of secateur's generic class for pruned models (secateur/surgery/flexmodel/
# modeling_secateur_flex.py); its config names the stock family in `base_model_type`.
FLEX_MODEL_TYPE = "secateur"


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    """`root.get_submodule` that answers None for a missing path instead of raising."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@dataclass
class Projection:
    """One linear map inside a decoder layer, seen as `(out_features, in_features)`."""

    name: str
    module: nn.Module
    transposed: bool = False  # GPT-2 Conv1D keeps its weight as (in, out)

    @property
    def weight(self) -> torch.Tensor:
        """A view sharing storage with the parameter: in-place edits land in the model."""
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def kept(self) -> torch.Tensor | None:
        """True where the weight is kept, as `(out, in)`; None where no mask is recorded
        (`secateur.models.mask`)."""
        keep = _mask.kept_mask(self.module)
        return keep.t() if keep is not None and self.transposed else keep

    def pruned(self) -> torch.Tensor:
        """True where the weight is pruned, as `(out, in)`: the recorded mask, or the exact
        zeros where none is (a weight read from disk, whose files hold no mask)."""
        keep = self.kept()
        return self.weight == 0 if keep is None else ~keep

    def record_pruned(self, pruned: torch.Tensor) -> None:
        """Add `pruned` (`(out, in)`, True = pruned) to the recorded mask."""
        _mask.record_pruned(self.module, pruned.t() if self.transposed else pruned)

    def set_kept(self, keep: torch.Tensor) -> None:
        """Replace the recorded mask with `keep` (`(out, in)`, True = kept)."""
        _mask.set_kept_mask(self.module, keep.t() if self.transposed else keep)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(frozen=True)
class RMSNormSpec:
    """An RMSNorm's weight and epsilon: y = x / sqrt(mean(x^2) + eps) * weight."""

    weight: torch.Tensor
    eps: float


@dataclass(frozen=True)
class DecodeLayout:
    """What a pre-norm, rotary, gated-SiLU decoder layer computes for one new token, in the
    pieces `secateur.runtime.decode` runs without the layer's own forward. An adapter returns
    one only for layers whose math is exactly this (`ModelAdapter.decode_layout`)."""

    attn_norm: RMSNormSpec
    mlp_norm: RMSNormSpec
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    gate: nn.Module
    up: nn.Module
    down: nn.Module
    head_dim: int
    scaling: float
    cache_index: int  # the layer's slot in the KV cache
    q_norm: RMSNormSpec | None = None  # Qwen3: per-head norms before the rotary embedding
    k_norm: RMSNormSpec | None = None
    window: int | None = None  # sliding-window attention: keys this far back at most


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class GroupSet:
    """G coupled structures of one layer, removed together so shapes stay consistent.

    Group g is rows `idx[g]` of every producer in `rows` and input columns `idx[g]` of every
    consumer in `cols` (Torch-Pruning's dependency groups, written down per family).
    `kind` is 'kv-heads' (a KV head with all query heads sharing it), 'query-heads' (one
    query head; `kv_of[g]` is its KV head, so removal can stay even per KV group) or
    'channels' (one MLP channel).
    """

    kind: str
    rows: list[tuple[Projection, torch.Tensor]]
    cols: list[tuple[Projection, torch.Tensor]]
    kv_of: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return (self.rows or self.cols)[0][1].shape[0]

    def parameters_per_group(self) -> int:
        return sum(idx.shape[1] * p.in_features for p, idx in self.rows) + sum(
            idx.shape[1] * p.out_features for p, idx in self.cols)


class ModelAdapter:
    """Accessors for one architecture family, declared by module paths.

    Subclasses set the class attributes; paths inside a layer are relative to that layer.
    `fused_qkv` names a projection holding q, k and v stacked (GPT-2) or interleaved per head
    (GPT-NeoX); width pruning asks the adapter for the rows of each head instead of
    guessing the layout.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str]
    embed_path: ClassVar[str]
    final_norm_path: ClassVar[str]
    lm_head_path: ClassVar[str] = "lm_head"
    # llama.cpp architecture the GGUF writer uses for this family (None: no GGUF export)
    gguf_architecture: ClassVar[str | None] = None
    attn_in: ClassVar[tuple[str, ...]]  # q, k, v (or the fused qkv)
    attn_out: ClassVar[str]
    mlp_in: ClassVar[tuple[str, ...]]  # gate and up, or fc1
    mlp_out: ClassVar[str]
    attn_norm: ClassVar[str]  # the norm feeding the attention block
    mlp_norm: ClassVar[str]  # the norm feeding the MLP block
    # every other norm inside a layer (Gemma 3's sandwich norms, Qwen3's per-head q/k norms);
    # a path that a layer lacks (a family member without it, a removed branch) is skipped
    extra_norms: ClassVar[tuple[str, ...]] = ()
    transposed_weights: ClassVar[bool] = False
    num_layers_key: ClassVar[str] = "num_hidden_layers"
    # capabilities the rest of secateur asks about instead of checking model types
    width_surgery: ClassVar[bool] = True  # knows its head/channel groups (width pruning)
    # the stock config can state uniform widths (it has head_dim, KV heads, MLP width);
    # where head_dim follows from hidden / heads, any width change needs secateur's class
    stock_widths: ClassVar[bool] = False
    bos_policy: ClassVar[str] = "default"  # "each": BOS starts every evaluation window
    # a layer norm's output is x_hat * (norm_weight_offset + weight): Gemma's scale by 1 + w
    norm_weight_offset: ClassVar[float] = 0.0
    # Attributes (paths inside a layer) that a family's attention forward reads and that
    # follow the layer's widths, each with what it holds: "heads", "kv_heads", "groups"
    # (query heads per KV head) or "q_width" (heads * head_dim).
    width_attributes: ClassVar[dict[str, str]] = {}

    @property
    def heterogeneous_class(self) -> bool:
        """The model already IS secateur's generic class."""
        return self.config.model_type == FLEX_MODEL_TYPE

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- whole-model pieces -------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        layers = self.model.get_submodule(self.layers_path)
        assert isinstance(layers, nn.ModuleList)
        return layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_submodule(self.lm_head_path)

    def norm_modules(self) -> list[nn.Module]:
        """Every normalisation layer of the model: each decoder layer's, then the final one."""
        paths = (self.attn_norm, self.mlp_norm, *self.extra_norms)
        found = [get_submodule(layer, path) for layer in self.layers
                 for path in dict.fromkeys(paths)]
        found.append(get_submodule(self.model, self.final_norm_path))
        return list({id(m): m for m in found if m is not None}.values())

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = get_submodule(self.model, self.final_norm_path)
        return hidden if norm is None else norm(hidden)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model does after its last decoder layer: final norm, head, any softcap."""
        return self.lm_head(self.final_norm(hidden))

    # -- per-layer pieces ---------------------------------------------------------------
    def _projection(self, layer: nn.Module, path: str) -> Projection:
        return Projection(path, layer.get_submodule(path), self.transposed_weights)

    def attention_inputs(self, layer: nn.Module) -> list[Projection]:
        return [self._projection(layer, p) for p in self.attn_in]

    def attention_output(self, layer: nn.Module) -> Projection:
        return self._projection(layer, self.attn_out)

    def mlp_inputs(self, layer: nn.Module) -> list[Projection]:
        return [self._projection(layer, p) for p in self.mlp_in]

    def mlp_output(self, layer: nn.Module) -> Projection:
        return self._projection(layer, self.mlp_out)

    def linears(self, layer: nn.Module) -> dict[str, Projection]:
        """Every prunable matrix of a layer in execution order, keyed by its path in the layer.

        A removed attention or MLP branch (a weightless stand-in) has none, so it is left out.
        """
        out = {}
        for path in (*self.attn_in, self.attn_out, *self.mlp_in, self.mlp_out):
            module = get_submodule(layer, path)
            if module is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                out[path] = Projection(path, module, self.transposed_weights)
        return out

    def layers_in_memory(self) -> bool:
        """False while the decoder layers are streamed: meta tensors until each is read,
        pruned, written out and dropped (`secateur.formats.streaming`)."""
        return not any(t.is_meta for t in self.layers.parameters())

    def adopt_masks(self) -> bool:
        """Record a pruning mask on every decoder projection in memory that has none
        (`secateur.models.mask.adopt_masks`), so that a method reads and extends recorded masks
        only. Returns whether they were derived from the weights' zeros: true for a model that
        held no mask at all, as one read from disk does."""
        derive = not _mask.has_masks(self.model)
        _mask.adopt_masks((p.module for layer in self.layers
                           for p in self.linears(layer).values()), derive)
        return derive

    def attention_shape(self) -> AttentionShape:
        cfg = self.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return AttentionShape(heads, kv, head_dim)

    def qkv_rows(self, layer: nn.Module, head: int, kind: str) -> tuple[Projection, torch.Tensor]:
        """The projection and output rows that hold query head `head` ('q') or KV head ('k'/'v')."""
        shape = self.attention_shape()
        proj = self.attention_inputs(layer)[{"q": 0, "k": 1, "v": 2}[kind]]
        rows = torch.arange(head * shape.head_dim, (head + 1) * shape.head_dim)
        return proj, rows

    def decode_layout(self, layer: nn.Module) -> DecodeLayout | None:
        """The layer as a `DecodeLayout` for secateur's one-token decode step, or None where
        its math differs (the layer then always runs its own forward)."""
        return None

    # -- width pruning groups ------------------------------------------------------------

    def layer_attention_shape(self, index: int) -> AttentionShape:
        """Layer `index`'s heads, read from its tensors (layers may differ after surgery)."""
        shape = self.attention_shape()
        hd = shape.head_dim
        try:
            projs = self.attention_inputs(self.layers[index])
        except AttributeError:  # the attention branch was removed
            return AttentionShape(0, 0, hd)
        if len(projs) == 1:  # fused q/k/v with one KV head per query head (GPT-2, GPT-NeoX)
            heads = projs[0].out_features // (3 * hd)
            return AttentionShape(heads, heads, hd)
        return AttentionShape(projs[0].out_features // hd, projs[1].out_features // hd, hd)

    def head_groups(self, index: int, mode: str = "kv") -> GroupSet:
        """Attention head groups of layer `index`: mode 'kv' or 'query' (see `GroupSet`)."""
        layer = self.layers[index]
        shape = self.layer_attention_shape(index)
        share = shape.num_heads // shape.num_kv_heads
        o = self.attention_output(layer)
        hd = shape.head_dim

        def stack(kind: str, heads: list[list[int]]) -> tuple[Projection, torch.Tensor]:
            rows = [torch.cat([self.qkv_rows(layer, h, kind)[1] for h in hs]) for hs in heads]
            return self.qkv_rows(layer, heads[0][0], kind)[0], torch.stack(rows)

        def o_cols(heads: list[list[int]]) -> torch.Tensor:
            return torch.stack([torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in hs])
                                for hs in heads])

        if mode == "kv":
            q_heads = [list(range(g * share, (g + 1) * share)) for g in range(shape.num_kv_heads)]
            kv_heads = [[g] for g in range(shape.num_kv_heads)]
            rows = [stack("q", q_heads), stack("k", kv_heads), stack("v", kv_heads)]
            return GroupSet("kv-heads", rows, [(o, o_cols(q_heads))])
        if mode == "query":
            q_heads = [[h] for h in range(shape.num_heads)]
            return GroupSet("query-heads", [stack("q", q_heads)], [(o, o_cols(q_heads))],
                            torch.arange(shape.num_heads) // share)
        raise SecateurError(f"unknown GQA mode '{mode}': use kv or query")

    def mlp_groups(self, index: int) -> GroupSet:
        """MLP channels of layer `index`: rows of gate/up (fc1, c_fc), columns of down (fc2)."""
        layer = self.layers[index]
        out = self.mlp_output(layer)
        idx = torch.arange(out.in_features).unsqueeze(1)
        return GroupSet("channels", [(p, idx) for p in self.mlp_inputs(layer)], [(out, idx)])

    def set_layer_widths(self, index: int, num_heads: int, num_kv_heads: int) -> None:
        """Tell layer `index`'s modules their new head counts after surgery."""
        hd = self.attention_shape().head_dim
        values = {"heads": num_heads, "kv_heads": num_kv_heads,
                  "groups": num_heads // num_kv_heads, "q_width": num_heads * hd}
        layer = self.layers[index]
        for path, what in self.width_attributes.items():
            owner, _, attr = path.rpartition(".")
            module = layer.get_submodule(owner)
            if hasattr(module, attr):
                setattr(module, attr, values[what])

    def set_num_layers(self, n: int) -> None:
        setattr(self.config, self.num_layers_key, n)
        if getattr(self.config, "layer_types", None) is not None:
            self.config.layer_types = list(self.config.layer_types)[:n]


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted([*_REGISTRY, FLEX_MODEL_TYPE])


def adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type == FLEX_MODEL_TYPE:  # secateur's generic class: the stock family's adapter
        model_type = getattr(model.config, "base_model_type", None)
    cls = _REGISTRY.get(model_type or "")
    if cls is None:
        raise SecateurError(
            f"unsupported architecture '{model_type}': secateur has adapters for "
            f"{', '.join(sorted(_REGISTRY))}"
        )
    return cls(model)
