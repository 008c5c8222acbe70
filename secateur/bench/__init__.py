"""Latency, throughput and memory; dense vs compressed measured side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from secateur.bench.measure import BenchSpec, Subject, benchmark
from secateur.bench.memory import peak_rss_mib

__all__ = ["BenchSpec", "Subject", "bench_job", "benchmark", "parse_lengths", "peak_rss_mib"]


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


def _is_packed(name: str) -> bool:
    import json

    config = Path(name) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors"


def bench_job(model: str, vs: list[str], spec: BenchSpec, dtype: str = "float32",
              json_path: Path | None = None,
              warn: Callable[[str], None] | None = None,
              runtime: str | None = None, head: str = "float16",
              overwrite: bool = False) -> dict[str, Any]:
    """Load MODEL and every --vs model in the same dtype and measure them interleaved.

    `runtime` runs the --vs models that are pack-quantized on that CPU runtime (int4/int8),
    with their lm_head in `head` format (`secateur.runtime.head`); `overwrite` replaces an
    existing JSON file."""
    from secateur.formats.loader import load
    from secateur.io import write_json_atomic
    from secateur.outputs import check_output_file
    from secateur.runtime.head import check_head

    check_head(head, runtime)
    if json_path is not None:  # a bad --json fails now, not after the measurement
        check_output_file(Path(json_path), "--json", inputs=[model, *vs], overwrite=overwrite)
    from secateur.errors import SecateurError

    names = [model, *vs]
    if all(str(n).endswith(".gguf") for n in names):  # llama.cpp files: timed in llama.cpp
        from secateur.bench.gguf import bench_gguf

        if runtime is not None:
            raise SecateurError("GGUF files run in llama.cpp; --runtime is for packed folders")
        result = bench_gguf([str(n) for n in names], spec)
        if json_path is not None:
            write_json_atomic(Path(json_path), result)
        return result
    if any(str(n).endswith(".gguf") for n in names):
        raise SecateurError("compare GGUF files with GGUF files (llama.cpp) and model folders "
                            "with folders (transformers); export the folder with secateur "
                            "export --format gguf")
    subjects = []
    for name in [model, *vs]:
        packed = runtime is not None and _is_packed(name)
        loaded = load(name, dtype=dtype, runtime=runtime if packed else None,
                      head=head if packed else "float16")
        subjects.append(Subject(name, loaded.model, loaded.tokenizer, loaded.path))
    result = benchmark(subjects, spec, warn)
    if json_path is not None:
        write_json_atomic(Path(json_path), result)
    return result
