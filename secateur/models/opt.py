"""OPT adapter: q/k/v/out projections, fc1/fc2 MLP, an optional project_out after the norm."""

from __future__ import annotations

import torch

from secateur.models.base import ModelAdapter, get_submodule, register_adapter


@register_adapter
class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    embed_path = "model.decoder.embed_tokens"
    final_norm_path = "model.decoder.final_layer_norm"
    attn_in = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_out = "self_attn.out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
    attn_norm = "self_attn_layer_norm"
    mlp_norm = "final_layer_norm"
    # OPT's attention reshapes with its stored head count
    width_attributes = {"self_attn.num_heads": "heads"}

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = super().final_norm(hidden)
        # OPT-350m projects from the hidden width down to the embedding width after the norm.
        project_out = get_submodule(self.model, "model.decoder.project_out")
        return hidden if project_out is None else project_out(hidden)
