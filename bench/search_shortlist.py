"""Does `--search-shortlist K` pick the same blocks as BlockPruner's exact greedy search?

Runs `secateur.prune` with `--method blockpruner --blocks STEPS` twice on smollm2-135m with the
same calibration windows, exact (every candidate on every window) and shortlisted (every
candidate screened on a quarter of the windows, the K best scored on all), and writes both
removal orders, the per-step calibration perplexities and the time each took to
bench/results/search_shortlist.json.

    python bench/search_shortlist.py --nsamples 16 --seqlen 512 --steps 5 --shortlist 6
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from secateur.api import CalibrationConfig, prune
from secateur.formats.loader import load
from secateur.io import write_json_atomic
from secateur.models.loading import copy_loaded
from secateur.registry import make_config

OUT = Path(__file__).parent / "results" / "search_shortlist.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shortlist", type=int, default=6)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load("smollm2-135m")
    spec = CalibrationConfig("c4-sample", args.nsamples, args.seqlen, 0)
    runs = {}
    for name, k in (("exact", None), (f"shortlist_{args.shortlist}", args.shortlist)):
        work = copy_loaded(base)
        run = prune(work, make_config(dict(method="blockpruner", blocks=args.steps,
                                           search_shortlist=k)), spec)
        s = run.summary
        runs[name] = {"removed": s["removed"],
                      "calibration_perplexity": s["calibration_perplexity"],
                      "seconds": s["search"]["seconds"], "search": s["search"]}
        print(name, s["removed"], f"{s['search']['seconds']:.0f} s", flush=True)
    quick = runs[f"shortlist_{args.shortlist}"]
    result = {"model": "smollm2-135m", "calibration": vars(args) | {"out": str(args.out)},
              "runs": runs, "same_order": runs["exact"]["removed"] == quick["removed"],
              "speedup": runs["exact"]["seconds"] / quick["seconds"]}
    write_json_atomic(args.out, result)
    print(json.dumps({"same_order": result["same_order"], "speedup": result["speedup"]}))


if __name__ == "__main__":
    main()
