"""How memory and time grow from 135M to 1B to 8B parameters, one decoder layer resident.

    python bench/make_random_llama.py 1b runs/scale/llama-1b-shape
    python bench/make_random_llama.py 8b runs/scale/llama-8b-shape
    python bench/scale.py [--resume] [--only ARM ...]

Each arm is a streamed layer-wise run in its own process, one thread: Wanda 50% through the
CLI (`secateur prune MODEL --method wanda --sparsity 0.5 --stream --out ...`), GPTQ 4-bit
through `secateur.jobs.prune_streamed_job` (the `quantize` command has no `--stream` flag
yet). The child records its own peak resident set (VmHWM) and `/proc/self/io` as it exits;
the parent cross-checks the peak with `wait4`'s ru_maxrss and evicts the model's files from
the page cache before each arm, so `read_bytes` is what came from the disk and `rchar` is
every byte read by any means. Seconds per layer are the gaps between the layers' output
shards' modification times (each is written as its layer finishes).

Writes bench/results/scale.json after every arm (`--resume` skips arms already there),
bench/results/scale.md (table, 70B extrapolation, README section) and scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
JSON = RESULTS / "scale.json"
MD = RESULTS / "scale.md"
PNG = RESULTS / "scale.png"
WORK = ROOT / "runs" / "scale"
MIB, GIB = 2**20, 2**30
SEQLEN = 512
DTYPE = "bfloat16"

# name -> (model argument, parameters, shape) ; shapes as in the models' config.json
MODELS = {
    "smollm2-135m": dict(model="smollm2-135m", layers=30, hidden=576, intermediate=1536,
                         heads=9, kv_heads=3, vocab=49152, tied=True),
    "llama-1b-shape": dict(model=str(WORK / "llama-1b-shape"), layers=16, hidden=2048,
                           intermediate=8192, heads=32, kv_heads=8, vocab=128256, tied=True),
    "llama-8b-shape": dict(model=str(WORK / "llama-8b-shape"), layers=32, hidden=4096,
                           intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                           tied=False),
}
# Llama-3.1-70B, for the extrapolation only
LLAMA_70B = dict(layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8,
                 vocab=128256, tied=False)

# arm -> (model, method, windows)
ARMS = {
    "smollm2-135m/wanda": ("smollm2-135m", "wanda", 8),
    "smollm2-135m/gptq4": ("smollm2-135m", "gptq4", 8),
    "llama-1b-shape/wanda": ("llama-1b-shape", "wanda", 8),
    "llama-1b-shape/gptq4": ("llama-1b-shape", "gptq4", 8),
    "llama-8b-shape/wanda": ("llama-8b-shape", "wanda", 8),
}


def cpu_per_layer(a: dict) -> float:
    """Median seconds per layer scaled by the share of a core the arm got (CPU s / wall s):
    what one dedicated thread would take. The machine was shared, so wall time overstates."""
    share = a["cpu_seconds"] / a["seconds_total"] if "cpu_seconds" in a else 1.0
    return a["seconds_per_layer_median"] * share


def layer_params(m: dict) -> int:
    h, i = m["hidden"], m["intermediate"]
    head_dim = h // m["heads"]
    kv = m["kv_heads"] * head_dim
    return 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h


def parameters(m: dict) -> int:
    emb = m["vocab"] * m["hidden"]
    return m["layers"] * layer_params(m) + emb * (1 if m["tied"] else 2) + m["hidden"]


# -- the child ---------------------------------------------------------------------------------

def _proc_record(path: str) -> None:
    status = Path("/proc/self/status").read_text()
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())

    def kib(key: str) -> int:
        return int(status.split(f"{key}:")[1].split()[0]) * 1024

    Path(path).write_text(json.dumps({
        "vm_hwm": kib("VmHWM"), "vm_peak": kib("VmPeak"),
        **{k: int(v) for k, v in io.items()}}))


def child(record: str, method: str, model: str, out: str, windows: int, job_json: str) -> None:
    """Runs in the arm's own process; writes its /proc numbers to `record` as it exits."""
    import atexit

    atexit.register(_proc_record, record)
    import torch

    torch.set_num_threads(1)
    common = ["--calib", "c4-sample", "--nsamples", str(windows), "--seqlen", str(SEQLEN),
              "--dtype", DTYPE, "--out", out, "--overwrite", "--json", job_json]
    if method == "wanda":
        from secateur.cli import app

        sys.argv = ["secateur", "prune", model, "--method", "wanda", "--sparsity", "0.5",
                    "--stream", "--eval", "none", *common]
        app()
    elif method == "gptq4":
        from secateur.api import CalibrationConfig
        from secateur.jobs import prune_streamed_job
        from secateur.methods.gptq import GPTQConfig

        group = 64 if model == "smollm2-135m" else 128  # 128 does not divide smollm2's 576
        result = prune_streamed_job(model, GPTQConfig(bits=4, group_size=group),
                                    CalibrationConfig("c4-sample", windows, SEQLEN, 0), Path(out),
                                    Path(job_json), overwrite=True, dtype=DTYPE)
        print(f"streamed gptq into {out}: peak RSS {result.run.peak_rss_mib:.0f} MiB for "
              f"{result.run.model_mib:.0f} MiB of weights")
    else:
        raise SystemExit(f"unknown method {method}")


