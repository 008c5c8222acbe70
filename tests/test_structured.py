"""Width pruning (llm-pruner), its surgery, and secateur's per-layer-width model class."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from secateur.surgery.flexmodel import LayerSpec, SecateurLlamaForCausalLM, convert_llama
from tests.tiny_models import tiny_model

# Runs a saved model in a fresh interpreter that cannot import secateur: the repo, the
# editable-install finder and the current directory are all taken off the import path.
_NO_SECATEUR = textwrap.dedent("""
    import importlib.util, json, sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                     and "editable" not in str(f).lower()]
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith({repo!r})
                or "site-packages" in p]
    sys.path_hooks = [h for h in sys.path_hooks if "editable" not in str(h).lower()]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("secateur") is None, "secateur is still importable"
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({path!r}, trust_remote_code=True)
    ids = torch.tensor({ids})
    with torch.no_grad():
        logits = model(ids).logits
    print(json.dumps({{"cls": type(model).__name__, "logits": logits[0, -1].tolist(),
                      "secateur": [m for m in sys.modules if m.startswith("secateur")]}}))
""")


def run_without_secateur(path, ids: torch.Tensor, cwd) -> dict:
    import secateur

    repo = str(__import__("pathlib").Path(secateur.__file__).resolve().parents[1])
    code = _NO_SECATEUR.format(repo=repo, path=str(path), ids=ids.tolist())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flex_convert_keeps_outputs_and_drops_blocks(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids = torch.randint(0, 250, (1, 10))
    with torch.no_grad():
        dense = model(ids).logits
        flex = convert_llama(copy.deepcopy(model))
        assert isinstance(flex, SecateurLlamaForCausalLM)
        assert torch.equal(flex(ids).logits, dense)
        cut = convert_llama(copy.deepcopy(model), [LayerSpec(has_attention=False),
                                                   LayerSpec(has_mlp=False), LayerSpec()])
        assert cut.config.layer_has_attention == [False, True, True]
        assert cut.config.layer_has_mlp == [True, False, True]
        assert cut.model.layers[0].self_attn is None
        # Layer 0 has no attention: KV cache numbering must still give cached == uncached.
        gen = cut.generate(ids, max_new_tokens=4, do_sample=False)
        x = ids
        for _ in range(4):
            x = torch.cat([x, cut(x, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(gen, x)
    with pytest.raises(ValueError, match="shrink the tensors first"):
        convert_llama(copy.deepcopy(model), [LayerSpec(num_heads=2)] * 3)


def test_flex_saves_and_loads_without_secateur(tmp_path):
    torch.manual_seed(0)
    model = convert_llama(tiny_model("llama"), [LayerSpec(has_attention=False), LayerSpec(),
                                                LayerSpec(has_mlp=False)])
    ids = torch.randint(0, 250, (1, 9))
    with torch.no_grad():
        want = model(ids).logits[0, -1]
    out = tmp_path / "flex"
    model.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "secateur_llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_secateur.SecateurLlamaForCausalLM"
    assert (out / "modeling_secateur.py").is_file()
    assert (out / "configuration_secateur.py").is_file()
    got = run_without_secateur(out, ids, tmp_path)
    assert got["cls"] == "SecateurLlamaForCausalLM" and got["secateur"] == []
    assert torch.allclose(torch.tensor(got["logits"]), want, atol=1e-5)
