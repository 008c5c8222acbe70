"""llama.cpp through llama-cpp-python: the runtime CPU users deploy, and its own quantizer.

- `perplexity(path, windows)`: the same token windows secateur's own evaluation scores, each
  run from a fresh context, every position's logits kept (log-softmax in float64 here).
- `decode_speed(path, ...)`: tokens per second of greedy decoding after a prompt, and of the
  prompt's prefill, at a given thread count.
- `quantize(src, dst, preset, imatrix)`: llama-quantize itself (`llama_model_quantize`), with
  an importance matrix passed in memory, so the baseline a secateur output is judged against is
  llama.cpp's own quantizer given the same calibration statistics.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secateur.errors import SecateurError


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise SecateurError("llama.cpp is not installed: pip install llama-cpp-python "
                            "(scripts/setup.sh installs it)") from e
    return llama_cpp


def _open(path: Path, n_ctx: int, threads: int, logits_all: bool) -> Any:
    llama_cpp = _llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           logits_all=logits_all, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def perplexity(path: str | Path, windows: list[torch.Tensor], threads: int = 1
               ) -> dict[str, Any]:
    """exp(mean next-token NLL) over `windows` (each (1, seqlen) token ids) in llama.cpp."""
    seqlen = windows[0].shape[-1]
    llm = _open(Path(path), seqlen, threads, logits_all=True)
    total, count = 0.0, 0
    try:
        for w in windows:
            toks = w.reshape(-1).tolist()
            llm.reset()
            llm.eval(toks)
            logits = np.asarray(llm.scores[: len(toks) - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logz = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]
            total += float((logz - logits[np.arange(len(toks) - 1), toks[1:]]).sum())
            count += len(toks) - 1
    finally:
        llm.close()
    return {"perplexity": float(np.exp(total / count)), "tokens": count,
            "runtime": f"llama.cpp (llama-cpp-python {_llama_cpp().__version__})"}


def decode_speed(path: str | Path, prompt: list[int], new_tokens: int = 64, threads: int = 1,
                 rounds: int = 3) -> dict[str, Any]:
    """Greedy decode tokens/s after `prompt` and prefill tokens/s of the prompt (min, median,
    max over `rounds`), the model loaded once."""
    llm = _open(Path(path), len(prompt) + new_tokens + 8, threads, logits_all=False)
    decode, prefill = [], []
    try:
        for _ in range(rounds):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([tok])
            t2 = time.perf_counter()
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(new_tokens / (t2 - t1))
    finally:
        llm.close()
    med = lambda v: float(np.median(v))  # noqa: E731
    return {"decode_tokens_per_second": {"min": min(decode), "median": med(decode),
                                         "max": max(decode)},
            "prefill_tokens_per_second": {"min": min(prefill), "median": med(prefill),
                                          "max": max(prefill)},
            "threads": threads, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "rounds": rounds}


def quantize(src: str | Path, dst: str | Path, preset: str,
             imatrix: dict[str, torch.Tensor] | None = None, threads: int = 1) -> None:
    """llama-quantize `src` (an F32/F16 GGUF) into `dst` with llama.cpp's preset, and with
    `imatrix` (GGUF tensor name -> mean x^2 per input column) where given."""
    from secateur.quant.ggml_presets import NEEDS_IMATRIX, llama_ftype

    ftype = llama_ftype(preset)
    if preset.lower() in NEEDS_IMATRIX and not imatrix:
        raise SecateurError(f"llama.cpp's {preset} needs an importance matrix")
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    keep: list[Any] = []  # the arrays must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values.detach().float().numpy(), dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise SecateurError(f"llama.cpp could not quantize '{src}' to {preset} (code {rc})")


def quantize_rows(weight: torch.Tensor, ggml_type: str,
                  imatrix: torch.Tensor | None = None) -> np.ndarray:
    """ggml's own quantizer (`ggml_quantize_chunk`, what llama-quantize calls per tensor) on
    a float matrix: its block bytes, (rows, row_bytes) uint8, with `imatrix` (mean x^2 per
    input column) as the importance where given."""
    import gguf

    llama_cpp = _llama_cpp()
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_void_p]
    kind = getattr(gguf.GGMLQuantizationType, ggml_type.upper())
    block, size = gguf.GGML_QUANT_SIZES[kind]
    src = np.ascontiguousarray(weight.detach().float().numpy(), dtype=np.float32)
    rows, cols = src.shape
    if cols % block:
        raise SecateurError(f"rows of {cols} do not split into {ggml_type} blocks of {block}")
    dst = np.zeros((rows, cols // block * size), dtype=np.uint8)
    imp = None if imatrix is None else np.ascontiguousarray(imatrix.float().numpy(),
                                                            dtype=np.float32)
    written = lib.ggml_quantize_chunk(int(kind), src.ctypes.data, dst.ctypes.data, 0, rows,
                                      cols, None if imp is None else imp.ctypes.data)
    if written != dst.nbytes:
        raise SecateurError(f"ggml wrote {written} bytes of {ggml_type}, {dst.nbytes} expected")
    return dst
