"""llama.cpp block buffers beside a checkpoint: back as they were, the same GGUF bytes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from secateur.api import quantize
from secateur.errors import SecateurError
from secateur.formats.export import export_model
from secateur.formats.ggml_blocks import FILE
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.methods.gguf import GGUFConfig
from secateur.quant.ggml import ggml_scheme, ggml_states
from tests.formats.test_export import bpe_tokenizer, tiny_llama


def gguf_sha(model, tokenizer, path) -> str:
    export_model(model, tokenizer, "gguf", path, outtype="q4_k_m",
                 quantized=ggml_states(model), has_imatrix=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.usefixtures("one_thread")
def test_a_checkpoint_brings_the_blocks_back_and_a_plain_save_has_none(tmp_path):
    model, tokenizer = tiny_llama(0), bpe_tokenizer()
    windows = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    quantize(model, GGUFConfig(preset="q4_k_m"), windows, progress=False)
    want = gguf_sha(model, tokenizer, tmp_path / "a.gguf")
    save_model(model, tokenizer, tmp_path / "plain")
    save_model(model, tokenizer, tmp_path / "ckpt", own_state=True)
    assert not (tmp_path / "plain" / FILE).exists() and (tmp_path / "ckpt" / FILE).is_file()
    assert not ggml_states(load(tmp_path / "plain").model)
    again = load(tmp_path / "ckpt")
    states, before = ggml_states(again.model), ggml_states(model)
    assert set(states) == set(before) and len(states) == 4 * 7
    for name, st in before.items():
        got = states[name]
        assert got.type == st.type and got.imatrix_tokens == st.imatrix_tokens
        assert torch.equal(got.codes, st.codes) and torch.equal(got.s, st.s)
        assert torch.equal(got.imatrix, st.imatrix)
        assert got.fields.keys() == st.fields.keys()
    module = again.model.get_submodule("model.layers.1.mlp.down_proj")
    assert ggml_scheme(module) == ggml_scheme(model.get_submodule("model.layers.1.mlp.down_proj"))
    assert gguf_sha(again.model, again.tokenizer, tmp_path / "b.gguf") == want


def test_blocks_that_do_not_fit_the_model_are_refused_in_one_line(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, tokenizer = tiny_llama(0), bpe_tokenizer()
    windows = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))]
    quantize(model, GGUFConfig(preset="q4_0", rounding="rtn", sequential=False), windows,
             progress=False)
    save_model(model, tokenizer, tmp_path / "ckpt", own_state=True)
    path = tmp_path / "ckpt" / FILE
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(SecateurError, match="does not fit the model beside it"):
        load(tmp_path / "ckpt")
    path.write_bytes(b"not safetensors")
    with pytest.raises(SecateurError, match="is damaged"):
        load(tmp_path / "ckpt")
