"""Issue-12 benchmark: what quantization buys on this CPU, measured side by side in one run.

    python bench/quantization.py                 # -> bench/results/quantization.json
                                                 #    (dense fp32/bf16, int4 g64 and g128, int8)
    python bench/quantization.py --quick         # a smoke run: short prompts, 1 round
    python bench/quantization.py --method gptq   # int4/int8 models from GPTQ (default: rtn)
    python bench/quantization.py --kernels       # the kernel microbenchmark only

Models (smollm2-135m): dense fp32, dense bf16, dense fp32 through secateur's one-token decode
path (`secateur.runtime.decode`, which the runtimes install), 4-bit g64 and g128 (--group-sizes)
on the int4 runtime (the last group size also without the decode path, and with the runtime's
lm_head rounded to int8 per row: `+int8-head`), 8-bit per channel on
the int8 runtime (weight-only) and, with --w8a8 (default only on
AVX-512 machines), W8A8 (int8 weights and per-token int8 activations, SmoothQuant 0.5) on the
int8 runtime. Each quantized model is saved packed (compressed-tensors) and loaded back with
`load_packed`, so its bytes on disk and its memory after loading are those a user gets.
Speed comes from `secateur.bench.measure.benchmark`: interleaved rounds, order reversed every
round, ratios per round against dense fp32 with min/median/max; the decode bound is memory
bandwidth / weight bytes read per generated token (packed codes and scales for the runtimes).

`--kernels`: one linear of each smollm2 shape (576 -> 1536 and 1536 -> 576) at batch 1 and
128, every kernel candidate (dense fp32/bf16, secateur's AVX2 int4/int8, torch's int4pack,
int8pack and _int_mm) timed in interleaved rounds; ratios are dense fp32 seconds / candidate
seconds in the same round. At batch 1 each candidate cycles through copies of its layer
totalling 256 MiB of float32, so weights come from memory as in decode. torchao 0.18 is not a
candidate: its CPU int4 layout calls the same `_weight_int4pack_mm_for_cpu`, its int8
weight-only layout dequantizes and runs a float matmul, and its W8A8 path ends in `_int_mm`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "quantization.json"
KERNEL_RESULTS = Path(__file__).parent / "results" / "quantization_kernels.json"
MODEL = "smollm2-135m"


# -- kernels -------------------------------------------------------------------------------
def rtn_linear(linear: nn.Linear, bits: int, group_size: int) -> nn.Linear:
    """secateur's RTN on a lone linear: its weight rounded on a symmetric `bits` grid in groups
    of `group_size` columns, and its `QuantState` for the runtimes."""
    from secateur.quant.grid import Grid, rtn
    from secateur.quant.state import set_quant_state

    new, state = rtn(linear.weight, Grid(bits), group_size)
    linear.weight.data.copy_(new.to(linear.weight.dtype))
    set_quant_state(linear, state)
    return linear


def _kernel_candidates(out_f: int, in_f: int, copies: int
                       ) -> dict[str, list[Callable[[torch.Tensor], object]]]:
    """Each candidate as `copies` distinct layers (so that cycling through them reads the
    weights from memory, as a decode step through 30 layers does, not from cache)."""
    import copy

    from secateur.runtime import apply_runtime, avx2
    from secateur.runtime.int8 import mark_w8a8

    torch.manual_seed(0)
    dense = [nn.Linear(in_f, out_f, bias=False).eval() for _ in range(copies)]
    cands: dict[str, list] = {"dense_fp32": dense}
    bf16 = [copy.deepcopy(d).to(torch.bfloat16) for d in dense]
    cands["dense_bf16"] = [lambda x, m=m: m(x.to(torch.bfloat16)) for m in bf16]

    def runtime(bits, group, kind, w8a8=False):
        out = []
        for d in dense:
            model = nn.Sequential(rtn_linear(copy.deepcopy(d), bits, group))
            if w8a8:
                mark_w8a8(model[0])
            out.append(apply_runtime(model, kind))
        return out

    if avx2.kernels() is not None:
        cands["avx2_int4_g128"] = runtime(4, 128, "int4")
        cands["avx2_int8"] = runtime(8, -1, "int8")
    kernels = avx2.kernels
    avx2.kernels = lambda: None  # torch's own kernels for the rest
    try:
        cands["aten_int4_g128"] = runtime(4, 128, "int4")
        cands["aten_int8"] = runtime(8, -1, "int8")
        cands["aten_w8a8_int_mm"] = runtime(8, -1, "int8", w8a8=True)
    finally:
        avx2.kernels = kernels
    return cands


@torch.no_grad()
def kernels(rounds: int, calls: int, threads: int, memory_mib: int = 256) -> dict:
    """Seconds per call of each kernel candidate, interleaved rounds; for batch 1 the weights
    cycle through enough copies to exceed `memory_mib` of float32 (cache-cold, like decode)."""
    from secateur.bench.measure import interleaved, spread

    torch.set_num_threads(threads)
    shapes = {"576->1536": (1536, 576), "1536->576": (576, 1536)}
    out: dict = {"threads": threads, "rounds": rounds, "calls_per_timing": calls,
                 "cache_cold_mib": memory_mib, "cases": {},
                 "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for label, (out_f, in_f) in shapes.items():
        copies = -(-memory_mib * 2**20 // (out_f * in_f * 4))
        cands = _kernel_candidates(out_f, in_f, copies)
        for batch in (1, 128):
            x = torch.randn(batch, in_f)
            n_calls = calls if batch == 1 else max(1, calls // 16)
            secs = interleaved({n: (lambda layers=layers, x=x, k=n_calls: _per_call(layers, x, k))
                                for n, layers in cands.items()}, rounds, warmup=1)
            base = secs["dense_fp32"]
            out["cases"][f"{label} batch {batch}"] = {
                n: {"median_us": statistics.median(s) * 1e6,
                    "speedup_vs_fp32": spread([b / v for b, v in zip(base, s, strict=True)])}
                for n, s in secs.items()}
            print(f"{label} batch {batch}: " + ", ".join(
                f"{n} {statistics.median(s) * 1e6:.0f}us" for n, s in secs.items()), flush=True)
    return out


def _per_call(layers: list, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, cycling through the copies so that batch 1 reads cold weights."""
    t = time.perf_counter()
    for i in range(calls):
        layers[i % len(layers)](x)
    return (time.perf_counter() - t) / calls


