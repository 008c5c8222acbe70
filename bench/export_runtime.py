"""Do pruned models exported to GGUF compute the same thing in llama.cpp as in secateur?

For smollm2-135m as is, depth-pruned (attention and MLP blocks removed) and width-pruned
(LLM-Pruner, per-layer widths), this exports GGUF (f32 and f16) with
`secateur.formats.export`, runs llama.cpp (through llama-cpp-python) on the same wiki token
windows secateur scores, and compares perplexities. Token ids go to llama.cpp directly, so
both see identical inputs; the NLL comes from llama.cpp's logits of every position. Writes
bench/results/export_runtime.json.

    pip install llama-cpp-python      # builds llama.cpp from source (not a secateur dependency)
    python bench/export_runtime.py --windows 8 --seqlen 512
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

from secateur.api import CalibrationConfig, prune
from secateur.data.sources import load_text
from secateur.data.windows import eval_windows, tokenize_stream
from secateur.eval.perplexity import bos_each, perplexity, resolve_bos
from secateur.formats.export import export_model
from secateur.formats.loader import load
from secateur.io import write_json_atomic
from secateur.models import adapter_for
from secateur.models.loading import Loaded, copy_loaded
from secateur.registry import make_config
from secateur.surgery.depth import Block, remove_blocks, total_parameters

OUT = Path(__file__).parent / "results" / "export_runtime.json"
# Hand-picked blocks: the point is the runtime's agreement, not the best choice of blocks.
# Layer 0's attention makes llama.cpp need the zero stand-in (it reads the head size from
# layer 0); a kept attention over a removed MLP needs the one-channel zero MLP.
DEPTH = {"depth (20.attn, 25.mlp)": [Block(20, "attn"), Block(25, "mlp")],
         "depth (0.attn, 25.mlp)": [Block(0, "attn"), Block(25, "mlp")]}


def variants(base: Loaded) -> dict[str, Loaded]:
    out = {"stock": base}
    for name, blocks in DEPTH.items():
        pruned = copy_loaded(base)
        remove_blocks(pruned.model, pruned.adapter, blocks)
        out[name] = Loaded(pruned.model, base.tokenizer, adapter_for(pruned.model), name,
                           base.path)
    width = copy_loaded(base)
    prune(width, make_config({"method": "llm-pruner", "ratio": 0.2, "importance": "l2",
                              "allocation": "importance"}),
          CalibrationConfig("c4-sample", 4, 128, 0), progress=False)
    out["width (llm-pruner l2, 20%, per-layer)"] = Loaded(
        width.model, base.tokenizer, adapter_for(width.model), "width", base.path)
    return out


def llama_cpp_nll(path: Path, windows: list[torch.Tensor], threads: int) -> tuple[float, int]:
    from secateur.runtime.llama_cpp import perplexity as llama_cpp_perplexity

    scored = llama_cpp_perplexity(path, windows, threads)
    return math.log(scored["perplexity"]), scored["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import llama_cpp

    base = load("smollm2-135m")
    source = load_text("wiki", split="test")
    bos = resolve_bos(base.model, "auto")
    ids = tokenize_stream(base.tokenizer, source.joined(), bos)
    windows = eval_windows(ids, args.seqlen, args.windows,
                           bos_each(base.tokenizer) if bos == "each" else None).windows
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, loaded in variants(base).items():
            ref = perplexity(loaded.model, loaded.tokenizer, source, args.seqlen, args.windows,
                             bos="auto", progress=False)
            row = {"parameters": total_parameters(loaded.model),
                   "secateur_perplexity": ref.perplexity, "tokens_scored": ref.tokens}
            for outtype in ("f32", "f16"):
                path = Path(tmp) / f"{len(rows)}-{outtype}.gguf"
                written = export_model(loaded.model, loaded.tokenizer, "gguf", path,
                                       outtype=outtype, name=name)
                start = time.perf_counter()
                nll, tokens = llama_cpp_nll(path, windows, args.threads)
                assert tokens == ref.tokens
                row[outtype] = {"architecture": written["architecture"],
                                "mib": written["bytes"] / 2**20,
                                "llama_cpp_perplexity": math.exp(nll),
                                "relative_difference": math.exp(nll) / ref.perplexity - 1,
                                "llama_cpp_seconds": time.perf_counter() - start}
            row["layers_without_attention"] = written["layers_without_attention"]
            row["layers_without_mlp"] = written["layers_without_mlp"]
            rows[name] = row
            print(f"{name}: secateur {ref.perplexity:.4f}, llama.cpp f32 "
                  f"{row['f32']['llama_cpp_perplexity']:.4f} f16 "
                  f"{row['f16']['llama_cpp_perplexity']:.4f} ({written['architecture']})",
                  flush=True)
    result = {
        "what": "perplexity of GGUF exports in llama.cpp vs the same model in secateur",
        "command": f"python bench/export_runtime.py --windows {args.windows} "
                   f"--seqlen {args.seqlen} --threads {args.threads}",
        "protocol": {"model": "smollm2-135m", "dataset": source.name, "seqlen": args.seqlen,
                     "windows": len(windows), "bos": bos, "secateur_dtype": "float32",
                     "llama_cpp": "llama-cpp-python " + llama_cpp.__version__},
        "machine": platform.processor() or platform.machine(),
        "results": rows,
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
