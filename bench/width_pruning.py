"""Width pruning (llm-pruner) on smollm2-135m: every estimator at 20% and 40% of decoder
parameters removed; parameters, bytes on disk, wiki perplexity before and after a short LoRA
recovery, and prefill/decode speed of pruned vs dense measured in this same process.

    python bench/width_pruning.py                       # writes bench/results/width_pruning.json
    python bench/width_pruning.py --ratios 0.2 --estimators taylor,l2 --lora-steps 10
    python bench/width_pruning.py --zeroshot-only --estimators activation --ratios 0.2,0.4 \
        --zeroshot-limit 300 --threads 1   # adds zero-shot of the LoRA-healed models

Small on purpose (the machine has 2 shared cores); the protocol is written into the JSON.
Results are rewritten after every configuration, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from secateur.api import CalibrationConfig, count_parameters, prune
from secateur.bench.measure import decode_seconds, prefill_seconds
from secateur.data.sources import load_text
from secateur.eval.perplexity import perplexity
from secateur.formats.hf import save_model
from secateur.formats.loader import load
from secateur.io import dir_bytes, write_json_atomic
from secateur.methods.structured import decoder_parameters
from secateur.models.loading import Loaded, copy_loaded
from secateur.recovery.lora import LoRAConfig, train_lora
from secateur.registry import make_config

RESULTS = Path(__file__).parent / "results" / "width_pruning.json"


def eval_ppl(loaded: Loaded, args: argparse.Namespace) -> float:
    source = load_text("wiki", split="test")
    return perplexity(loaded.model, loaded.tokenizer, source, args.eval_seqlen,
                      args.eval_windows, progress=False).perplexity


def saved_bytes(loaded: Loaded) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        save_model(loaded.model, None, out)
        return dir_bytes(out)


def speed(dense: torch.nn.Module, pruned: torch.nn.Module, args: argparse.Namespace,
          seed: int) -> dict[str, Any]:
    """Interleaved dense/pruned rounds (after a warm-up round); medians and their ratios."""
    gen = torch.Generator().manual_seed(seed)
    vocab = dense.config.vocab_size
    prefill_ids = torch.randint(0, vocab, (1, args.prefill_tokens), generator=gen)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=gen)
    times: dict[str, dict[str, list[float]]] = {"dense": {"prefill": [], "decode": []},
                                                "pruned": {"prefill": [], "decode": []}}
    for r in range(args.repeats + 1):
        for name, model in (("dense", dense), ("pruned", pruned)):
            p = prefill_seconds(model, prefill_ids)
            d = decode_seconds(model, prompt, args.decode_tokens) * args.decode_tokens
            if r > 0:  # round 0 warms up allocators and caches
                times[name]["prefill"].append(p)
                times[name]["decode"].append(d)
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    return {
        "prefill_tokens_per_s": {n: args.prefill_tokens / m["prefill"] for n, m in med.items()},
        "decode_tokens_per_s": {n: args.decode_tokens / m["decode"] for n, m in med.items()},
        "prefill_speed_ratio": med["dense"]["prefill"] / med["pruned"]["prefill"],
        "decode_speed_ratio": med["dense"]["decode"] / med["pruned"]["decode"],
        "raw_seconds": times,
    }


def add_zeroshot(args: argparse.Namespace, dense: Loaded, calib: CalibrationConfig,
                 lora: LoRAConfig) -> None:
    """Rebuild each stored run's model (prune + LoRA, deterministic given the seed), check it
    is the one measured (same perplexity), and store its zero-shot accuracy in the results."""
    from depth_criteria import zeroshot  # the depth benchmark's summary: same tasks, same keys

    result = json.loads(args.out.read_text())
    wanted = {(float(r), e) for r in args.ratios.split(",") for e in args.estimators.split(",")}
    for entry in result["runs"]:
        if (entry["ratio"], entry["importance"]) not in wanted:
            continue
        if entry.get("zeroshot_after_lora", {}).get("limit") == args.zeroshot_limit:
            continue
        torch.manual_seed(args.seed)
        loaded = copy_loaded(dense)
        prune(loaded, make_config(dict(method="llm-pruner", ratio=entry["ratio"],
                                       importance=entry["importance"],
                                       allocation=args.allocation, gqa_mode=args.gqa_mode,
                                       protect_first=args.protect_first,
                                       protect_last=args.protect_last)),
              calib, progress=False)
        train_lora(loaded, lora, checkpoint=None, progress=False)
        ppl = eval_ppl(loaded, args)
        # runs stored before each configuration was reseeded drew LoRA's initial weights from a
        # generator earlier runs had advanced: same recipe, not the same bits; a gross
        # difference would mean other settings
        if abs(ppl / entry["perplexity_after_lora"] - 1) > 0.05:
            raise SystemExit(f"{entry['importance']} {entry['ratio']}: rebuilt model has ppl "
                             f"{ppl:.3f}, the stored run {entry['perplexity_after_lora']:.3f}; "
                             "not the same settings?")
        entry["zeroshot_after_lora"] = {**zeroshot(loaded, args),
                                        "rebuilt_model_wiki_ppl": ppl}
        current = json.loads(args.out.read_text())
        for other in current["runs"]:
            if (other["ratio"], other["importance"]) == (entry["ratio"], entry["importance"]):
                other["zeroshot_after_lora"] = entry["zeroshot_after_lora"]
        current["protocol"]["zeroshot"] = (
            f"lm-eval {args.zeroshot_tasks}, first {args.zeroshot_limit} documents each, "
            "acc_norm where the task has it; on the model after LoRA, rebuilt with the same "
            "settings (its wiki ppl stored beside: LoRA's initial weights differ from the "
            "stored run's, whose generator earlier runs had advanced)")
        write_json_atomic(args.out, current)
        print(f"{entry['importance']} {entry['ratio']}: zero-shot "
              f"{entry['zeroshot_after_lora']['average']:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.2,0.4")
    ap.add_argument("--estimators", default="taylor,l2,random,activation")
    ap.add_argument("--allocation", default="uniform")
    ap.add_argument("--gqa-mode", default="kv")
    ap.add_argument("--protect-first", type=int, default=None, help="default: the method's")
    ap.add_argument("--protect-last", type=int, default=None, help="default: the method's")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--lora-steps", type=int, default=12)
    ap.add_argument("--lora-seqlen", type=int, default=128)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--zeroshot-only", action="store_true",
                    help="add zero-shot accuracy to the runs stored in --out (no re-measure)")
    ap.add_argument("--zeroshot-limit", type=int, default=300)
    ap.add_argument("--zeroshot-tasks", default="arc_easy,piqa,hellaswag,winogrande")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    estimators = args.estimators.split(",")

    torch.manual_seed(args.seed)
    dense = load("smollm2-135m")
    calib = CalibrationConfig("c4-sample", args.nsamples, args.seqlen, args.seed)
    lora = LoRAConfig(data="c4-sample", steps=args.lora_steps, seqlen=args.lora_seqlen,
                      lr=args.lora_lr, warmup_steps=min(5, args.lora_steps), seed=args.seed)
    if args.zeroshot_only:
        add_zeroshot(args, dense, calib, lora)
        return
    result: dict[str, Any] = {
        "model": "smollm2-135m",
        "protocol": {
            "perplexity": f"wiki test (exllamav3 wiki.utf8, not WikiText-2), seqlen "
                          f"{args.eval_seqlen}, first {args.eval_windows} non-overlapping "
                          "windows, float32",
            "calibration": f"c4-sample, {args.nsamples} windows x {args.seqlen} tokens, "
                           f"seed {args.seed}",
            "pruning": f"llm-pruner, allocation {args.allocation}, gqa mode {args.gqa_mode}, "
                       f"protected first/last layers {args.protect_first}/{args.protect_last} "
                       "(None: the method's default, ~n/8 and ~n/16); ratio = share of "
                       "decoder parameters removed",
            "lora": f"{lora.steps} steps x {lora.batch_size} window x {lora.seqlen} tokens of "
                    f"c4-sample, rank {lora.rank}, alpha {lora.alpha}, lr {lora.lr}, "
                    "merged; evaluated on wiki as above",
            "speed": f"same process, float32 CPU, {torch.get_num_threads()} threads, batch 1; "
                     f"prefill {args.prefill_tokens} tokens without cache; decode "
                     f"{args.decode_tokens} greedy tokens with KV cache after a "
                     f"{args.prompt_tokens}-token prompt; dense and pruned interleaved, "
                     f"median of {args.repeats} rounds after 1 warm-up round; ratio = "
                     "dense seconds / pruned seconds (>1: pruned faster). Uniform "
                     "allocation gives every estimator the same shapes, so speed is measured "
                     "once per ratio (on the first estimator's model).",
            "machine": f"{platform.machine()} {platform.processor() or ''}; 2 cores shared "
                       "with other jobs, so absolute speeds are noisy",
            "torch": torch.__version__,
        },
        "dense": {
            "parameters": count_parameters(dense.model)["parameters"],
            "decoder_parameters": decoder_parameters(dense.adapter),
            "bytes_on_disk": saved_bytes(dense),
            "perplexity": eval_ppl(dense, args),
        },
        "runs": [],
    }
    write_json_atomic(args.out, result)
    speeds: dict[float, dict[str, Any]] = {}
    configs = [(r, e) for r in ratios for e in estimators]
    for ratio, estimator in tqdm(configs, desc="width pruning bench"):
        # each configuration from the same generator state: a run (and --zeroshot-only's
        # rebuild) must not depend on which configurations ran before it
        torch.manual_seed(args.seed)
        loaded = copy_loaded(dense)
        options = make_config(dict(method="llm-pruner", ratio=ratio, importance=estimator,
                                   allocation=args.allocation, gqa_mode=args.gqa_mode,
                                   protect_first=args.protect_first,
                                   protect_last=args.protect_last))
        run = prune(loaded, options, calib, progress=False)
        entry: dict[str, Any] = {
            "ratio": ratio, "importance": estimator,
            "parameters": count_parameters(loaded.model)["parameters"],
            "decoder_removed_share": run.summary["removed_share"],
            "config": run.summary["config"],
            "protected_layers": run.summary["protected_layers"],
            "pruned_layer_widths": run.summary["layer_widths"][0],
            "prune_seconds": run.seconds,
            "bytes_on_disk": saved_bytes(loaded),
            "perplexity": eval_ppl(loaded, args),
        }
        if ratio not in speeds:
            speeds[ratio] = speed(dense.model, loaded.model, args, args.seed)
        entry["speed"] = {k: v for k, v in speeds[ratio].items() if k != "raw_seconds"}
        if args.lora_steps > 0:
            rec = train_lora(loaded, lora, checkpoint=None, progress=False)
            entry["lora_steps"] = rec.steps
            entry["lora_seconds"] = rec.seconds
            entry["lora_loss_first_last"] = [rec.losses[0], rec.losses[-1]]
            entry["perplexity_after_lora"] = eval_ppl(loaded, args)
        result["runs"].append(entry)
        write_json_atomic(args.out, result)
        tqdm.write(f"{estimator} {ratio}: ppl {entry['perplexity']:.2f} -> "
                   f"{entry.get('perplexity_after_lora', float('nan')):.2f}, decode x"
                   f"{entry['speed']['decode_speed_ratio']:.2f}")
    result["speed_raw_seconds"] = {str(r): s["raw_seconds"] for r, s in speeds.items()}
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
