"""Speed and memory of one or more models, measured side by side in one process.

The machine is noisy (shared cores), so models are measured in interleaved rounds (A B, B A,
A B, ...) after a warm-up, and the dense-vs-compressed speedup is the median of per-round
ratios: a slow moment hits both models of a round rather than one model's whole series.
Batch-1 decode is memory-bound, so each model's decode speed is also compared with its
physical limit: measured memory bandwidth / bytes of weights read per generated token.
"""

from __future__ import annotations

import inspect
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.bench.memory import peak_rss_mib, peak_tensor_mib
from secateur.device import timer
from secateur.errors import SecateurError
from secateur.eval.protocol import library_versions
from secateur.io import dir_bytes
from secateur.params import count_parameters, weight_bytes_per_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSpec:
    prompt_lengths: tuple[int, ...] = (128, 512)
    decode_tokens: int = 32  # generated after a prompt of decode_prompt tokens
    decode_prompt: int = 16
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None  # None: torch's default
    text: str = "wiki"  # prompts are real text, tokenized by each model's own tokenizer


@dataclass
class Subject:
    """One model to measure: what it is called and where its files are."""

    name: str
    model: nn.Module
    tokenizer: Any
    path: str | None = None


def spread(xs: list[float]) -> dict[str, float]:
    """Median, min, max and count of a series of timings (or of per-round ratios)."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                desc: str | None = None) -> dict[str, list[Any]]:
    """Each run's results over `repeats` rounds, every round calling every run once.

    The order is reversed every other round, so a slow moment of a shared machine falls on
    all runs alike instead of on one run's whole series; warm-up rounds (first calls allocate
    and pick kernels) are run in order and not kept."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    names = list(runs)
    out: dict[str, list[Any]] = {n: [] for n in names}
    rounds = range(repeats) if desc is None else tqdm(range(repeats), desc=desc)
    for r in rounds:
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(runs[n]())
    return out


def memory_bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Best-of-N read bandwidth: a sum over a buffer far larger than the caches."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass faults the pages in
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def bytes_on_disk(path: str | None) -> int | None:
    if not path or not Path(path).exists():
        return None
    return dir_bytes(Path(path))