# -- models --------------------------------------------------------------------------------
def _quantize(loaded, method: str, bits: int, group: int, w8a8: bool, quick: bool) -> None:
    """Quantize `loaded.model` in place: RTN/GPTQ weights, or W8A8 (SmoothQuant alpha 0.5)."""
    if w8a8:
        _run_method(loaded, {"method": "w8a8", "smoothquant_alpha": 0.5}, quick)
        return
    # 128 does not divide smollm2's 576-wide inputs: a narrower last group, as GPTQ's reference
    _run_method(loaded, {"method": method, "bits": bits, "group_size": group,
                         "partial_groups": True}, quick)


def _run_method(loaded, step: dict, quick: bool) -> None:
    from secateur.data.sources import load_text
    from secateur.data.windows import calibration_windows
    from secateur.engine.sequential import prune_layerwise
    from secateur.methods import build_method
    from secateur.registry import make_config

    method = build_method(make_config(step))
    windows = calibration_windows(loaded.tokenizer, load_text("c4-sample", split="train"),
                                  4 if quick else 32, 128 if quick else 512, 0)
    method.prepare(loaded.model, loaded.adapter, None)
    prune_layerwise(loaded.model, loaded.adapter, method, windows, progress=True)


def _vm_hwm_mib_code() -> str:
    # VmHWM, not ru_maxrss: a spawned child's ru_maxrss starts from its parent's peak
    return ("def hwm(key='VmHWM:'):\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith(key):\n"
            "            return int(line.split()[1]) / 1024\n")


