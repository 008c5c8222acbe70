"""The frontier in llama.cpp for a bundled model, into bench/results/frontier-MODEL/.

    python bench/frontier.py                      # smollm2-135m, quality only
    python bench/frontier.py --speed --resume     # add decode/prefill speed (a quiet machine)
    python bench/frontier.py --resume --pruned DIR/shortgpt-8-layers-kd-full,...
                                                  # pruned (recovered) models on the ladder

The same measurement as `secateur frontier` (secateur/frontier.py says what each point is),
with the benchmark's defaults: llama.cpp's ladder q8_0 .. q4_0 without and with an imatrix,
secateur's rtn and gptq (in order and act-order) at q5_k_m, q4_k_m, q4_1 and q4_0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from secateur.api import CalibrationConfig
from secateur.frontier import FrontierSpec, frontier
from secateur.report.frontier import winners

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--presets", default="q8_0,q6_k,q5_k_m,q4_k_m,q4_1,q4_0")
    parser.add_argument("--secateur-presets", default="q5_k_m,q4_k_m,q4_1,q4_0")
    parser.add_argument("--roundings", default="rtn,gptq,gptq-act-order")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of frontier.json (default results/frontier-MODEL)")
    parser.add_argument("--pruned", default="",
                        help="comma-separated folders of pruned (recovered) models of MODEL")
    parser.add_argument("--pruned-presets", default="q4_k_m")
    parser.add_argument("--pruned-roundings", default="rtn")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = lambda s: tuple(s.split(","))  # noqa: E731
    calib = CalibrationConfig("c4-sample", args.nsamples, 512, 0)
    spec = FrontierSpec(split(args.presets), split(args.secateur_presets),
                        split(args.roundings), calib, args.windows, 512, args.threads, args.speed,
                        pruned=tuple(p for p in args.pruned.split(",") if p),
                        pruned_presets=split(args.pruned_presets),
                        pruned_roundings=split(args.pruned_roundings))
    out = args.out or RESULTS / f"frontier-{args.model}"
    result = frontier(args.model, spec, out, args.resume)
    print("beats every llama.cpp point of no more bytes (wiki):", ", ".join(winners(result)))


if __name__ == "__main__":
    main()
