"""Issue-3 benchmark: each sparsity method on smollm2-135m, pruning time, peak memory, perplexity.

    python bench/sparsity_methods.py            # all methods -> bench/results/sparsity_methods.json

Protocol: 32 calibration windows of 512 tokens from `c4-sample`, seed 0; perplexity on `wiki`,
the first 64 non-overlapping windows of 512 tokens. Every method runs in its own process so
that its wall time and peak resident memory (ru_maxrss, model load included) are its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sparsity_methods.json"
MODEL = "smollm2-135m"
RUNS = [("magnitude", "0.5"), ("wanda", "0.5"), ("sparsegpt", "0.5"),
        ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
        ("wanda", "0.7"), ("wanda+owl", "0.7")]


def _one(method: str, target: str, dense_ppl: float | None) -> dict:
    from secateur.api import CalibrationConfig
    from secateur.jobs import EvalSpec, prune_job
    from secateur.registry import make_config

    name, owl = method.removesuffix("+owl"), method.endswith("+owl")
    options = make_config(dict(method=name, owl=owl,
                               **({"nm": target} if ":" in target
                                  else {"sparsity": float(target)})))
    result = prune_job(MODEL, options, CalibrationConfig("c4-sample", 32, 512, 0),
                       EvalSpec("wiki", 512, 64), out=None, progress=False,
                       dense_perplexity=dense_ppl).to_json()
    keep = ("perplexity", "dense_perplexity", "sparsity", "timings", "peak_rss_mib", "protocol",
            "calibration")
    return {"method": method, "target": target, **{k: result.get(k) for k in keep}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "TARGET"))
    parser.add_argument("--dense-ppl", type=float)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(*args.one, args.dense_ppl)))
        return
    from secateur.formats.loader import load
    from secateur.jobs import EvalSpec, evaluate_perplexity

    dense = evaluate_perplexity(load(MODEL), EvalSpec("wiki", 512, 64), progress=False)
    rows = []
    for method, target in RUNS:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--one", method, target,
                              "--dense-ppl", str(dense.perplexity)],
                             check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["process_seconds"] = time.perf_counter() - t
        rows.append(row)
        print(f"{method:>12} {target:>4}  ppl {row['perplexity']:8.2f}  "
              f"prune {row['timings']['prune_seconds']:6.1f} s  "
              f"peak {row['peak_rss_mib']:6.0f} MiB", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": MODEL, "dense_perplexity": dense["perplexity"],
                                   "dense_protocol": dense["protocol"], "runs": rows},
                                  indent=2) + "\n")
    print(f"dense ppl {dense['perplexity']:.2f}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
