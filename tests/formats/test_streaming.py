"""Streaming a model from safetensors with one decoder layer resident gives the same prune.

Run as a module (`python -m tests.formats.test_streaming MODEL_DIR OUT RESULT.json`) it is
the worker of the memory test: it loads the model's skeleton, caps its data segment
(RLIMIT_DATA: the private writable memory torch's tensors live in) at what it holds then plus
a budget far below the model's size, streams a Wanda prune, and writes the result.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def _windows(n: int = 4, seqlen: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (1, seqlen), generator=g) for _ in range(n)]


def _in_memory(model_dir: Path, config, calib):
    """The reference: the same method on the whole model in memory."""
    from transformers import AutoModelForCausalLM

    from secateur.engine.sequential import collect_layer_stats, prune_layerwise
    from secateur.methods import PruneContext, build_method
    from secateur.models import adapter_for

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    adapter, method = adapter_for(model), build_method(config)
    context = PruneContext(
        model=model, tokenizer=None, adapter=adapter, calibration=calib, seed=0, progress=False,
        layerwise_stats=lambda needs, on_layer: collect_layer_stats(
            model, adapter, calib, needs, on_layer, False))
    method.prepare(model, adapter, context)
    reports = prune_layerwise(model, adapter, method, calib, progress=False)
    return model, reports, method


def _streamed(model_dir: Path, out: Path, config, calib, **kw):
    from secateur.engine.streamed import prune_streamed
    from secateur.formats.streaming import load_streamed
    from secateur.methods import build_method

    loaded, weights = load_streamed(model_dir)
    return prune_streamed(loaded, weights, build_method(config), calib, out, progress=False,
                          **kw)


def _same_weights(a, b) -> None:
    from secateur.quant.state import weights_state_dict

    # an in-memory prune also holds its pruning masks, which no saved model does
    sa, sb = weights_state_dict(a), weights_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt", "gpt2", "gpt_neox"])
def test_streamed_prune_equals_in_memory_prune(family, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from secateur.methods import WandaConfig
    from secateur.methods.sparsity import OWLConfig

    model_dir = tiny_dir(family)
    config, calib = WandaConfig(sparsity=0.5, owl=OWLConfig(m=3.0)), _windows()
    reference, ref_reports, ref_method = _in_memory(model_dir, config, calib)
    out = tmp_path / "pruned"
    result = _streamed(model_dir, out, config, calib)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    _same_weights(reloaded, reference)  # masks, kept weights, embeddings, a tied head
    assert result.layers == [asdict(r) for r in ref_reports]
    assert result.summary == ref_method.summary()  # OWL's ratios came from a streamed pass
    assert (out / "tokenizer.json").is_file() and not list(tmp_path.glob(".pruned*"))
    ids = calib[0]
    assert torch.equal(reloaded(ids).logits, reference(ids).logits)


def test_streamed_prune_resumes_from_a_checkpoint(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from secateur.formats.streaming import StreamedWeights
    from secateur.methods import SparseGPTConfig

    model_dir, calib = tiny_dir("llama"), _windows()
    config = SparseGPTConfig(sparsity=0.5)
    reference, _, _ = _in_memory(model_dir, config, calib)
    out, ckpt = tmp_path / "pruned", tmp_path / "ckpt"

    def stop(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _streamed(model_dir, out, config, calib, checkpoint=ckpt, on_layer_done=stop)
    assert not out.exists() and (ckpt / "checkpoint.json").is_file()
    ran: list[int] = []

    def interrupted(self, tokenizer=None):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # then interrupted while assembling the output
        m.setattr(StreamedWeights, "finish", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _streamed(model_dir, out, config, calib, checkpoint=ckpt, on_layer_done=ran.append)
    assert ran == [2]  # layers 0 and 1 came from the checkpoint
    assert not out.exists() and json.loads((ckpt / "checkpoint.json").read_text())["done"] == 3
    _streamed(model_dir, out, config, calib, checkpoint=ckpt, on_layer_done=ran.append)
    assert ran == [2]  # nothing left to prune: the output is assembled from the checkpoint
    _same_weights(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), reference)
    assert not ckpt.exists()


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("group_size", [-1, 32])
def test_streamed_gptq_is_saved_packed_as_in_memory(group_size, tiny_dir, tmp_path):
    """A streamed quantization writes compressed-tensors packed layers and config, the same
    tensors and quantization_config that save_packed writes of the model quantized in memory
    (save_packed's embeddings in the model's dtype here, as streaming copies them)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from secateur.engine.streamed import prune_streamed
    from secateur.formats.packed_save import save_packed
    from secateur.formats.streaming import load_streamed
    from secateur.methods import build_method
    from secateur.methods.gptq import GPTQConfig
    from secateur.quant.state import quant_state

    model_dir, calib = tiny_dir("llama"), _windows()
    config = GPTQConfig(bits=4, group_size=group_size)
    reference, ref_reports, _ = _in_memory(model_dir, config, calib)
    ref_dir = save_packed(reference, None, tmp_path / "ref", keep_dtype=None)
    out = tmp_path / "streamed"
    loaded, weights = load_streamed(model_dir)
    result = prune_streamed(loaded, weights, build_method(config), calib, out, progress=False,
                            checkpoint=tmp_path / "ckpt")
    assert result.layers == [asdict(r) for r in ref_reports]
    ref, got = _all_tensors(ref_dir), _all_tensors(out)
    assert got.keys() == ref.keys()
    assert any(k.endswith(".weight_packed") for k in got)
    assert not any(k.endswith("proj.weight") for k in got)  # no dense copy beside the codes
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant == json.loads((ref_dir / "config.json").read_text())["quantization_config"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers reads it back
    ref_loaded = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    assert torch.equal(loaded(calib[0]).logits, ref_loaded(calib[0]).logits)
    # the grids went out with their layers: none is left on the meta model
    assert not any(quant_state(m) is not None for m in loaded.model.modules())


def test_streamed_quantization_refuses_to_resume(tiny_dir, tmp_path):
    from secateur.errors import SecateurError
    from secateur.methods.rtn import RTNConfig

    model_dir, calib = tiny_dir("llama"), _windows()
    out, ckpt = tmp_path / "streamed", tmp_path / "ckpt"

    def stop(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _streamed(model_dir, out, RTNConfig(bits=4, group_size=-1), calib, checkpoint=ckpt,
                  on_layer_done=stop)
    with pytest.raises(SecateurError, match="cannot resume"):
        _streamed(model_dir, out, RTNConfig(bits=4, group_size=-1), calib, checkpoint=ckpt)


def test_streaming_refuses_what_it_cannot_read(tiny_dir, tmp_path):
    from secateur.errors import SecateurError
    from secateur.formats.streaming import load_streamed

    with pytest.raises(SecateurError, match="not a local model folder"):
        load_streamed(tmp_path)
    model_dir = tiny_dir("llama")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SecateurError, match="not a readable safetensors file"):
        load_streamed(model_dir)
    weights.unlink()
    with pytest.raises(SecateurError, match="no safetensors weights"):
        load_streamed(model_dir)


# -- bigger than the memory the process may use ------------------------------------------------

# About 690 MB in fp32, nearly all of it in 60 decoder layers of 11.5 MB: far more than the
# interpreter, torch and transformers (about 460 MB resident) plus one layer and its working
# memory, while the whole test reads and writes the model only a few times.
BIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=60,
           num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
BUDGET = 224 * MIB  # what the prune may allocate beyond what loading the skeleton left


def _big_model_dir(path: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.tiny_models import _common, byte_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_common(**BIG)), dtype=torch.float32)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_prune_a_model_bigger_than_the_process_memory_cap(tmp_path):
    from transformers import AutoModelForCausalLM

    from secateur.methods import WandaConfig

    model_dir = _big_model_dir(tmp_path / "big")
    model_bytes = (model_dir / "model.safetensors").stat().st_size
    out, result_file = tmp_path / "pruned", tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, "-m", "tests.formats.test_streaming", str(model_dir), str(out),
         str(result_file)], cwd=ROOT,
        # one malloc arena: a thread's first allocation otherwise opens an arena of its own,
        # and which threads allocate first depends on timing, so the cap's margin did too
        # (one suite run in many was refused 3 MiB near the cap)
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"},
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(result_file.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    # The prune ran under a data-segment cap of what loading left plus BUDGET, and the
    # process's resident peak (interpreter and libraries included) stayed below the model.
    assert result["rlimit_data"] == result["data_before_mib"] * MIB + BUDGET < model_bytes
    assert result["cap_refused_the_model"]
    assert result["peak_rss_mib"] * MIB < model_bytes
    assert result["model_mib"] * MIB == pytest.approx(model_bytes, rel=0.01)
    assert result["rest_mib"] < 2  # only the embeddings, head and norm were loaded up front

    reference, _, _ = _in_memory(model_dir, WandaConfig(nm="2:4"), _windows(2, 64))
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = reference.state_dict()
    checked = 0
    for name, p in pruned.state_dict().items():
        assert torch.equal(p, ref[name]), name
        if p.dim() == 2 and ".layers." in name:
            assert (p == 0).float().mean().item() == 0.5, name
            checked += 1
    assert checked == 7 * BIG["num_hidden_layers"]


def _data_bytes() -> int:
    """VmData: the private writable memory that RLIMIT_DATA limits."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmData:")[1].split()[0]) * 1024


def _worker(model_dir: str, out: str, result_file: str) -> None:
    from secateur.engine.streamed import prune_streamed
    from secateur.formats.streaming import load_streamed
    from secateur.methods import WandaConfig, build_method

    torch.set_num_threads(1)
    loaded, weights = load_streamed(model_dir)
    before = _data_bytes()
    resource.setrlimit(resource.RLIMIT_DATA, (before + BUDGET, before + BUDGET))
    result = prune_streamed(loaded, weights, build_method(WandaConfig(nm="2:4")),
                            _windows(2, 64), Path(out), progress=False)
    record = result.to_dict()
    try:  # the cap is real: the whole model's worth of memory is refused
        torch.empty(int(result.model_mib * MIB), dtype=torch.uint8)
        record["cap_refused_the_model"] = False
    except RuntimeError:
        record["cap_refused_the_model"] = True
    record["data_before_mib"] = before / MIB
    record["rlimit_data"] = resource.getrlimit(resource.RLIMIT_DATA)[0]
    Path(result_file).write_text(json.dumps(record))


if __name__ == "__main__":
    _worker(*sys.argv[1:])