def prompt_ids(tokenizer, text: str, length: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise SecateurError(f"the benchmark text has only {len(ids)} tokens; ask for prompt "
                            f"lengths up to that")
    return torch.tensor([ids[:length]], dtype=torch.long)


@torch.no_grad()
def prefill_seconds(model: nn.Module, ids: torch.Tensor) -> float:
    device = ids.device  # on a GPU the clock waits for the queued kernels (timer syncs)
    t = timer(device)
    model(input_ids=ids, use_cache=False)
    return timer(device) - t


def cache_keyword(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by (and its output returns it by):
    transformers 5.24 renamed `past_key_values` to `cache`; the old name warns on every call."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_seconds(model: nn.Module, ids: torch.Tensor, tokens: int) -> float:
    """Seconds per generated token at batch 1 with a KV cache (greedy; prompt not timed)."""
    key = cache_keyword(model)
    out = model(input_ids=ids, use_cache=True)
    past = getattr(out, key)
    nxt = out.logits[:, -1:].argmax(-1)
    t = timer(ids.device)
    for _ in range(tokens):
        out = model(input_ids=nxt, use_cache=True, **{key: past})
        past = getattr(out, key)
        nxt = out.logits[:, -1:].argmax(-1)
    return (timer(ids.device) - t) / tokens


def same_tokenizer(a, b) -> bool:
    try:
        return a.get_vocab() == b.get_vocab()
    except AttributeError:
        return type(a) is type(b)


def _check(spec: BenchSpec) -> None:
    if not spec.prompt_lengths or min(spec.prompt_lengths) < 1:
        raise SecateurError("--lengths must be positive token counts, e.g. 128,512")
    if spec.repeats < 1 or spec.warmup < 0 or spec.decode_tokens < 1 or spec.decode_prompt < 1:
        raise SecateurError("--repeats and --decode-tokens must be at least 1, --warmup >= 0")
    if spec.threads is not None and spec.threads < 1:
        raise SecateurError(f"--threads must be at least 1, got {spec.threads}")


def benchmark(subjects: list[Subject], spec: BenchSpec,
              warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every subject in interleaved rounds; ratios are relative to subjects[0]."""
    from secateur.data.sources import load_text

    _check(spec)
    if not subjects:
        raise SecateurError("nothing to benchmark")
    warn = warn or log.warning
    base = subjects[0]
    warnings = []
    for s in subjects[1:]:
        if not same_tokenizer(base.tokenizer, s.tokenizer):
            msg = (f"'{s.name}' has a different tokenizer from '{base.name}': each model gets "
                   "the same text tokenized its own way, so per-token speeds compare unequal "
                   "amounts of text")
            warn(msg)
            warnings.append(msg)
    dtypes = {str(next(s.model.parameters()).dtype) for s in subjects}
    if len(dtypes) > 1:
        msg = f"models have different dtypes ({', '.join(sorted(dtypes))}): speed ratios mix them"
        warn(msg)
        warnings.append(msg)
    threads_before = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        text = "\n\n".join(load_text(spec.text, split="test").documents[:200])
        return _run(subjects, spec, text, warnings)
    finally:
        torch.set_num_threads(threads_before)


def _run(subjects: list[Subject], spec: BenchSpec, text: str, warnings: list[str]) -> dict:
    prompts = {s.name: {n: prompt_ids(s.tokenizer, text, n) for n in spec.prompt_lengths}
               for s in subjects}
    decode_prompt = {s.name: prompt_ids(s.tokenizer, text, spec.decode_prompt)
                     for s in subjects}
    for s in subjects:
        s.model.eval()
    names = [s.name for s in subjects]
    if len(set(names)) != len(names):
        raise SecateurError(f"two models are both called '{names[0]}': give distinct paths")

    def one_round(s: Subject) -> dict[str, float]:
        row = {f"prefill_{n}": prefill_seconds(s.model, prompts[s.name][n])
               for n in spec.prompt_lengths}
        row["decode"] = decode_seconds(s.model, decode_prompt[s.name], spec.decode_tokens)
        return row

    rounds = interleaved({s.name: (lambda s=s: one_round(s)) for s in subjects}, spec.repeats,
                         spec.warmup, desc="bench rounds")
    # Memory in its own untimed pass: the profiler's bookkeeping must not slow the timings.
    working = {s.name: _working_mib(s, prompts[s.name], decode_prompt[s.name], spec)
               for s in subjects}
    bandwidth = memory_bandwidth_gbs()
    models = {}
    for s in subjects:
        models[s.name] = _model_result(s, rounds[s.name], working[s.name], spec, bandwidth)
    base = subjects[0].name
    ratios = {}
    for s in subjects[1:]:
        ratios[s.name] = _ratios(rounds[base], rounds[s.name], models[base], models[s.name])
    return {
        "baseline": base,
        "models": models,
        "speedup_vs_baseline": ratios,
        "memory_bandwidth_gbs": bandwidth,
        # all models resident at once, so this bounds their sum, not any one of them
        "process_peak_rss_mib": peak_rss_mib(),
        "warnings": warnings,
        "protocol": {
            **asdict(spec),
            "threads_used": spec.threads or torch.get_num_threads(),
            "order": "interleaved rounds, order reversed every round; warm-up rounds not kept",
            "prefill": "one forward over the prompt, batch 1, use_cache=False",
            "decode": f"batch 1, KV cache, greedy, {spec.decode_tokens} tokens after a "
                      f"{spec.decode_prompt}-token prompt; seconds per token",
            "speedup": "median over rounds of (baseline seconds / model seconds) in the same "
                       "round",
            "bandwidth": "best of 5 sums over a 256 MiB float32 buffer",
            "decode_bound": "memory bandwidth / bytes of weights read per token",
            "peak_working_mib": WORKING_PROTOCOL,
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "versions": library_versions(),
        },
    }


WORKING_PROTOCOL = ("peak bytes of CPU tensors alive during one prefill (each length) and "
                    "one decode run, beyond those alive before (activations, logits, KV "
                    "cache; weights excluded), from torch's profiler allocation events")


@torch.no_grad()
def _working_mib(s: Subject, prompts: dict[int, torch.Tensor], decode_prompt: torch.Tensor,
                 spec: BenchSpec) -> dict[str, float] | None:
    """Peak working memory of each measured pass; None when it cannot be measured here."""
    passes = {f"prefill_{n}": (lambda ids=ids: prefill_seconds(s.model, ids))
              for n, ids in prompts.items()}
    passes["decode"] = lambda: decode_seconds(s.model, decode_prompt, spec.decode_tokens)
    out = {}
    for key, run in passes.items():
        mib = peak_tensor_mib(run)
        if mib is None:
            return None
        out[key] = mib
    return out


def _model_result(s: Subject, rows: list[dict[str, float]],
                  working: dict[str, float] | None, spec: BenchSpec,
                  bandwidth: float) -> dict[str, Any]:
    prefill = {}
    for n in spec.prompt_lengths:
        secs = [r[f"prefill_{n}"] for r in rows]
        prefill[str(n)] = {"seconds": spread(secs),
                           "tokens_per_second": n / statistics.median(secs)}
    decode = [r["decode"] for r in rows]
    tps = 1 / statistics.median(decode)
    per_token = weight_bytes_per_token(s.model)
    bound = bandwidth * 1e9 / per_token
    return {
        "path": s.path,
        "dtype": str(next(s.model.parameters()).dtype).replace("torch.", ""),
        **count_parameters(s.model),
        "bytes_on_disk": bytes_on_disk(s.path),
        "num_layers": getattr(s.model.config, "num_hidden_layers", None),
        "prefill": prefill,
        "decode": {"seconds_per_token": spread(decode), "tokens_per_second": tps,
                   "weight_bytes_per_token": per_token, "bound_tokens_per_second": bound,
                   "fraction_of_bound": tps / bound},
        "peak_working_mib": None if working is None else max(working.values()),
        "working_mib": working,
    }


def _ratios(base_rows: list[dict[str, float]], rows: list[dict[str, float]], base: dict,
            other: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in base_rows[0]:
        paired = [b[key] / o[key] for b, o in zip(base_rows, rows, strict=True)]
        out[key] = spread(paired)
    out["parameters"] = other["parameters"] / base["parameters"]
    out["weight_bytes_per_token"] = (other["decode"]["weight_bytes_per_token"]
                                     / base["decode"]["weight_bytes_per_token"])
    if base["bytes_on_disk"] and other["bytes_on_disk"]:
        out["bytes_on_disk"] = other["bytes_on_disk"] / base["bytes_on_disk"]
    return out