# -- the parent --------------------------------------------------------------------------------

def _model_files(model: str) -> list[Path]:
    folder = Path(model)
    if not folder.is_dir():  # secateur.offline.cache_dir(), without importing torch here:
        # a child inherits its parent's ru_maxrss through fork and exec
        root = os.environ.get("SECATEUR_CACHE")
        xdg = os.environ.get("XDG_CACHE_HOME")
        cache = Path(root).expanduser() if root else \
            (Path(xdg) if xdg else Path.home() / ".cache") / "secateur"
        folder = cache / "models" / model
    return sorted(folder.glob("*.safetensors"))


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (written back first), nothing else."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def layer_seconds(out: Path, layers: int) -> list[float]:
    """Gaps between consecutive layer shards' mtimes (layer i is shard i + 2)."""
    times = [(out / f"model-{i + 2:05d}-of-{layers + 1:05d}.safetensors").stat().st_mtime
             for i in range(layers)]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def run_arm(name: str) -> dict:
    model_name, method, windows = ARMS[name]
    m = MODELS[model_name]
    tag = name.replace("/", "-")
    out = WORK / "out" / tag
    record, job_json, log = (WORK / f"{tag}.{k}" for k in ("proc.json", "job.json", "log"))
    for p in (record, job_json):
        p.unlink(missing_ok=True)
    files = _model_files(m["model"])
    evict(files)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(record), method,
           m["model"], str(out), str(windows), str(job_json)]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"[{name}] failed (exit {rc}); see {log}:\n"
                         + log.read_text()[-3000:])
    proc_rec = json.loads(record.read_text())
    job = json.loads(job_json.read_text())
    gaps = layer_seconds(out, m["layers"])
    out_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    model_bytes = sum(f.stat().st_size for f in files)
    return {
        "model": model_name, "method": method, "parameters": parameters(m),
        "layer_parameters": layer_params(m), "shape": m,
        "calibration": {"source": "c4-sample", "windows": windows, "seqlen": SEQLEN,
                        "tokens": windows * SEQLEN},
        "dtype": DTYPE, "threads": 1,
        "peak_rss_mib": proc_rec["vm_hwm"] / MIB,
        "ru_maxrss_mib": usage.ru_maxrss / 1024,
        "disk_read_bytes": proc_rec["read_bytes"],
        "rchar_bytes": proc_rec["rchar"],
        "disk_write_bytes": proc_rec["write_bytes"],
        "model_file_bytes": model_bytes,
        "output_bytes": out_bytes,
        "seconds_total": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # the share of a core it got: / wall
        "seconds_job": job["seconds"],
        "seconds_per_layer_median": statistics.median(gaps),
        "seconds_per_layer_mean": statistics.fmean(gaps),
        "layer_seconds": gaps,
        "job": {k: job[k] for k in ("model_mib", "largest_layer_mib", "rest_mib",
                                    "peak_rss_mib", "peak_over_model", "seconds",
                                    "summary", "calibration") if k in job},
    }


def machine() -> dict:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / GIB, 1),
            "threads_used": 1, "shared": "yes: a long single-thread benchmark and other "
            "developers' tests ran on the same 2 cores, so seconds are indicative; the memory "
            "and bytes read are the point",
            "torch": md.version("torch"), "transformers": md.version("transformers"),
            "python": platform.python_version()}


