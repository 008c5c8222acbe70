"""Peak memory of a recovery training step, per setting of bench/train_speed.py.

    python bench/train_memory.py --settings "kd-full fp32 1t,kd-full fused fp32 1t"
    # -> bench/results/train_memory.json

Each setting runs in a fresh process of its own (a process's peak resident set only grows, so
settings cannot share one): the benchmark's ShortGPT-8 student and dense teacher are built,
the peak is read, two training steps run, and the peak is read again. The difference is what
training adds on top of the two models; the losses are recorded so a setting that changes the
arithmetic would show.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(name: str, steps: int, batch_size: int, seqlen: int) -> dict[str, Any]:
    import torch
    from train_speed import SETTINGS

    from secateur.api import CalibrationConfig, prune
    from secateur.formats.loader import load
    from secateur.recovery.distill import DistillConfig, distill
    from secateur.registry import make_config

    spec = dict(SETTINGS[name])
    torch.set_num_threads(spec.pop("threads"))
    dense = load("smollm2-135m")
    student = copy.deepcopy(dense)
    prune(student, make_config({"method": "shortgpt", "layers": 8}, kind="prune"),
          CalibrationConfig("c4-sample", 4, 512, 0), progress=False)
    before = _peak_mib()
    config = DistillConfig(data="c4-sample", steps=steps, seqlen=seqlen, batch_size=batch_size,
                           lr=5e-5, warmup_steps=1, heldout_windows=0, save_every=steps + 1,
                           seed=0, **spec)
    run = distill(student, dense, config, progress=False)
    after = _peak_mib()
    return {**SETTINGS[name], "peak_mib_models": before, "peak_mib_training": after,
            "added_by_training_mib": after - before, "losses": run.losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="kd-full fp32 1t,kd-full fused fp32 1t")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_memory.json")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's setting
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.steps, args.batch_size, args.seqlen)))
        return

    from secateur.io import write_json_atomic

    result: dict[str, Any] = {
        "model": "smollm2-135m", "student": "shortgpt 8 of 30 layers removed",
        "batch_size": args.batch_size, "seqlen": args.seqlen, "steps": args.steps,
        "measure": "peak resident set (ru_maxrss) of a fresh process per setting",
        "command": shlex.join(["python", "bench/train_memory.py", *sys.argv[1:]]),
        "settings": {}}
    for name in args.settings.split(","):
        child = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen)],
            check=True, capture_output=True, text=True)
        row = json.loads(child.stdout.strip().splitlines()[-1])
        result["settings"][name] = row
        write_json_atomic(args.out, result)
        print(f"{name}: peak {row['peak_mib_training']:.0f} MiB "
              f"(+{row['added_by_training_mib']:.0f} MiB for training)", flush=True)


if __name__ == "__main__":
    main()
