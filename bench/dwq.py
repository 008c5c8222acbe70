"""DWQ on a bundled model: perplexity of the dense model, of its GGUF quantization, and after DWQ
learnt that quantization's scales from the dense model, on wiki and on a text neither the
calibration nor the training saw (tiny-stories); the share of the quantization gap closed.

    python bench/dwq.py --model smollm2-135m --preset q4_0 --steps 300 \
        --out bench/results/dwq_smollm2-135m_q4_0.json

The result is written after every phase, so a long run shows where it is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from secateur.api import CalibrationConfig, quantize
from secateur.data.sources import load_text
from secateur.eval.perplexity import perplexity
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.methods.gguf import GGUFConfig
from secateur.recovery.dwq import DWQConfig, dwq, frozen_codes

TEXTS = ("wiki", "tiny-stories")


def scores(loaded, windows: int, seqlen: int) -> dict[str, float]:
    return {name: perplexity(loaded.model, loaded.tokenizer, load_text(name), seqlen, windows,
                             progress=False).perplexity for name in TEXTS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="q4_0")
    ap.add_argument("--rounding", default="gptq")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    record: dict = {"settings": vars(args) | {"out": str(args.out)}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))

    teacher = load(args.model)
    record["dense"] = scores(teacher, args.windows, args.eval_seqlen)
    save()
    saved = args.out.with_suffix(".quantized")
    if saved.is_dir():  # the rounding of an earlier run (minutes at one thread), reused
        student = load(saved)  # with its block codes (formats.ggml_blocks)
    else:
        student = load(args.model)
        begin = time.perf_counter()
        quantize(student, GGUFConfig(preset=args.preset, rounding=args.rounding),
                 CalibrationConfig(source="c4-sample", nsamples=64, seqlen=512, seed=0),
                 progress=False)
        record["quantize_seconds"] = time.perf_counter() - begin
        save_model(student.model, student.tokenizer, saved, own_state=True)
    record["quantized"] = scores(student, args.windows, args.eval_seqlen)
    save()
    codes = frozen_codes(student.model)
    config = DWQConfig(data="c4-sample", steps=args.steps, lr=args.lr, seqlen=args.seqlen,
                       batch_size=args.batch_size, heldout_every=max(1, args.steps // 6))
    result = dwq(student, teacher, config, progress=True)
    after = frozen_codes(student.model)
    record["codes_unchanged"] = all(torch.equal(codes[k], after[k]) for k in codes)
    record["dwq"] = {"seconds": result.seconds, "tokens": result.tokens, "evals": result.evals,
                     "extra": result.extra, "losses_every_10": result.losses[::10]}
    record["after_dwq"] = scores(student, args.windows, args.eval_seqlen)
    record["gap_closed"] = {
        t: (record["quantized"][t] - record["after_dwq"][t])
        / (record["quantized"][t] - record["dense"][t]) for t in TEXTS}
    save()
    print(json.dumps({k: record[k] for k in ("dense", "quantized", "after_dwq", "gap_closed",
                                             "codes_unchanged")}, indent=1))


if __name__ == "__main__":
    main()
