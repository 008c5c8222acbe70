"""Benchmark mechanics on tiny models: ratios, bounds, warnings, bad input (never timings)."""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from secateur.bench import BenchSpec, Subject, benchmark, parse_lengths
from secateur.bench.memory import peak_tensor_bytes
from secateur.errors import SecateurError
from secateur.models import adapter_for
from secateur.params import weight_bytes_per_token
from secateur.surgery.depth import remove_layers
from tests.tiny_models import VOCAB, byte_tokenizer, tiny_model

FAST = BenchSpec(prompt_lengths=(8, 16), decode_tokens=3, decode_prompt=4, repeats=2,
                 warmup=1, threads=1)


def _params_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in
                                                      model.parameters()}.values())


def test_weight_bytes_per_token_counts_tied_embedding_once_and_skips_untied_input():
    untied = tiny_model("llama")  # decode reads one row of an untied input embedding
    emb = untied.get_input_embeddings().weight
    assert emb is not untied.get_output_embeddings().weight
    assert weight_bytes_per_token(untied) == _params_bytes(untied) - emb.numel() * 4
    tied = tiny_model("llama")  # tied: lm_head reads the whole matrix, once
    tied.lm_head.weight = tied.get_input_embeddings().weight
    assert weight_bytes_per_token(tied) == _params_bytes(tied)
    assert _params_bytes(tied) == _params_bytes(untied) - emb.numel() * 4


def test_depth_pruned_model_reads_fewer_bytes_and_ratios_pair_rounds():
    dense = tiny_model("llama")
    shallow = copy.deepcopy(dense)
    remove_layers(shallow, adapter_for(shallow), [1])  # 3 -> 2 decoder layers
    tok = byte_tokenizer()
    res = benchmark([Subject("dense", dense, tok), Subject("shallow", shallow, tok)], FAST)
    d, s = res["models"]["dense"], res["models"]["shallow"]
    assert d["num_layers"] == 3 and s["num_layers"] == 2
    assert s["parameters"] < d["parameters"]
    ratio = res["speedup_vs_baseline"]["shallow"]
    assert ratio["parameters"] == pytest.approx(s["parameters"] / d["parameters"])
    assert ratio["weight_bytes_per_token"] < 1
    for key in ("prefill_8", "prefill_16", "decode"):
        r = ratio[key]
        assert r["n"] == 2 and r["min"] <= r["median"] <= r["max"] and r["min"] > 0
    for m in (d, s):
        dec = m["decode"]
        assert dec["seconds_per_token"]["n"] == 2
        assert dec["bound_tokens_per_second"] == pytest.approx(
            res["memory_bandwidth_gbs"] * 1e9 / dec["weight_bytes_per_token"])
        assert dec["fraction_of_bound"] == pytest.approx(
            dec["tokens_per_second"] / dec["bound_tokens_per_second"])
        assert m["prefill"]["16"]["tokens_per_second"] == pytest.approx(
            16 / m["prefill"]["16"]["seconds"]["median"])
    assert res["warnings"] == []
    assert res["process_peak_rss_mib"] > 0
    assert res["protocol"]["threads_used"] == 1 and res["protocol"]["repeats"] == 2


def test_different_tokenizer_warns_and_still_runs():
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    warned = []
    res = benchmark([Subject("a", tiny_model("llama"), byte_tokenizer()),
                     Subject("b", tiny_model("llama", seed=1), other)], FAST, warned.append)
    assert len(warned) == 1 and "different tokenizer" in warned[0]
    assert res["warnings"] == warned and set(res["models"]) == {"a", "b"}


def test_bad_bench_input():
    with pytest.raises(SecateurError, match="comma-separated"):
        parse_lengths("128,long")
    assert parse_lengths("64, 256") == (64, 256)
    tok = byte_tokenizer()
    with pytest.raises(SecateurError, match="at least 1"):
        benchmark([Subject("a", tiny_model("llama"), tok)], BenchSpec(repeats=0))
    with pytest.raises(SecateurError, match="only"):  # longer prompt than the text has
        benchmark([Subject("a", tiny_model("llama"), tok)],
                  BenchSpec(prompt_lengths=(10**8,), repeats=1, warmup=0))


def test_bench_cli_writes_json(tiny_dir, tmp_path, monkeypatch, capsys):
    from secateur.cli import main

    a, b = tiny_dir("llama"), tiny_dir("llama", seed=1)
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["secateur", "bench", str(a), "--vs", str(b),
                                      "--lengths", "8", "--repeats", "1", "--warmup", "0",
                                      "--decode-tokens", "2", "--threads", "1",
                                      "--json", str(out)])
    main()
    res = json.loads(out.read_text())
    assert res["baseline"] == str(a) and str(b) in res["speedup_vs_baseline"]
    assert res["models"][str(a)]["bytes_on_disk"] > 0
    assert "decode" in capsys.readouterr().out


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    x = torch.ones(1000, 1000)

    def two_alive():
        a = x + 1  # 4 MB
        b = a * 2  # 4 MB, both alive
        del a
        return (b + 1).sum()  # a was freed: the peak stays 8 MB

    assert peak_tensor_bytes(two_alive) == pytest.approx(8_000_000, abs=1024)


def test_peak_working_memory_is_measured_for_every_model():
    # It used to be VmHWM - VmRSS around the rounds, which read 0 once the allocator reused
    # the pages of earlier rounds.
    spec = BenchSpec(prompt_lengths=(16, 128), decode_tokens=3, decode_prompt=4, repeats=1,
                     warmup=0, threads=1)
    tok = byte_tokenizer()
    res = benchmark([Subject("a", tiny_model("llama"), tok),
                     Subject("b", tiny_model("llama", seed=1), tok)], spec)
    logits_mib = 128 * VOCAB * 4 / 2**20
    for m in res["models"].values():
        w = m["working_mib"]
        assert set(w) == {"prefill_16", "prefill_128", "decode"}
        assert w["prefill_128"] >= logits_mib and w["prefill_128"] > w["prefill_16"] > 0
        assert m["peak_working_mib"] == max(w.values())
    # same shapes, same allocations: the figure is exact, not a sample of a noisy machine
    assert res["models"]["a"]["working_mib"] == res["models"]["b"]["working_mib"]
    assert "profiler" in res["protocol"]["peak_working_mib"]


def test_bad_json_path_fails_before_any_model_loads(tmp_path, monkeypatch):
    from secateur.bench import bench_job
    from secateur.formats import loader

    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SecateurError, match="is a folder: give a file path"):
        bench_job("smollm2-135m", [], FAST, json_path=tmp_path)
    with pytest.raises(SecateurError, match="cannot write in"):
        bench_job("smollm2-135m", [], FAST, json_path=Path("/sys/bench.json"))


def test_timed_passes_build_no_autograd_graph():
    """Dense weights require grad and runtime buffers do not: timing with autograd on would
    charge the dense baseline for graph building the compressed model skips."""
    from secateur.bench.measure import decode_seconds, prefill_seconds
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    seen = []
    model.model.layers[0].register_forward_hook(
        lambda *_: seen.append(torch.is_grad_enabled()))
    ids = torch.tensor([[1, 2, 3, 4]])
    prefill_seconds(model, ids)
    decode_seconds(model, ids, 3)
    assert len(seen) == 1 + 1 + 3 and not any(seen)
