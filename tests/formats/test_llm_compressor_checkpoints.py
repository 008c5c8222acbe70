"""Checkpoints written by compressed-tensors itself (as llm-compressor writes them) load in
every secateur command, dense, with the weights compressed-tensors' own decompression gives."""

from __future__ import annotations

import json

import pytest
import torch

from secateur.errors import SecateurError
from secateur.formats.loader import load
from tests.ct_checkpoints import write_ct_checkpoint
from tests.jobs.test_loading_and_cli import run_cli

# every integer scheme vLLM runs: W4A16/W8A16 by group and channel, symmetric or not; W8A8
SCHEMES = {
    "w4-asym-g64": dict(bits=4, symmetric=False, group=64),
    "w4-sym-g32": dict(bits=4, symmetric=True, group=32),
    "w4-asym-channel": dict(bits=4, symmetric=False, group=None),
    "w8-sym-channel": dict(bits=8, symmetric=True, group=None),
    "w8-asym-g64": dict(bits=8, symmetric=False, group=64),
    "w8a8": dict(bits=8, symmetric=True, group=None, activations=True),
    # not read by secateur's reader: transformers dequantizes it at load
    "fp8-channel": dict(bits=8, symmetric=True, group=None, kind="float"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    return {name: write_ct_checkpoint(root / name, **kw) for name, kw in SCHEMES.items()}


def _reference_weights(path) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompression, through transformers' dequantize-at-load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    config.quantization_config = {**config.quantization_config, "dequantize": True}
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    return {k: v for k, v in model.state_dict().items() if k.endswith("proj.weight")}


@pytest.mark.parametrize("name", list(SCHEMES))
def test_loads_dense_with_compressed_tensors_own_weights(checkpoints, name):
    from secateur.quant.state import is_quantized

    loaded = load(checkpoints[name])
    assert not is_quantized(loaded.model)  # a plain dense model, as every command takes
    got = loaded.model.state_dict()
    want = _reference_weights(checkpoints[name])
    assert len(want) == 3 * 7
    for key, weight in want.items():
        torch.testing.assert_close(got[key], weight, rtol=1e-5, atol=1e-6)


def test_eval_of_asymmetric_g64_matches_the_int4_runtime(checkpoints, tmp_path, monkeypatch,
                                                         capsys):
    from secateur.jobs import EvalSpec, evaluate_perplexity

    path = checkpoints["w4-asym-g64"]
    code, _, err = run_cli(monkeypatch, capsys, "eval", path, "--data", "wiki", "--seqlen",
                           "64", "--max-windows", "4", "--json", tmp_path / "e.json")
    assert code == 0, err
    got = json.loads((tmp_path / "e.json").read_text())["perplexity"]
    spec = EvalSpec(data="wiki", seqlen=64, max_windows=4)
    want = evaluate_perplexity(load(path, runtime="int4"), spec, progress=False).perplexity
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("command", [
    ["prune", "--method", "magnitude", "--sparsity", "0.5", "--eval", "none"],
    ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--calib",
     "c4-sample", "--nsamples", "2", "--seqlen", "32", "--eval", "none"],
    ["recover", "--method", "lora", "--steps", "1", "--seqlen", "16", "--batch-size", "1",
     "--eval", "none"],
])
def test_commands_that_write_a_model_read_it(checkpoints, tmp_path, monkeypatch, capsys,
                                             command):
    out = tmp_path / "m"
    code, _, err = run_cli(monkeypatch, capsys, command[0], checkpoints["w4-asym-g64"],
                           *command[1:], "--out", out)
    assert code == 0, err
    assert out.exists()


def test_export_reads_it(tmp_path, monkeypatch, capsys):
    from tests.formats.test_export import bpe_tokenizer, tiny_llama

    # llama.cpp's tokenizer needs BPE merges, which the byte tokenizer lacks
    path = write_ct_checkpoint(tmp_path / "ct", model=tiny_llama(), tokenizer=bpe_tokenizer())
    code, _, err = run_cli(monkeypatch, capsys, "export", path, "--format", "gguf", "--out",
                           tmp_path / "m.gguf")
    assert code == 0, err


def test_bench_reads_it(checkpoints, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "bench", checkpoints["w4-asym-g64"], "--vs",
                           checkpoints["w8a8"], "--lengths", "8", "--repeats", "1", "--warmup",
                           "0", "--decode-tokens", "2", "--threads", "1", "--json",
                           tmp_path / "b.json")
    assert code == 0, err


def test_shape_mismatch_is_named_not_called_damage(tiny_dir):
    path = tiny_dir("llama")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights say 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SecateurError) as err:
        load(path)
    message = str(err.value)
    assert "damaged" not in message and "\n" not in message
    assert "mlp.down_proj.weight: checkpoint [64, 128] vs model [64, 96]" in message


def test_transformers_refusal_of_packed_zero_points_is_read_back(checkpoints):
    """What transformers' default load reports on llm-compressor's asymmetric files, which
    secateur's message names if that route ever meets them."""
    from transformers import AutoModelForCausalLM

    from secateur.models.load_report import mismatched_shapes

    with pytest.raises(RuntimeError) as err:
        AutoModelForCausalLM.from_pretrained(checkpoints["w4-asym-g64"])
    mismatched = mismatched_shapes(err.value)
    assert mismatched and all(k.endswith("weight_zero_point") for k, _, _ in mismatched)
