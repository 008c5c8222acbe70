"""How fast recovery trains on this CPU, per setting, before the long recovery runs.

    python bench/train_speed.py            # -> bench/results/train_speed.json (a quiet machine)

The student and shapes of bench/recovery.py: smollm2-135m with ShortGPT's 8 of 30 layers
removed, windows of 512 c4-sample tokens, 4 per step, AdamW, the dense model as teacher. Each
setting runs `--steps` optimizer steps through the same trainer the benchmark uses; the first
is a warm-up (allocator, thread pool, peft wrapping) and the rest are timed one by one.
Settings: KD with full fine-tuning (the benchmark's slowest arm) in fp32 and under bf16
autocast, on 1 and 2 threads; LoRA on the LM loss in fp32 and bf16; KD with the teacher's
top-k distribution cached before training (`teacher_cache: topk`), whose one-off teacher
pass is reported apart from the steps; KD under torch.compile (`compile: true`), whose
compilation falls in the warm-up step; KD with the lm_head and loss fused a chunk of
positions at a time (`fused_loss: true`). `--repeats N` runs the settings N times in turn
(A B A B ...), so a slow spell of the machine hits every setting alike. Ratios are against
KD full fp32 on 1 thread, the setting recovery.json's runs use, all measured in this one run.
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from secateur.api import CalibrationConfig, prune
from secateur.formats.loader import load
from secateur.io import write_json_atomic
from secateur.recovery.distill import DistillConfig, distill
from secateur.registry import make_config

RESULTS = Path(__file__).parent / "results"
SETTINGS: dict[str, dict[str, Any]] = {
    "kd-full fp32 1t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0, "threads": 1},
    "kd-full bf16 1t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0, "threads": 1,
                        "bf16": True},
    "kd-full fp32 2t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0, "threads": 2},
    "kd-full bf16 2t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0, "threads": 2,
                        "bf16": True},
    "lora-lm fp32 1t": {"train": "lora", "kd_weight": 0.0, "ce_weight": 1.0, "threads": 1},
    "lora-lm bf16 1t": {"train": "lora", "kd_weight": 0.0, "ce_weight": 1.0, "threads": 1,
                        "bf16": True},
    "kd-full compile fp32 1t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0,
                                "threads": 1, "compile": True},
    "kd-full fused fp32 1t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0,
                              "threads": 1, "fused_loss": True},
    "kd-full fused bf16 2t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0,
                              "threads": 2, "bf16": True, "fused_loss": True},
    "kd-full topk-cache fp32 1t": {"train": "full", "kd_weight": 1.0, "ce_weight": 0.0,
                                   "threads": 1, "teacher_cache": "topk"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds over the settings, interleaved (A B A B ...)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = load("smollm2-135m")
    student = copy.deepcopy(dense)
    torch.set_num_threads(2)
    prune(student, make_config({"method": "shortgpt", "layers": 8}, kind="prune"),
          CalibrationConfig("c4-sample", 4, 512, 0), progress=False)
    result: dict[str, Any] = {
        "model": "smollm2-135m", "student": "shortgpt 8 of 30 layers removed",
        "batch_size": args.batch_size, "seqlen": args.seqlen, "steps": args.steps,
        "timed_steps": args.steps - 1,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "command": shlex.join(["python", "bench/train_speed.py", *sys.argv[1:]]),
        "repeats": args.repeats, "settings": {}}
    rounds = [name for _ in range(args.repeats) for name in args.settings.split(",")]
    for name in rounds:
        spec = dict(SETTINGS[name])
        threads = spec.pop("threads")
        torch.set_num_threads(threads)
        config = DistillConfig(data="c4-sample", steps=args.steps, seqlen=args.seqlen,
                               batch_size=args.batch_size, lr=5e-5, warmup_steps=1,
                               heldout_windows=0, save_every=args.steps + 1, seed=0, **spec)
        run = copy.deepcopy(student)
        marks: list[float] = []
        begin = time.perf_counter()
        distill(run, dense, config, progress=False,
                on_step=lambda step, loss, marks=marks: marks.append(time.perf_counter()))
        total = time.perf_counter() - begin
        earlier = result["settings"].get(name, {})
        steps = earlier.get("step_seconds", []) + \
            [b - a for a, b in zip(marks, marks[1:], strict=False)]
        tokens = args.batch_size * args.seqlen
        row = {"threads": threads, **spec, "step_seconds": steps,
               "min_step_seconds": min(steps), "median_step_seconds": statistics.median(steps),
               "max_step_seconds": max(steps),
               "tokens_per_second": tokens / statistics.median(steps),
               "first_step_and_setup_seconds": marks[0] - begin,
               "total_seconds": earlier.get("total_seconds", 0.0) + total}
        result["settings"][name] = row
        base = result["settings"].get("kd-full fp32 1t")
        if base:
            for r in result["settings"].values():
                r["speedup_vs_kd_full_fp32_1t"] = (base["median_step_seconds"]
                                                   / r["median_step_seconds"])
        write_json_atomic(args.out, result)
        print(f"{name}: {row['median_step_seconds']:.2f} s/step "
              f"({row['tokens_per_second']:.0f} tok/s), steps {[round(s, 2) for s in steps]}",
              flush=True)
        del run


if __name__ == "__main__":
    main()
