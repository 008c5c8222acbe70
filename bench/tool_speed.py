"""Issue-14 benchmark: the tool's own speed, each phase in fp32 and on the fast path.

    git clone https://github.com/IST-DASLab/sparsegpt /tmp/ref/sparsegpt
    git clone https://github.com/locuslab/wanda /tmp/ref/wanda
    python bench/tool_speed.py --sparsegpt-ref /tmp/ref/sparsegpt --wanda-ref /tmp/ref/wanda
    python bench/tool_speed.py --quick    # tiny settings: checks that every phase runs
    python bench/tool_speed.py --threads 2 --skip zeroshot,cli
    python bench/tool_speed.py ... --skip perplexity,zeroshot,cli,depth --repeats 2  # prunes

Writes bench/results/tool_speed.json (--quick: tool_speed_quick.json, whose numbers mean
nothing). One process, in this order: load; calibration (the sampler plus one dense statistics
pass, Wanda's column norms); magnitude, Wanda and SparseGPT at 50%, each as the reference
script prunes (locuslab/wanda's prune_magnitude / prune_wanda, IST-DASLab's SparseGPT), through
`secateur.prune` in fp32 and on secateur's fast path, the arms interleaved per repeat on
fresh copies of the dense model and the same calibration windows, each followed by the same
fp32 perplexity so that only the prune differs; perplexity on wiki, 64 x 512; zero-shot
arc_easy (full validation) in-process; the same through `secateur eval` and `lm_eval
--batch_size 8` as subprocesses (wall time, model load and start-up included: what a user
waits); one BlockPruner step (one block removed, every candidate scored) on 32 x 512.

"float32" is each phase as secateur runs it by default in fp32 (perplexity and zero-shot one
window / one request at a time); "fast" is bf16 compute and batching where secateur has it. A
prune's fast variant passes CalibrationConfig(compute_dtype="bfloat16") (the calibration
forwards under autocast). The prune phase's speed-ups are over the reference arm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
FAST = "bfloat16"
NO_FAST = "--no-fast-arms: bf16 is emulated on this CPU (see the calibration phase)"


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m"
    calib_source: str = "c4-sample"
    calib_windows: int = 32
    calib_seqlen: int = 512
    eval_windows: int = 64
    eval_seqlen: int = 512
    eval_batch: int = 8
    zeroshot_limit: int | None = None  # None: the full arc_easy validation split (570)
    zeroshot_batch: int = 8
    search_windows: int = 32
    search_seqlen: int = 512
    sparsity: float = 0.5
    # the bf16 arms of zero-shot and the depth step; off where bf16 is emulated (no AVX-512
    # BF16 / AMX): the calibration phase measures that once, the others would only repeat it
    fast_arms: bool = True


QUICK = Settings(calib_windows=4, calib_seqlen=64, eval_windows=4, eval_seqlen=64,
                 eval_batch=2, zeroshot_limit=4, search_windows=2,
                 search_seqlen=64)
PHASES = ("load", "calibration", "prune", "perplexity", "zeroshot", "cli", "depth")


def timed(fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    start = time.perf_counter()
    extra = fn() or {}
    return {"seconds": round(time.perf_counter() - start, 3), **extra}


def speedups(variants: dict[str, dict[str, Any]], baseline: str) -> dict[str, float]:
    """baseline seconds / variant seconds, for every timed variant but the baseline."""
    base = variants.get(baseline, {}).get("seconds")
    return {name: round(base / v["seconds"], 2) for name, v in variants.items()
            if name != baseline and base and v.get("seconds")}


def machine() -> dict[str, Any]:
    from secateur.eval.protocol import library_versions

    info: dict[str, Any] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                            "platform": platform.platform(), "versions": library_versions(),
                            # without AVX-512 BF16 / AMX, bf16 matmuls are emulated and slower
                            # than fp32 (an AVX2-only machine: 2-5x slower in --quick)
                            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["bf16_flags"] = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
            break
    # a load average well above the thread count makes every number here slower
    with contextlib.suppress(OSError):
        info["loadavg_1min"] = float(Path("/proc/loadavg").read_text().split()[0])
    return info


FAST_KNOB = "CalibrationConfig.compute_dtype"  # where the fast prune's dtype goes


def calibration_config(s: Settings, fast: bool):
    from secateur import CalibrationConfig

    return CalibrationConfig(s.calib_source, s.calib_windows, s.calib_seqlen, 0,
                             compute_dtype=FAST if fast else "float32")


def eval_ppl(loaded, s: Settings, batch: int, compute: str | None, source) -> float:
    from secateur.eval.api import evaluate
    from secateur.eval.config import PerplexityConfig

    config = PerplexityConfig(data="wiki", seqlen=s.eval_seqlen, max_windows=s.eval_windows,
                              batch_size=batch, compute_dtype=compute)
    return evaluate(loaded, config, progress=False, source=source).perplexity


# -- phases ------------------------------------------------------------------------------------
def phase_load(s: Settings, state: dict[str, Any]) -> dict[str, Any]:
    import secateur

    def run() -> dict[str, Any]:
        state["loaded"] = secateur.load(s.model)
        return {"path": state["loaded"].path}

    return {"variants": {"float32": timed(run)},
            "note": "the first load of a packaged GGUF also dequantizes it into the cache"}


def phase_calibration(s: Settings, state: dict[str, Any]) -> dict[str, Any]:
    from secateur.api import calibration_data
    from secateur.engine.capture import compute_dtype
    from secateur.engine.sequential import collect_layer_stats
    from secateur.stats import ColumnSquares

    loaded = state["loaded"]

    def run(fast: bool) -> Callable[[], dict[str, Any]]:
        def go() -> dict[str, Any]:
            windows, _ = calibration_data(loaded, calibration_config(s, fast))
            with compute_dtype(FAST if fast else None):
                collect_layer_stats(loaded.model, loaded.adapter, windows, (ColumnSquares,),
                                    lambda *a: None, False)
            return {"windows": len(windows), "seqlen": windows[0].shape[1]}
        return go

    variants = {"float32": timed(run(False)), "fast": timed(run(True))}
    return {"variants": variants, "speedup": speedups(variants, "float32")}


# -- the reference scripts' pruning, for the prune phase ----------------------------------------
# Nothing of the reference is copied into secateur. SparseGPT's solver and Hessian
# (`SparseGPT.add_batch` / `fasterprune`) and Wanda's statistic (`WrappedGPT.add_batch`) are
# imported from the checkouts given; the loops that drive them (marked REFERENCE LOOP) are
# reimplemented minimally from locuslab/wanda lib/prune.py and IST-DASLab/sparsegpt llama.py,
# with the decoder layers called through secateur's capture (the references' `Catcher` predates
# the rotary `position_embeddings` that current transformers pass to every layer).
def _reference_modules(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.util

    refs: dict[str, Any] = {}
    if args.sparsegpt_ref:
        from quant_reference import _import_reference

        refs["sparsegpt"] = _import_reference(args.sparsegpt_ref, "sparsegpt")[0]
    if args.wanda_ref:
        path = args.wanda_ref / "lib" / "layerwrapper.py"
        if not path.is_file():
            raise SystemExit(f"{args.wanda_ref} has no lib/layerwrapper.py: pass the "
                             "locuslab/wanda checkout")
        spec = importlib.util.spec_from_file_location("wanda_layerwrapper", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        refs["wanda"] = module
    return refs


@torch.no_grad()
def reference_magnitude(loaded, windows, refs: dict[str, Any], sparsity: float) -> None:
    # REFERENCE LOOP: prune_magnitude (unstructured), its sort on the CPU
    for layer in loaded.adapter.layers:
        for p in loaded.adapter.linears(layer).values():
            w = p.module.weight.data
            metric = torch.abs(w)
            thresh = torch.sort(metric.flatten())[0][int(w.numel() * sparsity)]
            w[metric <= thresh] = 0


@torch.no_grad()
def reference_wanda(loaded, windows, refs: dict[str, Any], sparsity: float) -> None:
    # REFERENCE LOOP: prune_wanda (unstructured, no variant): per-window passes with
    # WrappedGPT hooks, a stable sort of each row's |W| * sqrt(scaler_row), a second pass
    from secateur.engine.capture import call_layer, capture_layer_inputs

    adapter = loaded.adapter
    captured = capture_layer_inputs(loaded.model, adapter, windows)
    inps = captured.hidden
    for index, layer in enumerate(adapter.layers):
        call, subset = captured.calls[index], adapter.linears(layer)
        wrapped = {name: refs["wanda"].WrappedGPT(p.module) for name, p in subset.items()}
        handles = [p.module.register_forward_hook(
            lambda _m, inp, out, w=wrapped[name]: w.add_batch(inp[0].data, out.data))
            for name, p in subset.items()]
        for x in inps:
            call_layer(layer, x, call)
        for h in handles:
            h.remove()
        for name, p in subset.items():
            metric = torch.abs(p.module.weight.data) * torch.sqrt(
                wrapped[name].scaler_row.reshape((1, -1)))
            mask = torch.zeros_like(metric) == 1
            indices = torch.sort(metric, dim=-1, stable=True)[1][
                :, :int(metric.shape[1] * sparsity)]
            mask.scatter_(1, indices, True)
            p.module.weight.data[mask] = 0
        inps = [call_layer(layer, x, call) for x in inps]


def reference_sparsegpt(loaded, windows, refs: dict[str, Any], sparsity: float) -> None:
    # REFERENCE LOOP: bench/quant_reference.py's llama_sequential, solver from the checkout
    from quant_reference import reference_sequential

    reference_sequential(loaded, windows, refs["sparsegpt"].SparseGPT,
                         lambda s: s.fasterprune(sparsity, prunen=0, prunem=0, percdamp=0.01,
                                                 blocksize=128))


def _reference_run(fn, target, windows, refs, sparsity) -> Callable[[], None]:
    return lambda: fn(target, windows, refs, sparsity)


def _secateur_run(cls: type, target, s: Settings, windows, fast: bool) -> Callable[[], None]:
    import secateur

    # the same windows as the other arms; the fast arm re-draws them (same source and seed)
    # through the calibration config that carries its dtype
    data = calibration_config(s, True) if fast else windows
    config = cls(sparsity=s.sparsity)

    def run() -> None:
        secateur.prune(target, config, data=data, progress=False)

    return run


REFERENCE_ARMS = {"magnitude": ("wanda", reference_magnitude),
                  "wanda": ("wanda", reference_wanda),
                  "sparsegpt": ("sparsegpt", reference_sparsegpt)}
REFERENCE_SOURCE = {"wanda": "locuslab/wanda lib/prune.py (--wanda-ref)",
                    "sparsegpt": "IST-DASLab/sparsegpt sparsegpt.py (--sparsegpt-ref)"}


def _masks(loaded) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.weight == 0 for i, layer in enumerate(loaded.adapter.layers)
            for n, p in loaded.adapter.linears(layer).items()}


def _mask_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Share of weights pruned in one arm and kept in the other."""
    return (sum((a[k] != b[k]).sum().item() for k in a)
            / sum(v.numel() for v in a.values()))


