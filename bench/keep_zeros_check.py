"""The per-channel w4 GPTQ run of bench/quant_reference.py with keep_zeros=false: does keeping
smollm2's exactly-zero weights at zero explain secateur's 3.3% gap to the reference?

    python bench/keep_zeros_check.py   # -> bench/results/quant_reference_keep_zeros.json
"""
import json
from pathlib import Path

import torch

from secateur.api import CalibrationConfig, quantize
from secateur.eval.api import evaluate
from secateur.eval.config import PerplexityConfig
from secateur.formats.loader import load
from secateur.io import write_json_atomic
from secateur.methods.gptq import GPTQConfig


def main() -> None:
    torch.set_num_threads(2)
    loaded = load("smollm2-135m")
    cfg = GPTQConfig(bits=4, group_size=-1, symmetric=False, keep_zeros=False)
    quantize(loaded, cfg, data=CalibrationConfig("c4-sample", 32, 512, 0), progress=False)
    r = evaluate(loaded, PerplexityConfig(data="wiki", seqlen=512, max_windows=64), progress=False)
    row = {"run": "gptq-w4-channel", "settings": cfg.to_dict(),
           "calibration": {"source": "c4-sample", "nsamples": 32, "seqlen": 512, "seed": 0},
           "evaluation": r.protocol.to_dict(), "perplexity": r.perplexity,
           "compare": "bench/results/quant_reference.json gptq-w4-channel: secateur (keep_zeros) "
                      "39.33, reference 40.68"}
    write_json_atomic(Path(__file__).parent / "results" / "quant_reference_keep_zeros.json", row)
    print(json.dumps({"keep_zeros": False, "ppl": r.perplexity}))


if __name__ == "__main__":
    main()
