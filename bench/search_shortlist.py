"""Does `--search-shortlist K` pick the same blocks as BlockPruner's exact greedy search?

Runs the exact search (every candidate on every window) and the shortlisted one (every
candidate screened on a quarter of the windows, the K best scored on all) on smollm2-135m with
the same calibration windows, for a few removals, and writes both orders, the per-step
calibration perplexities and the time each took to bench/results/search_shortlist.json.

    python bench/search_shortlist.py --nsamples 8 --seqlen 256 --steps 5 --shortlist 6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from secateur.api import CalibrationSpec, calibration_data
from secateur.engine.block_search import BlockSearch
from secateur.models.loading import load
from secateur.surgery.depth import Block
from secateur.surgery.save import write_json_atomic

OUT = Path(__file__).parent / "results" / "search_shortlist.json"


def greedy(search: BlockSearch, steps: int, shortlist: int | None) -> dict:
    blocks = [Block(i, part) for i in range(search.num_layers) for part in ("attn", "mlp")]
    order, curve, start = [], [], time.perf_counter()
    for _ in range(steps):
        candidates = [b for b in blocks if str(b) not in order]
        scores = search.score(candidates, shortlist=shortlist)
        best = min(scores, key=lambda b: (scores[b], -b.layer, b.part))
        search.remove(best)
        order.append(str(best))
        curve.append(float(torch.tensor(scores[best]).exp()))
    return {"removed": order, "calibration_perplexity": curve,
            "seconds": time.perf_counter() - start, "cost": search.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shortlist", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load("smollm2-135m")
    spec = CalibrationSpec("c4-sample", args.nsamples, args.seqlen, 0)
    windows = calibration_data(loaded, spec)[0]
    runs = {}
    for name, k in (("exact", None), (f"shortlist_{args.shortlist}", args.shortlist)):
        search = BlockSearch(loaded.model, loaded.adapter, windows, args.batch_size,
                             progress=True, dtype=torch.bfloat16)
        runs[name] = greedy(search, args.steps, k)
        print(name, runs[name]["removed"], f"{runs[name]['seconds']:.0f} s", flush=True)
    exact, quick = runs["exact"]["removed"], runs[f"shortlist_{args.shortlist}"]["removed"]
    result = {"model": "smollm2-135m", "calibration": vars(args) | {"out": str(args.out)},
              "runs": runs, "same_order": exact == quick,
              "speedup": runs["exact"]["seconds"] / runs[f"shortlist_{args.shortlist}"]["seconds"]}
    write_json_atomic(args.out, result)
    print(json.dumps({"same_order": result["same_order"], "speedup": result["speedup"]}))


if __name__ == "__main__":
    main()
