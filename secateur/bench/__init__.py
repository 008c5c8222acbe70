"""Latency, throughput and memory; dense vs compressed measured side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from secateur.bench.measure import BenchSpec, Subject, benchmark

__all__ = ["BenchSpec", "Subject", "bench_job", "benchmark", "parse_lengths"]


def parse_lengths(text: str) -> tuple[int, ...]:
    from secateur.errors import SecateurError

    try:
        lengths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SecateurError(f"--lengths '{text}' must be comma-separated token counts, "
                            "e.g. 128,512") from None
    if not lengths:
        raise SecateurError("--lengths names no prompt length: e.g. 128,512")
    return lengths


def bench_job(model: str, vs: list[str], spec: BenchSpec, dtype: str = "float32",
              json_path: Path | None = None,
              warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load MODEL and every --vs model in the same dtype and measure them interleaved."""
    from secateur.models.loading import load
    from secateur.surgery.save import write_json_atomic

    subjects = []
    for name in [model, *vs]:
        loaded = load(name, dtype=dtype)
        subjects.append(Subject(name, loaded.model, loaded.tokenizer, loaded.path))
    result = benchmark(subjects, spec, warn)
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result