def phase_prune(s: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """Each method at 50%: the reference script's algorithm, secateur fp32 and secateur's fast
    path, interleaved per repeat, on copies of the dense model and the same windows."""
    import secateur
    from secateur.api import calibration_data
    from secateur.models.loading import copy_loaded

    refs, repeats = state["refs"], state["repeats"]
    windows, calib = calibration_data(state["loaded"], calibration_config(s, False))
    out: dict[str, Any] = {"calibration": calib, "repeats": repeats}
    for name, cls in (("magnitude", secateur.MagnitudeConfig),
                      ("wanda", secateur.WandaConfig),
                      ("sparsegpt", secateur.SparseGPTConfig)):
        ref_key, ref_fn = REFERENCE_ARMS[name]
        arms = ["reference", "float32", "fast"]
        variants: dict[str, dict[str, Any]] = {}
        if ref_key not in refs:
            variants["reference"] = {"skipped": f"pass {REFERENCE_SOURCE[ref_key]}"}
        masks: dict[str, dict[str, torch.Tensor]] = {}
        for repeat in range(repeats):
            for arm in arms:
                if arm in variants and "skipped" in variants[arm]:
                    continue
                target = copy_loaded(state["loaded"])
                if arm == "reference":
                    run = _reference_run(ref_fn, target, windows, refs, s.sparsity)
                else:
                    run = _secateur_run(cls, target, s, windows, arm == "fast")
                row = timed(run)
                seconds = [*variants.get(arm, {}).get("all_seconds", []), row["seconds"]]
                if repeat == 0:
                    masks[arm] = _masks(target)
                    weights = masks[arm].values()
                    row["sparsity"] = (sum(m.sum().item() for m in weights)
                                       / sum(m.numel() for m in weights))
                    row["perplexity"] = eval_ppl(target, s, s.eval_batch, None, state["wiki"])
                    if arm == "fast":
                        row["fast_knob"] = FAST_KNOB
                    variants[arm] = row
                variants[arm]["all_seconds"] = seconds
                variants[arm]["seconds"] = min(seconds)
                del target
        result: dict[str, Any] = {"variants": variants,
                                  "speedup": speedups(variants, "reference")}
        if "reference" in masks and "float32" in masks:
            result["masks_differing_vs_reference"] = _mask_agreement(masks["reference"],
                                                                     masks["float32"])
            result["time_ratio_vs_reference"] = round(
                variants["float32"]["seconds"] / variants["reference"]["seconds"], 3)
        out[name] = result
        print(name, json.dumps({a: {k: v.get(k) for k in ("seconds", "perplexity", "sparsity")}
                                for a, v in variants.items()}), flush=True)
    out["notes"] = [
        "seconds: the minimum over repeats (all_seconds lists each); perplexity and masks "
        "from the first repeat",
        "reference magnitude and SparseGPT prune every weight at or below the k-th smallest "
        "score (ties included); secateur prunes exactly k, ties to the lowest index. smollm2's "
        "weights sit on a 4-bit grid, so |W| ties are many and the reference magnitude "
        "prunes more than 50%",
        "secateur's default runs report no per-layer error (error_report=False): the dense "
        "pass stops after the last projection's input and magnitude runs no layer",
        "SparseGPT's masks_differing_vs_reference is float noise grown by the solve: secateur "
        "sums X^T X where the reference keeps a running 2/n mean, and with few calibration "
        "tokens per input width the dampened inverse is ill-conditioned enough that such "
        "last-bit differences flip many masks (at 4 x 128, ~8%)",
    ]
    return out


def phase_perplexity(s: Settings, state: dict[str, Any]) -> dict[str, Any]:
    loaded, wiki = state["loaded"], state["wiki"]
    runs = {"float32": (1, None), "float32_batched": (s.eval_batch, None),
            "fast": (s.eval_batch, FAST)}
    variants = {name: timed(lambda b=b, c=c: {
        "batch_size": b, "compute_dtype": c or "float32",
        "perplexity": eval_ppl(loaded, s, b, c, wiki)}) for name, (b, c) in runs.items()}
    return {"variants": variants, "speedup": speedups(variants, "float32"),
            "windows": s.eval_windows, "seqlen": s.eval_seqlen}


def _arc(loaded, s: Settings, batch: int, compute: str | None) -> dict[str, Any]:
    from secateur.eval.api import evaluate
    from secateur.eval.config import ZeroShotConfig

    config = ZeroShotConfig(tasks=("arc_easy",), limit=s.zeroshot_limit, data="local",
                            batch_size=batch, compute_dtype=compute)
    arc = evaluate(loaded, config).tasks["arc_easy"]
    return {"batch_size": batch, "compute_dtype": compute or "float32", "acc": arc["acc"],
            "acc_norm": arc["acc_norm"], "samples": arc["samples"]}


def phase_zeroshot(s: Settings, state: dict[str, Any]) -> dict[str, Any]:
    loaded = state["loaded"]
    runs = {"float32": (1, None), "float32_batched": (s.zeroshot_batch, None),
            "fast": (s.zeroshot_batch, FAST)}
    if not s.fast_arms:
        del runs["fast"]
    variants = {name: timed(lambda b=b, c=c: _arc(loaded, s, b, c))
                for name, (b, c) in runs.items()}
    if not s.fast_arms:
        variants["fast"] = {"skipped": NO_FAST}
    return {"variants": variants, "speedup": speedups(variants, "float32"),
            "note": "in-process, model already loaded"}


def _subprocess(cmd: list[str]) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{cmd[:4]} failed: {' | '.join(tail)}")
    return {}


def phase_cli(s: Settings, state: dict[str, Any]) -> dict[str, Any]:
    """What a user waits for at the shell: both CLIs, start-up and model load included."""
    from secateur.eval.zeroshot import local_tasks_dir

    loaded = state["loaded"]
    limit = [] if s.zeroshot_limit is None else ["--limit", str(s.zeroshot_limit)]
    with tempfile.TemporaryDirectory() as tmp:
        ours_json = Path(tmp) / "secateur.json"
        ours = [sys.executable, "-m", "secateur.cli", "eval", s.model, "--data", "none",
                "--tasks", "arc_easy", "--task-data", "local", *limit, "--json", str(ours_json)]
        theirs = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                  f"pretrained={loaded.path},dtype=float32", "--tasks", "arc_easy_local",
                  "--include_path", str(local_tasks_dir()), "--device", "cpu",
                  "--batch_size", str(s.zeroshot_batch), *limit, "--output_path", tmp]
        variants = {"lm_eval_cli": timed(lambda: _subprocess(theirs)),
                    "secateur_cli": timed(lambda: _subprocess(ours))}
        (result_file,) = Path(tmp).rglob("results_*.json")
        cli = json.loads(result_file.read_text())["results"]["arc_easy_local"]
        ours_zs = json.loads(ours_json.read_text())["zeroshot"]
    mine = ours_zs["tasks"]["arc_easy"]
    variants["lm_eval_cli"].update(acc=cli["acc,none"], acc_norm=cli["acc_norm,none"],
                                   batch_size=s.zeroshot_batch)
    variants["secateur_cli"].update(acc=mine["acc"], acc_norm=mine["acc_norm"],
                                    batch_size=ours_zs["protocol"]["batch_size"])
    same = (cli["acc,none"], cli["acc_norm,none"]) == (mine["acc"], mine["acc_norm"])
    return {"variants": variants, "speedup": speedups(variants, "lm_eval_cli"),
            "same_numbers": same}


