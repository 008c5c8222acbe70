"""One process vs `torchrun --nproc-per-node 2 -m secateur` (gloo, CPU) on a real model.

Wanda 50%: are the masks (and kept weights) identical? GPTQ 4-bit: how far apart are the
perplexities? Also how far the all-reduced statistics can sit from one process's: each
layer's Wanda sums of squares (float64) and GPTQ Hessian X^T X (float32), summed over all
windows in one pass vs over each rank's half and then added (what a 2-rank all-reduce does),
on the dense model. Each rank runs with OMP_NUM_THREADS=1.

    .venv/bin/python bench/distributed_check.py --out bench/results/distributed_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from secateur import distributed

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print("$", shlex.join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def _both(args: list[str], folder: Path, name: str) -> dict:
    """The same command in one process and under torchrun with 2 ranks."""
    out: dict = {}
    for ranks in (1, 2):
        launcher = [PYTHON, "-m", "secateur"] if ranks == 1 else [
            TORCHRUN, "--nproc-per-node", "2", "-m", "secateur"]
        target = folder / f"{name}-{ranks}"
        cmd = [*launcher, *args, "--json", f"{target}.json"]
        if name == "wanda":
            cmd += ["--out", str(target)]
        seconds = _run(cmd)
        shown = [*launcher[:-2], "-m", "secateur", *args, "--json", f"{name}-{ranks}.json"]
        if name == "wanda":
            shown += ["--out", f"{name}-{ranks}"]
        out[ranks] = {"command": shlex.join(Path(c).name if c in (PYTHON, TORCHRUN) else c
                                            for c in shown),
                      "wall_seconds": round(seconds, 1),
                      "result": json.loads(Path(f"{target}.json").read_text())}
    return out


def compare_masks(one: Path, two: Path) -> dict:
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    pruned = [k for k in a if k.endswith("proj.weight")]
    differ = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in pruned)
    total = sum(a[k].numel() for k in pruned)
    return {"matrices": len(pruned), "entries": total, "mask_entries_differing": differ,
            "tensors_bit_identical": sum(torch.equal(a[k], b[k]) for k in a),
            "tensors": len(a),
            "max_abs_weight_difference": max(float((a[k].float() - b[k].float()).abs().max())
                                             for k in a)}


def statistic_split_error(model: str, nsamples: int, seqlen: int) -> dict:
    """Per statistic: the largest relative difference, over all layers and projections, of
    the sum over all windows vs the sum of the two halves' sums."""
    from secateur.api import CalibrationConfig, resolve_data
    from secateur.engine.sequential import collect_layer_stats
    from secateur.formats.loader import load
    from secateur.stats import ColumnSquares, Hessian

    loaded = load(model)
    windows, _ = resolve_data(loaded, CalibrationConfig("c4-sample", nsamples, seqlen, 0), 0)
    half = len(windows) // 2

    def gather(part: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        got: list[dict[str, torch.Tensor]] = []

        def on_layer(index, projections, stats) -> None:
            got.append({f"{name}.{s.name}": (s.sum.clone()) for name, per in stats.items()
                        for s in per.values()})

        collect_layer_stats(loaded.model, loaded.adapter, part, (ColumnSquares, Hessian),
                            on_layer, progress=False)
        return got

    full, first, second = gather(windows), gather(windows[:half]), gather(windows[half:])
    worst: dict[str, float] = {}
    for f, a, b in zip(full, first, second, strict=True):
        for key, value in f.items():
            kind = key.rsplit(".", 1)[1]
            rel = float(((a[key] + b[key]) - value).abs().max() / value.abs().max())
            worst[kind] = max(worst.get(kind, 0.0), rel)
    return {"max_relative_difference": worst,
            "how": "per layer and projection, max |(sum over half A + sum over half B) - sum "
                   "over all windows| / max |sum over all windows|, on the dense model"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--out", type=Path, default=Path("bench/results/distributed_smollm2.json"))
    args = p.parse_args()
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wanda = _both(["prune", args.model, "--method", "wanda", "--sparsity", "0.5", *calib,
                       "--eval", "none"], folder, "wanda")
        masks = compare_masks(folder / "wanda-1", folder / "wanda-2")
        gptq = _both(["quantize", args.model, "--method", "gptq", "--bits", "4",
                      "--group-size", "64", *calib, "--eval-windows",
                      str(args.eval_windows)], folder, "gptq")
    ppl = {r: gptq[r]["result"]["perplexity"] for r in (1, 2)}
    errors = [(a["relative_error"], b["relative_error"]) for a, b in zip(
        gptq[1]["result"]["layers"], gptq[2]["result"]["layers"], strict=True)]
    result = {
        "model": args.model,
        "calibration": {"source": "c4-sample", "nsamples": args.nsamples,
                        "seqlen": args.seqlen, "windows_per_rank": args.nsamples // 2},
        "backend": "gloo (CPU), 2 ranks, OMP_NUM_THREADS=1 per rank",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   "shared with other jobs: wall times are indicative only",
        "torch": torch.__version__,
        "wanda_50": {"masks": masks, "runs": {r: {k: v for k, v in wanda[r].items()
                                                  if k != "result"} for r in (1, 2)},
                     "distributed_record": {r: wanda[r]["result"]["distributed"]
                                            for r in (1, 2)}},
        "gptq_4bit_g64": {
            "perplexity": ppl,
            "relative_difference": abs(ppl[2] - ppl[1]) / ppl[1],
            "dense_perplexity": gptq[1]["result"].get("dense_perplexity"),
            "eval": {"data": "wiki", "windows": args.eval_windows, "seqlen": args.seqlen},
            "max_layer_output_error_relative_difference": max(
                abs(a - b) / a for a, b in errors if a),
            "runs": {r: {k: v for k, v in gptq[r].items() if k != "result"} for r in (1, 2)},
        },
        "statistics_one_pass_vs_two_halves": statistic_split_error(
            args.model, args.nsamples, args.seqlen),
    }
    assert not distributed.active()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