def load() -> dict:
    if JSON.is_file():
        return json.loads(JSON.read_text())
    return {"arms": {}}


def save(data: dict) -> None:
    from secateur.io import write_text_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(JSON, json.dumps(data, indent=1) + "\n")  # the layout the file has


# -- extrapolation -----------------------------------------------------------------------------

def extrapolate(data: dict) -> dict:
    """70B from the measured arms; every number here is extrapolated, none measured."""
    arms = data["arms"]
    ref = arms.get("llama-8b-shape/wanda") or arms.get("llama-1b-shape/wanda")
    if ref is None:
        return {}
    # CPU seconds per layer ~ layer_params x tokens (= hidden^2 x tokens at a fixed MLP ratio)
    c = cpu_per_layer(ref) / (ref["layer_parameters"] * ref["calibration"]["tokens"])
    p70, lp70 = parameters(LLAMA_70B), layer_params(LLAMA_70B)
    layer_bytes = lp70 * 2
    overhead = ref["peak_rss_mib"] * MIB - ref["job"]["largest_layer_mib"] * MIB * 1.0
    tokens = 128 * 2048
    act = tokens * LLAMA_70B["hidden"] * 2  # one copy of the hidden states in bf16
    h_down = LLAMA_70B["intermediate"] ** 2 * 4  # GPTQ's largest Hessian, fp32
    return {
        "model": "Llama-3.1-70B shape", "parameters": p70, "layer_parameters": lp70,
        "layer_gib_bf16": layer_bytes / GIB,
        "cpu_seconds_per_param_token": c, "from_arm": ref["model"] + "/" + ref["method"],
        "cpu_one_thread_seconds_per_layer_8x512": c * lp70 * 8 * SEQLEN,
        "cpu_one_thread_hours_8x512": c * lp70 * 8 * SEQLEN * LLAMA_70B["layers"] / 3600,
        "host_peak_gib_8x512": (overhead + layer_bytes + 2 * 8 * SEQLEN
                                * LLAMA_70B["hidden"] * 2) / GIB,
        "calibration_tokens_full": tokens,
        "activations_gib_full": act / GIB,
        "gptq_down_hessian_gib": h_down / GIB,
        "flops_per_layer_full": 2 * 2 * lp70 * tokens,
    }


