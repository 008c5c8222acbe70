"""BlockPruner's removal order: the reference code's search against secateur's, same search set.

    git clone https://github.com/MrGGLS/BlockPruner /tmp/ref/BlockPruner
    python bench/blockpruner_reference.py --ref /tmp/ref/BlockPruner --nsamples 4 --seqlen 128 \
        --steps 3 --threads 1

Runs the reference's own `block_search.block_search_by_ppl` (every remaining attention and MLP
block masked in turn, `utils.evaluate_ppl` on the whole search set, the lowest kept with a strict
`<`) and `secateur.prune(..., BlockPrunerConfig(blocks=steps, search_dtype="float32"))` (exact
search, no shortlist) on the same calibration windows of smollm2-135m, both in float32, and
writes both orders and their calibration perplexities to bench/results/blockpruner_reference.json.

One change to the reference, for transformers 5: its `MaskedLlamaDecoderLayer.forward` was
written for transformers 4 (attention returning three values, layers returning tuples); the
stand-in below computes the same function (a masked branch is skipped with its norm, the
residual passes through) with transformers 5's calling convention. Everything else (candidate
enumeration, masking, perplexity, selection) is the reference's code, imported from --ref.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

OUT = Path(__file__).parent / "results" / "blockpruner_reference.json"


def masked_forward(self, hidden_states, attention_mask=None, position_ids=None,
                   position_embeddings=None, **kwargs):
    """The reference layer's forward for transformers 5: same branches, same skips."""
    kwargs.pop("output_attentions", None)
    if "mha" not in self.mask_block:
        residual = hidden_states
        out, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states),
                                attention_mask=attention_mask, position_ids=position_ids,
                                position_embeddings=position_embeddings, **kwargs)
        hidden_states = residual + out
    if "mlp" not in self.mask_block:
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states))
    return hidden_states


def reference_order(ref: Path, model_path: str, windows: list[torch.Tensor], steps: int,
                    batch_size: int) -> tuple[list[str], list[float], float]:
    sys.path.insert(0, str(ref))
    block_search = importlib.import_module("block_search")
    block_search.MaskedLlamaDecoderLayer.forward = masked_forward
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 use_cache=False)
    model.eval()
    loader = DataLoader([{"input_ids": w[0]} for w in windows], batch_size=batch_size)
    printed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = argparse.Namespace(del_block_num=steps, block_type="mix", cal_dataset="c4-sample",
                                  ppl_search_path=tmp, model_path=model_path, cal_nsamples=len(
                                      windows))
        t = time.perf_counter()
        import builtins
        real_print = builtins.print
        builtins.print = lambda *a, **k: (printed.append(" ".join(map(str, a))),
                                          real_print(*a, **k))
        try:
            block_search.block_search_by_ppl(args, model, loader)
        finally:
            builtins.print = real_print
        seconds = time.perf_counter() - t
        (found,) = Path(tmp).glob("*.json")
        sets = json.loads(found.read_text())
    order, before = [], set()
    for step in range(1, steps + 1):
        now = {(kind, int(i)) for kind, i in sets[str(step)]}
        (new,) = now - before
        order.append(f"{new[1]}.{'attn' if new[0] == 'mha' else 'mlp'}")
        before = now
    ppls = [float(line.split(": ")[1]) for line in printed if line.startswith("best_ppl")]
    return order, ppls, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", type=Path, required=True, help="checkout of MrGGLS/BlockPruner")
    ap.add_argument("--calib", default="c4-sample")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8, help="the reference's ppl batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not (args.ref / "block_search.py").is_file():
        ap.error(f"--ref {args.ref}: no block_search.py there; clone MrGGLS/BlockPruner")
    torch.set_num_threads(args.threads)

    from tool_speed import machine

    import secateur
    from secateur.api import calibration_data
    from secateur.formats.loader import load
    from secateur.io import write_json_atomic

    base = load("smollm2-135m")
    calib = secateur.CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed)
    windows = calibration_data(base, calib)[0]
    t = time.perf_counter()
    run = secateur.prune(base, secateur.BlockPrunerConfig(blocks=args.steps,
                                                          search_dtype="float32"),
                         data=calib, progress=False)
    ours_seconds = time.perf_counter() - t
    ours = run.summary
    order, ppls, ref_seconds = reference_order(args.ref, str(base.path), windows, args.steps,
                                               args.batch_size)
    result = {
        "model": "smollm2-135m",
        "search_set": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
                       "seed": args.seed},
        "steps": args.steps, "dtype": "float32", "threads": args.threads,
        "machine": machine(),  # CPU, its bf16 flags, threads, load average, versions
        "reference": {"order": order, "calibration_ppl_after_each": ppls,
                      "seconds": round(ref_seconds, 1),
                      "code": "MrGGLS/BlockPruner block_search.block_search_by_ppl, "
                              "utils.evaluate_ppl (layer forward ported to transformers 5)"},
        "secateur": {"order": ours["removed"],
                     "calibration_ppl_after_each": ours["calibration_perplexity"][1:],
                     "seconds": round(ours_seconds, 1), "search": ours.get("search")},
    }
    result["same_order"] = result["reference"]["order"] == result["secateur"]["order"]
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
