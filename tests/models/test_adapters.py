import pytest
import torch

from secateur.engine.capture import call_layer, capture_layer_inputs
from secateur.errors import SecateurError
from secateur.models import adapter_for, supported_model_types
from tests.tiny_models import VOCAB, configs, tiny_model

FAMILIES = list(configs())


@pytest.mark.parametrize("family", FAMILIES)
def test_linears_have_out_in_shapes(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    shape = adapter.attention_shape()
    layer = adapter.layers[0]
    linears = adapter.linears(layer)
    hidden = model.config.hidden_size
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    attn_in = adapter.attention_inputs(layer)
    if len(attn_in) == 3:
        assert [p.weight.shape for p in attn_in] == [
            (q_width, hidden), (kv_width, hidden), (kv_width, hidden)]
    else:  # fused q/k/v
        assert attn_in[0].weight.shape == (q_width + 2 * kv_width, hidden)
    assert adapter.attention_output(layer).weight.shape == (hidden, q_width)
    inter = adapter.mlp_output(layer).in_features
    for p in adapter.mlp_inputs(layer):
        assert p.weight.shape == (inter, hidden)
    assert adapter.mlp_output(layer).weight.shape == (hidden, inter)
    assert len(linears) == len(attn_in) + 1 + len(adapter.mlp_inputs(layer)) + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_view_writes_through(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    proj = adapter.attention_output(adapter.layers[0])
    proj.weight[0, 1] = 123.0
    raw = proj.module.weight
    assert (raw[1, 0] if proj.transposed else raw[0, 1]).item() == 123.0


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_reproduces_logits(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        captured = capture_layer_inputs(model, adapter, [ids])
        hidden = captured.hidden[0]
        for layer, call in zip(adapter.layers, captured.calls, strict=True):
            hidden = call_layer(layer, hidden, call)
        logits = adapter.logits_from_hidden(hidden)
    assert (logits - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_fused_qkv_rows_select_the_right_head(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    seen = set()
    shape = adapter.attention_shape()
    for head in range(shape.num_heads):
        for kind in "qkv":
            proj, rows = adapter.qkv_rows(layer, head, kind)
            seen.update(rows.tolist())
    assert seen == set(range(adapter.attention_inputs(layer)[0].out_features))


def test_unknown_architecture_names_supported_ones():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=50))
    with pytest.raises(SecateurError, match="unsupported architecture 'bert'.*llama"):
        adapter_for(model)
    assert "gpt2" in supported_model_types()