# -- report ------------------------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def table(data: dict) -> str:
    rows = ["| arm | parameters | layers | windows x seqlen | peak RSS | model on disk | "
            "disk read | all reads (rchar) | output | s / layer (median, wall) | total s (wall) | "
            "CPU s | s / layer, one dedicated thread (est.) |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a in data["arms"].items():
        rows.append(
            f"| {name} | {a['parameters'] / 1e9:.2f}B | {a['shape']['layers']} | "
            f"{a['calibration']['windows']} x {a['calibration']['seqlen']} | "
            f"{fmt_bytes(a['peak_rss_mib'] * MIB)} | {fmt_bytes(a['model_file_bytes'])} | "
            f"{fmt_bytes(a['disk_read_bytes'])} | {fmt_bytes(a['rchar_bytes'])} | "
            f"{fmt_bytes(a['output_bytes'])} | "
            f"{a['seconds_per_layer_median']:.1f} | {a['seconds_total']:.0f} | "
            + (f"{a['cpu_seconds']:.0f} | {cpu_per_layer(a):.1f} |" if "cpu_seconds" in a
               else "- | - |"))
    return "\n".join(rows)


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for method, marker, color in (("wanda", "o", "tab:blue"), ("gptq4", "s", "tab:orange")):
        arms = sorted((a for a in data["arms"].values() if a["method"] == method),
                      key=lambda a: a["parameters"])
        if not arms:
            continue
        x = [a["parameters"] for a in arms]
        axes[0].plot(x, [a["peak_rss_mib"] / 1024 for a in arms], marker=marker, color=color,
                     label=f"{method}: peak RSS")
        if method == "wanda":
            axes[0].plot(x, [a["job"]["model_mib"] / 1024 for a in arms], marker=".",
                         linestyle=":", color="grey", label="the model's weights (bf16)")
        axes[1].plot(x, [a["seconds_total"] for a in arms], marker=marker, color=color,
                     label=f"{method}: total (wall, shared core)")
        axes[1].plot(x, [cpu_per_layer(a) for a in arms], marker=marker, color=color,
                     linestyle="--", label=f"{method}: per layer (dedicated thread, est.)")
    axes[0].axhline(6, color="red", linewidth=0.8, linestyle="-.", label="6 GiB goal")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, title in ((axes[0], "peak host memory (GiB)"), (axes[1], "seconds, 1 CPU thread")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:g}".lstrip("0.")[:1] in ("2", "3", "5") else ""))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.xaxis.set_major_formatter(FuncFormatter(
            lambda v, _: f"{v / 1e9:.2g}B" if v >= 1e9 else f"{v / 1e6:.0f}M"))
        ax.set_xticks(sorted({a["parameters"] for a in data["arms"].values()}))
        ax.set_xlabel("parameters")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("secateur streamed layer-wise runs, one decoder layer resident "
                 "(135M real; 1B and 8B random weights of Llama 3 shapes; bf16; 8 x 512 "
                 "calibration tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(PNG, dpi=120)


def report(data: dict) -> None:
    ext = data.get("extrapolation_70b") or {}
    lines = ["# Scale: 135M -> 1B -> 8B with one decoder layer resident", "",
             "Written by `bench/scale.py` from `scale.json`; models built by "
             "`bench/make_random_llama.py` (random bf16 weights, std 0.02, with the exact "
             "shapes of Llama-3.2-1B and Llama-3.1-8B; smollm2-135m is the real model). "
             "Each arm is one process at one thread on a shared 2-core, 24 GiB machine "
             f"({data['machine']['cpu']}): seconds are indicative, memory and bytes are "
             "the point. Peak RSS is the process's VmHWM (interpreter, torch and "
             "transformers included); disk read is `/proc/self/io` read_bytes after the "
             "model's files were evicted from the page cache; rchar counts every byte read.",
             "", table(data), "", "![scale](scale.png)", ""]
    lines += growth_md(data)
    if ext:
        lines += extrapolation_md(ext)
    lines += readme_md(data)
    MD.write_text("\n".join(lines) + "\n")


def growth_md(data: dict) -> list[str]:
    arms = data["arms"]
    out = ["## How it grows", ""]
    wanda = sorted((a for a in arms.values() if a["method"] == "wanda"),
                   key=lambda a: a["parameters"])
    for a, b in zip(wanda, wanda[1:], strict=False):
        work = (b["layer_parameters"] * b["calibration"]["tokens"]) / \
            (a["layer_parameters"] * a["calibration"]["tokens"])
        out.append(
            f"- wanda, {a['model']} -> {b['model']}: parameters x"
            f"{b['parameters'] / a['parameters']:.1f}, layers x"
            f"{b['shape']['layers'] / a['shape']['layers']:.1f}, largest layer x"
            f"{b['job']['largest_layer_mib'] / a['job']['largest_layer_mib']:.1f}; peak RSS x"
            f"{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} ({a['peak_rss_mib']:.0f} -> "
            f"{b['peak_rss_mib']:.0f} MiB); s / layer x"
            f"{cpu_per_layer(b) / cpu_per_layer(a):.1f} (one-thread estimate) against x"
            f"{work:.1f} in layer parameters x tokens; bytes read (rchar) x"
            f"{b['rchar_bytes'] / a['rchar_bytes']:.1f}.")
    g1 = arms.get("llama-1b-shape/gptq4")
    if g1 is not None:
        base = 600  # MiB: interpreter, torch, transformers (smollm2's arms peak at ~650)
        layer = g1["job"]["largest_layer_mib"]
        hess = 4 * g1["shape"]["intermediate"] ** 2 / MIB  # down_proj's fp32 X^T X
        k = (g1["peak_rss_mib"] - base - layer) / hess
        m8 = MODELS["llama-8b-shape"]
        hess8 = 4 * m8["intermediate"] ** 2 / MIB
        layer8 = layer_params(m8) * 2 / MIB
        est = base + layer8 + k * hess8
        out += [f"- gptq4 at the 1B shape peaks at {g1['peak_rss_mib'] / 1024:.2f} GiB: "
                f"about {k:.1f} x down_proj's fp32 Hessian ({hess:.0f} MiB; the copies "
                "`secateur/quant/gptq.py` makes while damping and inverting it) above ~0.6 GiB "
                "of libraries and the layer. *Extrapolated* to the 8B shape "
                f"(intermediate {m8['intermediate']}, Hessian {hess8:.0f} MiB): peak ~"
                f"{est / 1024:.1f} GiB = 0.6 + {layer8 / 1024:.2f} + {k:.1f} x "
                f"{hess8 / 1024:.2f} GiB; not run here. Damping and inverting in place would "
                "take it to about 3 GiB (estimate)."]
    big = arms.get("llama-8b-shape/wanda")
    if big is not None:
        ok = big["peak_rss_mib"] < 6 * 1024
        out += ["", f"**Goal (peak host memory for the 8B shape under 6 GiB): "
                f"{'met' if ok else 'NOT met'}**: {big['peak_rss_mib'] / 1024:.2f} GiB peak RSS "
                f"for {big['model_file_bytes'] / GIB:.1f} GiB of bf16 weights "
                f"({big['job']['largest_layer_mib']:.0f} MiB per decoder layer)."]
    out += ["",
            "Memory does not grow with the number of layers: the resident set is the "
            "interpreter and libraries (~0.5 GiB), one decoder layer with its method's "
            "temporaries, and the calibration activations; the embeddings and head are "
            "file-mapped (bf16 models) and only the calibration tokens' rows are touched. Time "
            "grows linearly in layers (each layer costs the same) and, per layer, with layer "
            "parameters x tokens (small layers pay a larger fixed share: Python, norms, attention "
            "over the window). Bytes read from disk are the model once; each finished layer "
            "is written once, to the `--resume` checkpoint, and hard-linked into the output.",
            "",
            "Caveats: smollm2-135m's file stays in the page cache because other processes on "
            "this machine map it, so its disk read is ~0 (rchar shows the bytes read); the "
            "GPTQ arms (4 bits, groups of 128; 64 for smollm2, whose 576 columns 128 does not "
            "divide) run through `secateur.jobs.prune_streamed_job` (the `quantize` command "
            "has no `--stream` yet); their output is compressed-tensors pack-quantized, written "
            "layer by layer (`output_bytes` in scale.json).", ""]
    return out


def extrapolation_md(e: dict) -> list[str]:
    return [
        "## 70B (extrapolated, not measured)", "",
        f"Llama-3.1-70B's shape: 80 layers of {e['layer_parameters'] / 1e6:.0f}M parameters "
        f"({e['layer_gib_bf16']:.2f} GiB each in bf16), {e['parameters'] / 1e9:.1f}B in all.",
        "",
        "Formulas (P_layer = parameters of one decoder layer ~ 12.5 hidden^2 for Llama 3's "
        "MLP ratio; T = calibration tokens; L = layers):",
        "",
        "- time per layer = c x P_layer x T, with c fitted on the measured "
        f"{e['from_arm']} arm: c = {e['cpu_seconds_per_param_token']:.3g} s per "
        "(parameter x token) at one dedicated CPU thread (wall time x the share of a core "
        "the arm got). Wanda runs the layer about twice over the calibration tokens "
        "(statistics, then the pruned layer for the next layer's inputs): 4 x P_layer x T "
        "FLOPs.",
        "- host memory = interpreter and libraries (~0.5 GiB) + one layer at the load dtype "
        "+ the scoring temporaries of its largest matrix + 2 x T x hidden x 2 bytes (inputs "
        "and outputs of the layer in bf16); embeddings are file-mapped and touched only for "
        "the calibration tokens' rows.",
        "- total = L x time per layer + reading the model once (size / disk bandwidth) + "
        "writing it once.",
        "- these random-weight models cost the same per layer as trained ones: the work "
        "depends on shapes, not values.", "",
        f"CPU, one thread, 8 x 512 tokens: {e['cpu_one_thread_seconds_per_layer_8x512']:.0f} s "
        f"per layer, {e['cpu_one_thread_hours_8x512']:.1f} h for 80 layers; host peak about "
        f"{e['host_peak_gib_8x512']:.1f} GiB.", "",
        "One 80 GB GPU (H100), the usual 128 x 2048 calibration tokens "
        f"(T = {e['calibration_tokens_full']}): {e['flops_per_layer_full'] / 1e12:.0f} TFLOP "
        "per layer; at an assumed 300 TFLOP/s achieved in bf16 that is "
        f"{e['flops_per_layer_full'] / 300e12:.1f} s of matmul per layer (c is not used for "
        "GPUs: a CPU thread's speed says nothing about an H100's), "
        f"{80 * e['flops_per_layer_full'] / 300e12 / 60:.1f} min for 80 layers, plus "
        "reading 141 GB from disk (about 70 s at 2 GB/s) and moving each layer over PCIe "
        f"(~{e['layer_gib_bf16'] / 25:.2f} s per layer at 25 GB/s). GPU memory: one layer "
        f"({e['layer_gib_bf16']:.1f} GiB) + the layer's inputs and outputs "
        f"(2 x {e['activations_gib_full']:.1f} GiB) + for GPTQ the largest Hessian "
        f"({e['gptq_down_hessian_gib']:.1f} GiB, fp32, down_proj) and its inverse: under "
        "20 GiB, far below 80 GB. Host memory: the same one layer plus the hidden states "
        "if they are kept on the CPU between layers (up to 2 x "
        f"{e['activations_gib_full']:.1f} GiB) plus ~1 GiB: at most about 12 GiB.", "",
        "8 GPUs under torchrun: each rank runs 1/8 of the calibration windows through the "
        "layer and the statistics are all-reduced (X^T X is hidden^2 or intermediate^2 "
        "floats: at most 3.1 GiB per all-reduce for down_proj), then the per-matrix solves "
        "are split across ranks: the matmul time divides by ~8, disk reading does not "
        "(each rank reads the layer, or one reads and broadcasts). Expect the run to be "
        "bound by reading the 141 GB once: a few minutes in all. Each rank's host memory is "
        "one layer plus its share of the activations: about 3-4 GiB per rank.", "",
    ]


def readme_md(data: dict) -> list[str]:
    """The README's "Compress an 8B model" section, from the measured arms."""
    arms = data["arms"]
    big = arms.get("llama-8b-shape/wanda")
    if big is None:
        return []
    lp, tok = big["layer_parameters"], big["calibration"]["tokens"]
    c = cpu_per_layer(big) / (lp * tok)
    full = 128 * 2048
    cpu_h = c * lp * full * 32 / 3600  # one thread, 128 x 2048
    rss = big["peak_rss_mib"] / 1024
    act_full = 2 * full * 4096 * 2 / GIB  # a layer's inputs and outputs, bf16
    gpu_flops = 2 * 2 * lp * full * 32
    g1 = gpu_flops / 300e12 / 60
    return [
        "## README section", "",
        "### Compress an 8B model", "",
        "Layer-wise methods (magnitude, Wanda, SparseGPT) hold one decoder layer in memory "
        "at a time with `--stream`: the model is read from its safetensors folder layer by "
        "layer and each finished layer is written to `--out` as it goes (`--resume` "
        "continues a killed run). Download the model folder first "
        "(`hf download meta-llama/Llama-3.1-8B --local-dir Llama-3.1-8B`); `--stream` reads "
        "local folders.", "",
        "CPU only:", "",
        "```bash",
        "secateur prune Llama-3.1-8B --method wanda --sparsity 0.5 --stream \\",
        "    --dtype bfloat16 --nsamples 128 --seqlen 2048 --out llama-8b-wanda50",
        "secateur eval llama-8b-wanda50 --dtype bfloat16   # loads the whole pruned model",
        "```", "",
        "One GPU (the model stays on the CPU; each layer moves to the GPU for its turn):", "",
        "```bash",
        "secateur prune Llama-3.1-8B --method wanda --sparsity 0.5 --stream --device cuda \\",
        "    --dtype bfloat16 --nsamples 128 --seqlen 2048 --out llama-8b-wanda50",
        "```", "",
        "Several GPUs (calibration windows split across ranks, statistics all-reduced):", "",
        "```bash",
        "torchrun --nproc-per-node 4 -m secateur prune Llama-3.1-8B --method wanda \\",
        "    --sparsity 0.5 --stream --device cuda --dtype bfloat16 --nsamples 128 \\",
        "    --seqlen 2048 --out llama-8b-wanda50",
        "```", "",
        "What it needs (Llama-3.1-8B shape, bf16, measured on a 2-core CPU with random "
        "weights of the real shapes, `bench/scale.py`; rows marked *extrapolated* are "
        "computed from that measurement, not run):", "",
        "| where | calibration | host memory (peak RSS) | GPU memory | time |",
        "|---|---|---:|---:|---:|",
        f"| CPU, 1 thread (measured) | {big['calibration']['windows']} x "
        f"{big['calibration']['seqlen']} | {rss:.1f} GiB | - | "
        f"{big['seconds_total'] / 60:.0f} min on a shared core "
        f"({big['seconds_per_layer_median']:.0f} s / layer; "
        f"~{cpu_per_layer(big) * 32 / 60:.0f} min on a dedicated one) |",
        f"| CPU, 1 thread (*extrapolated*) | 128 x 2048 | {rss + act_full:.1f} GiB | - | "
        f"{cpu_h:.0f} h (divide by the cores you give it, roughly) |",
        f"| 1 GPU (*extrapolated*) | 128 x 2048 | ~{rss + act_full:.0f} GiB | "
        f"~{big['job']['largest_layer_mib'] / 1024 + act_full + 1:.0f} GiB | "
        f"~{g1:.1f} min of matmul at an assumed 300 TFLOP/s, plus reading 16 GB "
        "(~10 s at 2 GB/s) and startup |",
        f"| 4 GPUs (*extrapolated*) | 128 x 2048 | ~{rss + act_full / 4:.0f} GiB per rank | "
        f"~{big['job']['largest_layer_mib'] / 1024 + act_full / 4 + 1:.0f} GiB per GPU | "
        f"~{g1 / 4 * 60:.0f} s of matmul; reading the model and startup dominate |", "",
        "Time scales with layer parameters x calibration tokens (attention adds ~8% at "
        "seqlen 2048 for this shape); the 128 x 2048 CPU row's host memory is mostly the "
        "layer's inputs and outputs (2 x 128 x 2048 x 4096 x 2 bytes = 4 GiB): use fewer "
        "windows to stay lower.", "",
        "Peak host memory does not grow with the number of layers: one layer, its inputs "
        "and outputs, and ~0.5 GiB of libraries. The pruned folder is ordinary sharded "
        "safetensors that `AutoModelForCausalLM.from_pretrained` loads. GPTQ streams the "
        "same way (saved packed, compressed-tensors, layer by layer) through the API, "
        "`secateur.jobs.prune_streamed_job(model, GPTQConfig(bits=4, group_size=128), ...)`; "
        "`secateur quantize` has no `--stream` flag yet. CUDA and torchrun numbers are "
        "extrapolated: untested here.",
        "",
    ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6], int(sys.argv[6]), sys.argv[7])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resume", action="store_true", help="skip arms already in scale.json")
    ap.add_argument("--only", nargs="*", choices=sorted(ARMS), help="run just these arms")
    ap.add_argument("--report-only", action="store_true", help="rewrite md/png from json")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep each arm's output folder (default: deleted after measuring)")
    args = ap.parse_args()
    data = load() if (args.resume or args.only or args.report_only) else {"arms": {}}
    data["machine"] = machine()
    if not args.report_only:
        for name in args.only or list(ARMS):
            if args.resume and name in data["arms"] and not args.only:
                print(f"[{name}] already measured", flush=True)
                continue
            data["arms"][name] = run_arm(name)
            if not args.keep_outputs:
                shutil.rmtree(WORK / "out" / name.replace("/", "-"), ignore_errors=True)
            data["arms"] = dict(sorted(data["arms"].items(),
                                       key=lambda kv: (kv[1]["method"], kv[1]["parameters"])))
            data["extrapolation_70b"] = extrapolate(data)
            save(data)
            a = data["arms"][name]
            print(f"[{name}] peak RSS {a['peak_rss_mib']:.0f} MiB, read "
                  f"{a['disk_read_bytes'] / MIB:.0f} MiB, {a['seconds_per_layer_median']:.1f} "
                  f"s/layer, {a['seconds_total']:.0f} s", flush=True)
    data["extrapolation_70b"] = extrapolate(data)
    save(data)
    report(data)
    plot(data)


if __name__ == "__main__":
    main()