def _peak_after_load(path: Path, runtime: str, head: str) -> dict:
    """Load in a fresh process: its peak resident memory, and the tensors' own bytes."""
    import subprocess

    code = (_vm_hwm_mib_code() +
            "import json, sys\n"
            "from secateur.params import count_parameters\n"
            "from secateur.formats.packed_runtime import load_packed\n"
            "from secateur.runtime import runtime_weight_bytes\n"
            "import gc\n"
            "m = load_packed(sys.argv[1], sys.argv[2], head=sys.argv[3])\n"
            "gc.collect()\n"
            "after = {'peak_rss_mib': hwm(), 'rss_after_load_mib': hwm('VmRSS:')}\n"
            "import torch\n"
            "with torch.no_grad():\n"
            "    m(torch.tensor([[1, 2, 3, 4]]))  # what a first use makes resident\n"
            "after['rss_after_forward_mib'] = hwm('VmRSS:')\n"
            "t = count_parameters(m)['bytes_in_memory']  # a tied table once\n"
            "print(json.dumps({**after, 'tensor_mib': t / 2**20, "
            "'weight_bytes_per_token': runtime_weight_bytes(m)}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(path), runtime, head], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _baseline_rss() -> float:
    """A process that imports what loading imports and loads nothing: the floor under the peaks."""
    import subprocess

    code = (_vm_hwm_mib_code() +
            "import accelerate, compressed_tensors, secateur.formats.packed_runtime, torch, "
            "transformers\n"
            "print(hwm())\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return float(out.strip().splitlines()[-1])


def models(method: str, quick: bool, out_dir: Path, groups: tuple[int, ...],
           w8a8: bool, threads: int) -> dict:
    from secateur.bench.measure import BenchSpec, Subject, benchmark
    from secateur.formats.hf import save_model
    from secateur.formats.loader import load
    from secateur.formats.packed_runtime import load_packed
    from secateur.formats.packed_save import save_packed
    from secateur.io import dir_bytes
    from secateur.runtime.decode import install_decode_path, remove_decode_path

    dense = load(MODEL)
    fp32_dir = out_dir / "dense-fp32"
    save_model(dense.model, dense.tokenizer, fp32_dir, overwrite=True)
    variants = [(f"int4-g{g}", 4, g, False, "int4") for g in groups]
    variants.append(("int8", 8, -1, False, "int8"))
    if w8a8:
        variants.append(("w8a8", 8, -1, True, "int8"))
    packed: dict[str, dict] = {}
    for name, bits, group, w8a8, runtime in variants:
        loaded = load(MODEL)
        t = time.perf_counter()
        _quantize(loaded, method, bits, group, w8a8, quick)
        seconds = time.perf_counter() - t
        path = save_packed(loaded.model, loaded.tokenizer, out_dir / name, {"bench": name},
                           overwrite=True)
        packed[name] = {"path": str(path), "runtime": runtime, "head": "float16",
                        "quantize_seconds": seconds, "bytes_on_disk": dir_bytes(path)}
        del loaded
        gc.collect()
    # the same files with the runtime's lm_head rounded to int8 at load (`runtime.head`)
    last = f"int4-g{groups[-1]}"
    packed[f"{last}+int8-head"] = {**packed[last], "head": "int8", "same_files_as": last}
    fp32_bytes = dir_bytes(fp32_dir)
    floor = _baseline_rss()
    memory = {"process_floor_rss_mib": floor}
    for info in packed.values():
        after = _peak_after_load(Path(info["path"]), info["runtime"], info["head"])
        info.update(after)
        info["bytes_on_disk_vs_fp32"] = info["bytes_on_disk"] / fp32_bytes
        info["tensor_bytes_vs_fp32"] = after["tensor_mib"] * 2**20 / fp32_bytes
        # the peak includes the transients of loading (the checkpoint's mapped pages, one
        # matrix's unpacked codes); what stays is the resident set after loading
        info["peak_rss_above_floor_vs_fp32"] = ((after["peak_rss_mib"] - floor) * 2**20
                                                / fp32_bytes)
        info["rss_after_load_above_floor_vs_fp32"] = ((after["rss_after_load_mib"] - floor)
                                                      * 2**20 / fp32_bytes)
        info["rss_after_forward_above_floor_vs_fp32"] = ((after["rss_after_forward_mib"]
                                                          - floor) * 2**20 / fp32_bytes)
    bf16 = load(MODEL, dtype="bfloat16")
    # the same fp32 weights through secateur's one-token decode path: what the path alone buys
    dense_path = copy.deepcopy(dense.model)
    install_decode_path(dense_path)
    subjects = [Subject("dense-fp32", dense.model, dense.tokenizer, str(fp32_dir)),
                Subject("dense-bf16", bf16.model, bf16.tokenizer, None),
                Subject("dense-fp32+decode-path", dense_path, dense.tokenizer, None)]
    for name, info in packed.items():
        model = load_packed(info["path"], info["runtime"], head=info["head"])
        subjects.append(Subject(f"{name}@{info['runtime']}", model, dense.tokenizer,
                                info["path"]))
        if name == last:  # and without the path: what the weights alone buy
            plain = copy.deepcopy(model)
            remove_decode_path(plain)
            subjects.append(Subject(f"{name}@{info['runtime']}-transformers-layers", plain,
                                    dense.tokenizer, info["path"]))
    spec = (BenchSpec(prompt_lengths=(64,), decode_tokens=8, repeats=1, warmup=0,
                      threads=threads) if quick
            else BenchSpec(prompt_lengths=(128, 512), decode_tokens=32, repeats=5, warmup=1,
                           threads=threads))
    # weight bytes per token and logical parameters count the runtimes' packed buffers
    result = benchmark(subjects, spec)
    return {"model": MODEL, "method": method, "quick": quick, "group_sizes": list(groups),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "fp32_bytes_on_disk": fp32_bytes,
            "packed": packed, "memory": memory, "bench": result,
            "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "kept_unquantized": "embeddings and lm_head (tied here) in float16, on disk and "
                                "in the runtime (the head reads the embedding's float16 table "
                                "through secateur's F16C kernel); norms and biases in float32. "
                                "The '+int8-head' model is the same files with the runtime's "
                                "head rounded to int8 per row at load (runtime.head): the "
                                "embedding keeps its float16 table"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run, not for numbers")
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                        help="weight quantizer for the int4/int8 models")
    parser.add_argument("--group-sizes", default="64,128",
                        help="int4 group sizes, one model each (smollm2's 576-wide inputs hold "
                             "4.5 groups of 128: a method that refuses partial groups needs 64)")
    parser.add_argument("--w8a8", action=argparse.BooleanOptionalAction,
                        default=torch.backends.cpu.get_cpu_capability() == "AVX512",
                        help="include W8A8 (torch._int_mm); default only with AVX-512, since "
                             "without it _int_mm runs ~40x slower than fp32 and a full run "
                             "would take hours")
    parser.add_argument("--kernels", action="store_true", help="the kernel microbenchmark only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the timings (1: batch-1 decode on one core, "
                             "the issue's protocol)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.kernels:
        result = kernels(rounds=2 if args.quick else 7, calls=8 if args.quick else 64,
                         threads=args.threads, memory_mib=32 if args.quick else 256)
        path = args.out or KERNEL_RESULTS
    else:
        with tempfile.TemporaryDirectory(prefix="secateur-bench-quant-") as tmp:
            groups = tuple(int(g) for g in args.group_sizes.split(","))
            result = models(args.method, args.quick, Path(tmp), groups, args.w8a8,
                            args.threads)
        path = args.out or RESULTS
    result["command"] = " ".join(["python", *sys.argv])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