def phase_depth(s: Settings, state: dict[str, Any]) -> dict[str, Any]:
    import secateur
    from secateur.models.loading import copy_loaded

    variants: dict[str, dict[str, Any]] = {}
    data = secateur.CalibrationConfig(s.calib_source, s.search_windows, s.search_seqlen, 0)
    for variant, dtype in (("float32", "float32"), ("fast", FAST)):
        if variant == "fast" and not s.fast_arms:
            variants[variant] = {"skipped": NO_FAST}
            continue
        target = copy_loaded(state["loaded"])
        holder: dict[str, Any] = {}

        def run(target=target, dtype=dtype, holder=holder) -> dict[str, Any]:
            config = secateur.BlockPrunerConfig(blocks=1, search_dtype=dtype)
            holder["step"] = secateur.prune(target, config, data=data, progress=False)
            return {}

        row = timed(run)
        summary = holder["step"].summary
        row.update(search_dtype=dtype, removed=summary.get("removed"),
                   search=summary.get("search"))
        variants[variant] = row
    same = (variants["float32"]["removed"] == variants["fast"]["removed"]
            if s.fast_arms else None)
    return {"variants": variants, "speedup": speedups(variants, "float32"),
            "same_removal": same, "windows": s.search_windows, "seqlen": s.search_seqlen}


