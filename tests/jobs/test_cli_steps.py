"""CLI paths that wire the engine's resume and streaming into `secateur prune`/`quantize`."""

from __future__ import annotations

import json

import torch

from secateur.formats.loader import load
from tests.jobs.test_loading_and_cli import run_cli

FLAGS = ["--calib", "c4-sample", "--nsamples", "2", "--seqlen", "32", "--eval", "none"]


def test_stream_writes_a_model_equal_to_the_in_memory_prune(tiny_dir, tmp_path, monkeypatch,
                                                          capsys):
    src = tiny_dir("llama")
    code, _, err = run_cli(monkeypatch, capsys, "prune", src, "--method", "wanda", "--sparsity",
                           "0.5", *FLAGS, "--stream", "--out", tmp_path / "s", "--json",
                           tmp_path / "s.json")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "prune", src, "--method", "wanda", "--sparsity",
                           "0.5", *FLAGS, "--out", tmp_path / "m")
    assert code == 0, err
    streamed, whole = load(tmp_path / "s").model, load(tmp_path / "m").model
    for (name, a), b in zip(streamed.state_dict().items(), whole.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["streamed"] and record["peak_rss_mib"] > 0 and record["model_mib"] > 0
    assert not (tmp_path / "s" / ".secateur-work").exists()  # its checkpoint went with it


def test_prune_leaves_no_checkpoint_and_quantize_saves_packed(tiny_dir, tmp_path, monkeypatch,
                                                              capsys):
    src = tiny_dir("llama")
    code, _, err = run_cli(monkeypatch, capsys, "quantize", src, "--method", "rtn", "--bits",
                           "4", "--group-size", "32", *FLAGS, "--out", tmp_path / "q",
                           "--resume")
    assert code == 0, err
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert not (tmp_path / "q" / ".secateur-work").exists()
