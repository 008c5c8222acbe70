"""Depth pruning on smollm2-135m: BlockPruner vs ShortGPT vs SLEB at equal parameter ratio.

Writes bench/results/depth_pruning.json and depth_pruning.png (calibration perplexity after each
removal). Per target ratio (10/20/30% of ALL parameters, embeddings included, BlockPruner's
definition): ShortGPT and SLEB remove the smallest number of whole layers reaching it, and
BlockPruner the prefix of its removal order whose ratio is nearest the one they achieved (the
achieved ratios are reported next to each perplexity).

Each greedy search runs once, to the largest ratio: a greedy removal order is the same whatever
the stopping point, so the smaller ratios are prefixes of it (what separate `secateur prune
--ratio` runs would remove). Each pruned model is built from its prefix by the same surgery
the CLI uses, then evaluated on `wiki` (perplexity) and timed against the dense model in the
same process: prefill of one window and batch-1 greedy decode with a KV cache, models
interleaved per repeat, medians reported.

    python bench/depth_pruning.py --search-shortlist 6   # the issue's 32 x 512 protocol
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from secateur.api import CalibrationConfig, prune
from secateur.bench.measure import decode_seconds, interleaved, prefill_seconds
from secateur.data.sources import load_text
from secateur.eval.perplexity import perplexity
from secateur.formats.loader import load
from secateur.io import write_json_atomic
from secateur.models.loading import Loaded, copy_loaded
from secateur.registry import make_config
from secateur.report.depth import plot_removals
from secateur.surgery.depth import Block, block_parameters, remove_blocks, total_parameters

OUT = Path(__file__).parent / "results"
METHODS = ("shortgpt", "blockpruner", "sleb")


def prefix_for(order: list[str], sizes: dict[str, int], total: int, ratio: float) -> int:
    """The prefix whose ratio is nearest `ratio` (an MLP block is 2% of this model, so
    'at least' could overshoot the layer methods by that much)."""
    ratios, removed = [], 0
    for block in order:
        removed += sizes[block]
        ratios.append(removed / total)
    if ratios[-1] < ratio - 0.01:
        raise ValueError(f"the search stopped at {ratios[-1]:.4f}, before ratio {ratio}")
    return 1 + min(range(len(ratios)), key=lambda k: abs(ratios[k] - ratio))


def proportional_speedup(sizes: dict[str, int], removed: list[str], head: int,
                         layers: int) -> float:
    """The speedup if time were proportional to the weights each token multiplies with: every
    decoder layer's plus the lm_head's (the embedding lookup is free). Batch-1 decode reads
    each of those weights once per token, so this is its memory-bound expectation."""
    work = sum(sizes[f"{i}.layer"] for i in range(layers)) + head
    return work / (work - sum(sizes[b] for b in removed))


def annotate(path: Path, head: int, sizes: dict[str, int], layers: int) -> None:
    """Add `proportional_speedup` to every pruned model of an existing result file."""
    result = json.loads(path.read_text())
    for level in result["levels"]:
        for entry in level["methods"].values():
            entry["proportional_speedup"] = proportional_speedup(sizes, entry["removed"], head,
                                                                 layers)
    write_json_atomic(path, result)


def time_models(models: dict[str, torch.nn.Module], repeats: int, prefill_len: int,
                new_tokens: int, seed: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    vocab = models["dense"].config.vocab_size
    ids = torch.randint(0, vocab, (1, prefill_len), generator=g)
    prompt = ids[:, :16]
    for m in models.values():  # a short warm-up: first calls allocate and pick kernels
        prefill_seconds(m, ids[:, :32])
        decode_seconds(m, prompt, 4)
    rounds = interleaved({name: (lambda m=m: (prefill_seconds(m, ids),
                                              1 / decode_seconds(m, prompt, new_tokens)))
                          for name, m in models.items()}, repeats, warmup=0)
    prefill = {name: [p for p, _ in rows] for name, rows in rounds.items()}
    decode = {name: [d for _, d in rows] for name, rows in rounds.items()}
    dense_prefill = statistics.median(prefill["dense"])
    dense_decode = statistics.median(decode["dense"])
    return {name: {"prefill_seconds": statistics.median(prefill[name]),
                   "decode_tokens_per_second": statistics.median(decode[name]),
                   "prefill_speedup": dense_prefill / statistics.median(prefill[name]),
                   "decode_speedup": statistics.median(decode[name]) / dense_decode}
            for name in models}


def zeroshot_accuracy(loaded: Loaded, args: argparse.Namespace) -> dict:
    from secateur.eval.zeroshot import ZeroShotSpec, parse_tasks, zeroshot

    spec = ZeroShotSpec(tasks=parse_tasks(args.zeroshot_tasks), limit=args.zeroshot_limit)
    out = zeroshot(loaded.model, loaded.tokenizer, spec)
    return {"average": out["average"], "tasks": {k: {"acc": v["acc"], "acc_norm": v["acc_norm"]}
                                                 for k, v in out["tasks"].items()},
            "limit": args.zeroshot_limit}


def plot_curves(result: dict, sizes: dict[str, int], total: int, path: Path) -> None:
    """All three calibration-perplexity curves against the parameter ratio removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, search in result["searches"].items():
        ratios, removed = [0.0], 0
        for block in search["removed"]:
            removed += sizes[block]
            ratios.append(removed / total)
        ax.plot(ratios, search["calibration_perplexity"], marker=".", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("share of all parameters removed (embeddings included)")
    ax.set_ylabel("calibration perplexity (search windows)")
    ax.set_title("smollm2-135m: perplexity after each removal")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--calib", default="c4-sample")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--search-samples", type=int, default=None,
                    help="BlockPruner/SLEB: search on the first N calibration windows only.")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--search-shortlist", type=int, default=None,
                    help="BlockPruner/SLEB: screen on a quarter of the windows, score K on all.")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT / "depth_pruning.json")
    ap.add_argument("--reuse-searches", action="store_true",
                    help="Take the removal orders from an earlier --out instead of searching.")
    ap.add_argument("--zeroshot-limit", type=int, default=0,
                    help="Also run lm-eval zero-shot on the first N documents per task.")
    ap.add_argument("--zeroshot-tasks", default="arc_easy,piqa,hellaswag")
    ap.add_argument("--annotate-only", action="store_true",
                    help="Only add proportional_speedup to an existing --out.")
    args = ap.parse_args()
    # Use --threads 1 on a shared machine: OpenMP spin-waiting under contention makes two
    # threads slower than one; dense and pruned run alike, so ratios stay fair.
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = load("smollm2-135m")
    total = total_parameters(base.model)
    sizes = {f"{i}.{part}": 0 for i in range(base.adapter.num_layers)
             for part in ("attn", "mlp", "layer")}
    for key in sizes:
        sizes[key] = block_parameters(base.adapter, Block.parse(key))
    head = base.model.get_output_embeddings().weight.numel()
    layers = base.adapter.num_layers
    if args.annotate_only:
        annotate(args.out, head, sizes, layers)
        return
    calib = CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed)
    wiki = load_text("wiki", split="test")

    def ppl(model) -> dict:
        return perplexity(model, base.tokenizer, wiki, args.eval_seqlen, args.eval_windows,
                          progress=False).to_dict()

    result: dict = {"model": "smollm2-135m", "total_parameters": total,
                    "ratio_definition": "removed / all parameters (embeddings included, tied "
                                        "once), as in the BlockPruner paper",
                    "calibration": {"source": args.calib, "nsamples": args.nsamples,
                                    "seqlen": args.seqlen, "seed": args.seed,
                                    "search_shortlist": args.search_shortlist},
                    "threads": args.threads, "machine": platform.processor() or platform.machine(),
                    "searches": {}, "levels": []}
    dense_eval = ppl(base.model)
    result["dense"] = {"perplexity": dense_eval["perplexity"], "protocol": dense_eval["protocol"]}
    if args.zeroshot_limit:
        result["dense"]["zeroshot"] = zeroshot_accuracy(base, args)
    print(f"dense wiki ppl {dense_eval['perplexity']:.3f}", flush=True)

    # ShortGPT's achieved ratios fix the levels; each search runs once to the largest.
    layer = sizes["0.layer"]
    levels = []
    for target in args.ratios:
        k = next(k for k in range(1, base.adapter.num_layers) if k * layer >= target * total)
        levels.append((target, k, k * layer / total))
    top_layers, top_ratio = levels[-1][1], levels[-1][2]
    orders = {}
    previous = json.loads(args.out.read_text()) if args.reuse_searches else {}
    for method in args.methods:
        if method in previous.get("searches", {}):
            # the greedy orders of an earlier run with the same calibration: skip the search
            assert previous["calibration"] == result["calibration"], "calibration differs"
            result["searches"][method] = previous["searches"][method]
            orders[method] = result["searches"][method]["removed"]
            continue
        amount = ({"ratio": top_ratio - 1e-9} if method == "blockpruner"
                  else {"layers": top_layers})
        if method != "shortgpt":  # one pass over all windows; the greedy ones search
            amount.update(search_samples=args.search_samples,
                          search_shortlist=args.search_shortlist)
        else:  # the plot draws every method's curve: ShortGPT computes it only when asked
            amount.update(curve=True)
        options = make_config({"method": method, **amount})
        work = copy_loaded(base)
        t = time.perf_counter()
        run = prune(work, options, calib, progress=True)
        s = run.summary
        orders[method] = s["removed"]
        result["searches"][method] = {"removed": s["removed"], "search_samples": (
                                          options.search_samples or args.nsamples),
                                      "calibration_perplexity": s["calibration_perplexity"],
                                      "search": s["search"], "seconds": time.perf_counter() - t,
                                      **({"block_influence": s["block_influence"]}
                                         if "block_influence" in s else {})}
        plot_removals({"model": "smollm2-135m", "method": method, "summary": s},
                      args.out.with_name(f"depth_pruning_{method}.png"))
        print(f"{method}: {len(s['removed'])} removals, search {s['search']}", flush=True)
        write_json_atomic(args.out, result)  # a long search's result survives an interruption
        del work
        gc.collect()

    for target, k, achieved in levels:
        level = {"target_ratio": target, "layer_methods_ratio": achieved, "methods": {}}
        models = {"dense": base.model}
        for method in args.methods:
            n = k if method != "blockpruner" else prefix_for(orders[method], sizes, total,
                                                             achieved)
            work = copy_loaded(base)
            blocks = [Block.parse(b) for b in orders[method][:n]]
            surgery = remove_blocks(work.model, work.adapter, blocks)
            params = total_parameters(work.model)
            ev = ppl(work.model)
            level["methods"][method] = {"removed": orders[method][:n],
                                        "ratio": 1 - params / total, "parameters": params,
                                        "perplexity": ev["perplexity"],
                                        "layers_left": work.model.config.num_hidden_layers,
                                        "proportional_speedup": proportional_speedup(
                                            sizes, orders[method][:n], head, layers),
                                        "config": surgery["config"]}
            if args.zeroshot_limit:
                level["methods"][method]["zeroshot"] = zeroshot_accuracy(work, args)
            models[method] = work.model
            print(f"ratio {achieved:.3f} {method}: wiki ppl {ev['perplexity']:.3f} "
                  f"({len(blocks)} removed, ratio {1 - params / total:.4f})", flush=True)
        timing = time_models(models, args.repeats, args.eval_seqlen, args.new_tokens, args.seed)
        level["dense_timing"] = timing["dense"]
        for method in args.methods:
            level["methods"][method].update(timing[method])
        result["levels"].append(level)
        del models
        gc.collect()
        write_json_atomic(args.out, result)

    plot_curves(result, sizes, total, args.out.with_suffix(".png"))
    result["timing_protocol"] = (f"batch 1, {args.threads} thread(s), fp32; prefill: one "
                                 f"{args.eval_seqlen}-token forward; decode: greedy "
                                 f"{args.new_tokens} new tokens after a 16-token prompt with the "
                                 f"KV cache; median of {args.repeats} interleaved repeats")
    result["seconds"] = time.perf_counter() - start
    write_json_atomic(args.out, result)
    print(json.dumps({lv["layer_methods_ratio"]: {m: round(v["perplexity"], 2)
                                                  for m, v in lv["methods"].items()}
                      for lv in result["levels"]}, indent=1))


if __name__ == "__main__":
    main()
