"""Issue 16, item 5: prune smollm2-135m in a process whose memory cap is below its fp32 size.

    python bench/over_memory.py              # -> bench/results/over_memory.json

The worker process sets RLIMIT_DATA before it imports torch. That limit covers the private
writable memory of the whole process (heap, anonymous mappings, so every CPU tensor) but not
the shared libraries' code pages, so everything the run allocates (interpreter, torch,
transformers, the embeddings while layer 0's inputs are captured, one decoder layer, the
activations, the method's scratch) has to fit under a cap below the model's fp32 weights. The
model is streamed from its cached safetensors (`secateur.load` caches it once, uncapped) with
one decoder layer resident at a time and written to a sharded output folder. Another process
then prunes the same model the ordinary way, in memory and uncapped, on the same calibration
windows, records its peak, and checks the streamed output is bit-identical to its result.

Peak RSS (VmHWM, which counts library pages too) is reported against the fp32 size. This is
not a timing benchmark; `seconds` is recorded only as what the run took on this machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "over_memory.json"
MIB = 2**20


def _status_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0]) / 1024


def _windows(tokenizer, nsamples: int, seqlen: int, seed: int):
    from secateur.data.sources import load_text
    from secateur.data.windows import calibration_windows

    return calibration_windows(tokenizer, load_text("c4-sample", split="train"), nsamples,
                               seqlen, seed)


def _method(sparsity: float):
    from secateur.methods import WandaConfig, build_method

    return build_method(WandaConfig(sparsity=sparsity))


def worker(args: argparse.Namespace) -> None:
    """Runs under the cap; everything heavy is imported after it is set."""
    cap = int(args.cap_bytes)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import torch

    from secateur.engine.streamed import prune_streamed
    from secateur.formats.streaming import load_streamed

    torch.set_num_threads(args.threads)
    loaded, weights = load_streamed(args.model)
    after_load = _status_mib("VmData")
    calib = _windows(loaded.tokenizer, args.nsamples, args.seqlen, args.seed)
    result = prune_streamed(loaded, weights, _method(args.sparsity), calib, Path(args.out_dir),
                            progress=False)
    record = result.to_dict()
    record.pop("layers")
    record["sparsity_achieved"] = (
        sum(m["sparsity"] * m["numel"] for r in result.layers for m in r["matrices"].values())
        / sum(m["numel"] for r in result.layers for m in r["matrices"].values()))
    record["vmdata_after_load_mib"] = after_load
    record["vmdata_end_mib"] = _status_mib("VmData")
    record["rlimit_data_bytes"] = resource.getrlimit(resource.RLIMIT_DATA)[0]
    Path(args.result).write_text(json.dumps(record))


def _fp32_bytes(folder: Path) -> int:
    """The weights at 4 bytes each, from the safetensors headers (a tied head is stored once)."""
    from secateur.formats.streaming import SafetensorsSource

    total = 0
    for header in SafetensorsSource(folder).headers.values():
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += 4 * n
    return total


def compare_worker(args: argparse.Namespace) -> None:
    """The same prune on the whole model in memory (uncapped, its own process so that its peak
    is its own), then every tensor compared with the streamed output."""
    import torch
    from transformers import AutoModelForCausalLM

    from secateur.engine.sequential import prune_layerwise
    from secateur.formats.loader import load

    torch.set_num_threads(args.threads)
    loaded = load(args.model)
    calib = _windows(loaded.tokenizer, args.nsamples, args.seqlen, args.seed)
    method = _method(args.sparsity)
    method.prepare(loaded.model, loaded.adapter, None)
    prune_layerwise(loaded.model, loaded.adapter, method, calib, progress=False)
    peak = _status_mib("VmHWM")
    streamed = AutoModelForCausalLM.from_pretrained(args.out_dir, dtype=torch.float32)
    ref = loaded.model.state_dict()
    got = streamed.state_dict()
    differ = [k for k in ref if k not in got or not torch.equal(ref[k], got[k])]
    Path(args.result).write_text(json.dumps({
        "in_memory_peak_rss_mib": peak, "tensors_compared": len(ref),
        "tensors_differing": differ[:10],
        "identical_to_in_memory_prune": not differ and ref.keys() == got.keys()}))


def _run_self(mode: str, args: argparse.Namespace, out_dir: Path, result: Path,
              *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, __file__, mode, "--model", args.model, "--nsamples",
         str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
         "--sparsity", str(args.sparsity), "--threads", str(args.threads), "--out-dir",
         str(out_dir), "--result", str(result), *extra],
        capture_output=True, text=True, timeout=3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cap-mib", type=float, help="RLIMIT_DATA of the worker (default: "
                        "the fp32 weights' size less 5%%)")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cap-bytes", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.compare_worker:
        compare_worker(args)
        return

    from secateur.errors import SecateurError
    from secateur.formats.loader import load
    from secateur.formats.streaming import streamable_path
    from secateur.io import write_json_atomic
    from secateur.outputs import check_output_file

    check_output_file(args.json)
    try:
        folder = streamable_path(args.model)
    except SecateurError:
        load(args.model)  # caches the built-in model as safetensors, uncapped
        folder = streamable_path(args.model)
    fp32 = _fp32_bytes(folder)
    cap = int(args.cap_mib * MIB) if args.cap_mib else int(fp32 * 0.95)
    record: dict = {
        "model": args.model, "source": str(folder), "fp32_mib": fp32 / MIB,
        "cap": {"kind": "RLIMIT_DATA set before importing torch (private writable memory of "
                        "the whole process)", "mib": cap / MIB, "below_fp32": cap < fp32},
        "method": {"method": "wanda", "sparsity": args.sparsity},
        "calibration": {"source": "c4-sample", "nsamples": args.nsamples,
                        "seqlen": args.seqlen, "seed": args.seed},
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory(prefix="over_memory.") as tmp:
        out_dir, result = Path(tmp) / "pruned", Path(tmp) / "result.json"
        start = time.perf_counter()
        run = _run_self("--worker", args, out_dir, result, "--cap-bytes", str(cap))
        record["worker_seconds"] = time.perf_counter() - start
        record["completed_under_cap"] = run.returncode == 0
        if run.returncode != 0:
            record["worker_error"] = run.stderr.strip().splitlines()[-3:]
        else:
            streamed = json.loads(result.read_text())
            record["streamed"] = streamed
            record["peak_rss_mib"] = streamed["peak_rss_mib"]
            record["peak_rss_over_fp32"] = streamed["peak_rss_mib"] * MIB / fp32
            if not args.no_compare:
                check = _run_self("--compare-worker", args, out_dir, result)
                record["check"] = (json.loads(result.read_text()) if check.returncode == 0
                                   else {"error": check.stderr.strip().splitlines()[-3:]})
        shutil.rmtree(out_dir, ignore_errors=True)
    write_json_atomic(args.json, record)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