RUNNERS = {"load": phase_load, "calibration": phase_calibration, "prune": phase_prune,
           "perplexity": phase_perplexity, "zeroshot": phase_zeroshot, "cli": phase_cli,
           "depth": phase_depth}


def table(phases: dict[str, Any]) -> str:
    """Markdown rows: phase, variant, seconds, speed-up over its baseline."""
    lines = ["| phase | variant | seconds | speed-up |", "|---|---|---:|---:|"]

    def rows(name: str, phase: dict[str, Any]) -> None:
        if "variants" not in phase:
            for sub, inner in phase.items():
                if isinstance(inner, dict) and any(isinstance(v, dict) for v in inner.values()):
                    rows(f"{name} {sub}", inner)
            return
        for variant, v in phase["variants"].items():
            seconds = f"{v['seconds']:.1f}" if "seconds" in v else v.get("skipped", "-")
            ratio = phase.get("speedup", {}).get(variant)
            lines.append(f"| {name} | {variant} | {seconds} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} |")

    for name, phase in phases.items():
        rows(name, phase)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: a run check")
    parser.add_argument("--model", help="model name or path (default smollm2-135m)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--skip", default="", help=f"comma-separated phases of {PHASES}")
    parser.add_argument("--out", type=Path, help="result JSON path")
    parser.add_argument("--sparsegpt-ref", type=Path,
                        help="checkout of IST-DASLab/sparsegpt (the prune phase's reference)")
    parser.add_argument("--wanda-ref", type=Path,
                        help="checkout of locuslab/wanda (magnitude and Wanda reference)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="prune phase: run the arms this many times, interleaved")
    parser.add_argument("--calib", help="calibration windows x tokens, e.g. 4x128")
    parser.add_argument("--no-fast-arms", action="store_true",
                        help="zero-shot and depth: run the fp32 arms only (bf16 emulated here)")
    args = parser.parse_args()
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    if skip - set(PHASES):
        parser.error(f"--skip: unknown phase(s) {sorted(skip - set(PHASES))}; use {PHASES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    if args.model:
        settings = Settings(**{**asdict(settings), "model": args.model})
    if args.calib:
        n, seqlen = (int(v) for v in args.calib.lower().split("x"))
        settings = Settings(**{**asdict(settings), "calib_windows": n, "calib_seqlen": seqlen})
    if args.no_fast_arms:
        settings = Settings(**{**asdict(settings), "fast_arms": False})
    out = args.out or RESULTS / ("tool_speed_quick.json" if args.quick else "tool_speed.json")
    torch.manual_seed(0)

    from secateur.data.sources import load_text
    from secateur.io import write_json_atomic

    state: dict[str, Any] = {"wiki": load_text("wiki", split="test"),
                             "refs": _reference_modules(args), "repeats": args.repeats}
    phases: dict[str, Any] = {}
    result = {"settings": asdict(settings), "quick": args.quick, "machine": machine(),
              "fast_dtype": FAST, "phases": phases}
    for name in ("load", *(p for p in PHASES if p != "load" and p not in skip)):
        print(f"-- {name}", flush=True)
        phases[name] = RUNNERS[name](settings, state)
        print(json.dumps(phases[name], default=str)[:400], flush=True)
        write_json_atomic(out, result)  # after every phase: a long run cut short keeps what it did
    print(table(phases))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
