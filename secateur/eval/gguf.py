"""A GGUF file evaluated where it runs: llama.cpp, on secateur's own windows and protocol.

The text is tokenized by the tokenizer the file carries (transformers reads it from the GGUF),
cut into the same non-overlapping windows as `secateur.eval.perplexity` (seqlen capped by the
file's context length, the family's BOS policy), and scored by llama.cpp's forward, so a
GGUF's perplexity is comparable with the transformers number of the model it came from
(F32 GGUFs agree within 0.1%: bench/export_runtime.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from secateur.data.sources import TextSource
from secateur.data.windows import eval_windows, tokenize_stream
from secateur.errors import SecateurError
from secateur.eval.perplexity import PerplexityResult, bos_each, resolve_bos, resolve_seqlen
from secateur.eval.protocol import PerplexityProtocol, library_versions
from secateur.runtime import llama_cpp as runtime


def is_gguf(model: str | Path) -> bool:
    return str(model).endswith(".gguf")


def gguf_tokenizer_and_shape(path: Path) -> tuple[Any, torch.nn.Module]:
    """The file's tokenizer, and its model built on the meta device (no weights) so that the
    family's context length and BOS policy are read as for any other model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise SecateurError(f"GGUF file '{path}' does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers reads only some GGUF architectures
        raise SecateurError(f"transformers cannot read the tokenizer of '{path}' ({e}); "
                            "evaluate the model folder it was exported from") from e
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(config)
    return tokenizer, shape


def gguf_perplexity(path: str | Path, source: TextSource, seqlen: int | None = None,
                    max_windows: int | None = None, protocol: str = "sparsegpt",
                    bos: str = "auto", threads: int = 1) -> PerplexityResult:
    path = Path(path)
    tokenizer, shape = gguf_tokenizer_and_shape(path)
    seqlen = resolve_seqlen(shape, seqlen, protocol)
    bos = resolve_bos(shape, bos)
    ids = tokenize_stream(tokenizer, source.joined(), bos)
    windows = eval_windows(ids, seqlen, max_windows, bos_each(tokenizer) if bos == "each"
                           else None)
    scored = runtime.perplexity(path, windows.windows, threads)
    proto = PerplexityProtocol(
        name=protocol, dataset=source.name, origin=source.origin, split=source.split,
        join=source.join, seqlen=seqlen, stride=windows.stride, windows=len(windows.windows),
        windows_available=windows.available, tokens_scored=scored["tokens"], bos=bos,
        dtype=f"gguf ({gguf_file_type(path)})",
        versions={**library_versions(), "runtime": scored["runtime"]},
        compute_dtype=f"llama.cpp, {threads} thread(s)")
    ppl = scored["perplexity"]
    return PerplexityResult(ppl, math.log(ppl), scored["tokens"], proto)


def gguf_file_type(path: Path) -> str:
    """The file's ggml tensor types by weight count, e.g. 'Q5_0 71%, Q8_0 22%, ...'."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(counts.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(),
                                                               key=lambda kv: -kv[1]))
