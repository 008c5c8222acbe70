"""The dense perplexity is evaluated once per model and protocol, then read from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secateur import jobs
from secateur.eval import cache
from tests.jobs.test_loading_and_cli import run_cli

QUANTIZE = ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--calib",
            "c4-sample", "--nsamples", "2", "--seqlen", "32", "--eval", "wiki",
            "--eval-windows", "2"]


@pytest.fixture
def counted(monkeypatch):
    """jobs.evaluate_perplexity, counting its calls."""
    calls = []
    real = jobs.evaluate_perplexity

    def count(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "evaluate_perplexity", count)
    return calls


def _quantize(monkeypatch, capsys, tmp_path, src, name, *extra):
    out = tmp_path / f"{name}.json"
    code, _, err = run_cli(monkeypatch, capsys, *QUANTIZE, *extra, src, "--json", out)
    assert code == 0, err
    return json.loads(out.read_text())


def test_second_quantize_reads_the_dense_figure_from_the_cache(tiny_dir, tmp_path, monkeypatch,
                                                               capsys, counted):
    src = tiny_dir("llama")
    first = _quantize(monkeypatch, capsys, tmp_path, src, "first")
    assert len(counted) == 2  # dense and quantized
    assert first["dense_perplexity_source"] == "computed"
    assert "dense_eval_seconds" in first["timings"]
    entry = first["dense_perplexity_cache"]
    assert entry.startswith(str(tmp_path / "perplexity-cache"))

    second = _quantize(monkeypatch, capsys, tmp_path, src, "second")
    assert len(counted) == 3  # only the quantized model this time
    assert second["dense_perplexity_source"] == "cache"
    assert second["dense_perplexity_cache"] == entry
    assert second["dense_perplexity"] == first["dense_perplexity"]
    assert "dense_eval_seconds" not in second["timings"]
    assert second["perplexity"] == first["perplexity"]


def test_another_seqlen_or_changed_weights_miss_the_cache(tiny_dir, tmp_path, monkeypatch,
                                                          capsys, counted):
    src = tiny_dir("llama")
    _quantize(monkeypatch, capsys, tmp_path, src, "first")
    other = _quantize(monkeypatch, capsys, tmp_path, src, "seqlen", "--eval-seqlen", "16")
    assert other["dense_perplexity_source"] == "computed" and len(counted) == 4
    retrained = tiny_dir("llama", seed=1)  # same config, other weights
    moved = _quantize(monkeypatch, capsys, tmp_path, retrained, "weights")
    assert moved["dense_perplexity_source"] == "computed" and len(counted) == 6


def test_corrupt_entry_is_ignored_with_a_warning_and_replaced(tiny_dir, tmp_path, monkeypatch,
                                                              capsys, counted):
    src = tiny_dir("llama")
    first = _quantize(monkeypatch, capsys, tmp_path, src, "first")
    entry = Path(first["dense_perplexity_cache"])
    for bad in ("{not json", json.dumps({"key": {"other": 1}, "result": {"perplexity": 2.0}}),
                json.dumps({**json.loads(entry.read_text()), "result": {"perplexity": "nan"}})):
        entry.write_text(bad)
        with pytest.warns(UserWarning, match="corrupt perplexity cache entry"):
            again = _quantize(monkeypatch, capsys, tmp_path, src, "again", "--overwrite")
        assert again["dense_perplexity_source"] == "computed"
        assert again["dense_perplexity"] == first["dense_perplexity"]
    assert json.loads(entry.read_text())["result"]["perplexity"] == first["dense_perplexity"]


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cache.ENV)
    monkeypatch.setenv("SECATEUR_CACHE", str(tmp_path / "c"))
    assert cache.cache_folder() == tmp_path / "c" / "perplexity"


def test_built_in_name_hashes_the_file_it_loads_from(monkeypatch, tmp_path):
    from secateur.models import loading

    packaged = tmp_path / "m.gguf"
    packaged.write_bytes(b"GGUF one")
    monkeypatch.setitem(loading.OFFLINE, "fake-builtin", lambda: packaged)
    before = cache.model_hash("fake-builtin")
    packaged.write_bytes(b"GGUF two")
    assert before is not None and cache.model_hash("fake-builtin") != before
