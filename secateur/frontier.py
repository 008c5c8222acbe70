"""The frontier in llama.cpp: secateur's GGUF outputs against llama.cpp's own quantizer.

Every point is one GGUF file measured by llama.cpp itself (llama-cpp-python): MiB on disk,
perplexity on the same non-overlapping windows of two texts (packaged Wikipedia and the
TinyStories-style text; calibration is on the C4-style text, so neither was calibrated on),
and optionally greedy decode / prefill tokens per second at a stated thread count. Arms:

- llama.cpp's ladder of the model: `llama-quantize` of its F32 GGUF at each preset, without
  and with an imatrix (mean x^2 of every projection's input over the calibration tokens,
  gathered by secateur on the unquantized model: what `llama-imatrix` computes);
- secateur's rounding at the same presets, so the same tensor types and bytes: `rtn` (the
  nearest codes on the grids llama-quantize --imatrix chooses: the two should agree) and
  `gptq` (GPTQ's error-compensating codes on those grids, each grid chosen when the solve
  reaches it) and `gptq-act-order` (grids fixed first, columns by decreasing importance);
  any of them followed by `+dwq`: DWQ then learns the blocks' scales (fp16 d, m, dmin; codes
  frozen) by distillation from the unquantized model on the calibration text.
The model may be any folder secateur wrote (pruned, recovered): the ladder is then llama.cpp's
quantizer of that model. `pruned` adds smaller models made from this one (folders secateur
wrote: pruned, then recovered) as points on this model's ladder, each quantized by secateur at
`pruned_presets` x `pruned_roundings` from its own calibration statistics (its imatrix), DWQ
learning from the unquantized pruned model, and scored on the same windows: whether pruning
(+ recovery) then quantizing beats quantizing the unpruned model harder at equal bytes.
Results are written after every point to OUT/frontier.json, a rerun with `resume` skips
the points already there (same settings), and OUT/frontier.png plots perplexity against MiB
(and against decode speed when measured), marking the secateur points that beat every
llama.cpp point of no more bytes.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secateur.api import CalibrationConfig, quantize
from secateur.data.sources import load_text
from secateur.data.windows import eval_windows, tokenize_stream
from secateur.errors import SecateurError
from secateur.eval.perplexity import bos_each, resolve_bos
from secateur.formats.export import export_model
from secateur.formats.imatrix import model_imatrix, write_imatrix
from secateur.formats.loader import load
from secateur.io import mark_output, write_json_atomic
from secateur.methods.gguf import GGUFConfig
from secateur.models.loading import Loaded, copy_loaded
from secateur.outputs import check_output_folder
from secateur.quant.ggml import ggml_states
from secateur.quant.ggml_presets import NEEDS_IMATRIX, check_preset, llama_ftype
from secateur.report.frontier import figure
from secateur.runtime import llama_cpp as runtime

TEXTS = ("wiki", "tiny-stories")
# a point's rounding -> the gguf step's settings
ROUNDINGS = {"rtn": {"rounding": "rtn"}, "gptq": {"rounding": "gptq"},
             "gptq-act-order": {"rounding": "gptq", "act_order": True}}
# ROUNDING+dwq: then DWQ learns the blocks' scales from the unquantized model, codes frozen
DWQ_SUFFIX = "+dwq"


@dataclass
class FrontierSpec:
    presets: tuple[str, ...] = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_1", "q4_0")
    secateur_presets: tuple[str, ...] = ("q5_k_m", "q4_k_m", "q4_1", "q4_0")
    roundings: tuple[str, ...] = ("rtn", "gptq")
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig("c4-sample", 128, 512, 0))
    windows: int = 16
    seqlen: int = 512
    threads: int = 1
    speed: bool = False
    new_tokens: int = 64
    rounds: int = 5
    keep: tuple[str, ...] = ()  # secateur points whose .gguf stays in OUT, e.g. "q4_k_m gptq"
    dwq_steps: int = 200  # DWQ steps of 256 tokens of the calibration text, lr 1e-3
    pruned: tuple[str, ...] = ()  # folders of pruned (recovered) models made from this one
    pruned_presets: tuple[str, ...] = ("q4_k_m",)
    pruned_roundings: tuple[str, ...] = ("rtn",)

    def check(self) -> None:
        for p in self.presets:
            llama_ftype(p)  # llama.cpp's ladder takes presets secateur does not round to
        for p in (*self.secateur_presets, *self.pruned_presets):
            check_preset(p)
        for folder in self.pruned:
            if not (Path(folder) / "config.json").is_file():
                raise SecateurError(f"pruned model '{folder}' is not a model folder (no "
                                    "config.json): give folders secateur saved")
        for r in (*self.roundings, *self.pruned_roundings):
            if r.removesuffix(DWQ_SUFFIX) not in ROUNDINGS:
                raise SecateurError(f"rounding is one of {', '.join(ROUNDINGS)}, got '{r}'")

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("presets", "secateur_presets", "roundings", "keep", "rounds", "speed",
                  "pruned", "pruned_presets", "pruned_roundings"):
            out.pop(k)  # which points exist, not how each is measured
        out["calibration"] = self.calibration.model_dump()
        return out


def pruned_label(folder: str) -> str:
    """A pruned model's name in the points: its folder's name."""
    return Path(folder).name


def gguf_name(preset: str, rounding: str) -> str:
    return f"secateur-{preset}-{rounding}.gguf"


def _texts(loaded: Loaded, spec: FrontierSpec) -> dict[str, Any]:
    from secateur.offline import package_dir

    tiny = package_dir("exllamav3", "exllamav3") / "conversion" / "standard_cal_data" / \
        "tiny.utf8"
    bos = resolve_bos(loaded.model, "auto")
    out = {}
    for name, source in (("wiki", load_text("wiki", split="test")),
                         ("tiny-stories", load_text(str(tiny)))):
        ids = tokenize_stream(loaded.tokenizer, source.joined(), bos)
        out[name] = {"windows": eval_windows(ids, spec.seqlen, spec.windows,
                                             bos_each(loaded.tokenizer) if bos == "each"
                                             else None).windows,
                     "origin": getattr(source, "origin", source.name), "bos": bos}
    return out


def _measure(path: Path, evals: dict[str, Any], spec: FrontierSpec, prompt: list[int]
             ) -> dict[str, Any]:
    row: dict[str, Any] = {"mib": path.stat().st_size / 2**20}
    for name, e in evals.items():
        row[name] = runtime.perplexity(path, e["windows"], spec.threads)["perplexity"]
    if spec.speed:
        row["speed"] = runtime.decode_speed(path, prompt, spec.new_tokens, spec.threads,
                                            spec.rounds)
    return row


def frontier(model_name: str, spec: FrontierSpec, out: Path, resume: bool = False,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every point (see the module docstring) into OUT; returns the results."""
    spec.check()
    out = Path(out)
    keep = {gguf_name(*k.split()) for k in spec.keep}
    check_output_folder(out, "--out", [model_name],
                        files=["frontier.json", "frontier.png", "imatrix.gguf", *keep])
    record = out / "frontier.json"
    result: dict[str, Any] = {}
    if resume and record.exists():
        result = json.loads(record.read_text())
        if result.get("settings") != spec.settings() or result.get("model") != model_name:
            raise SecateurError(f"{record} was measured with other settings: drop --resume "
                                "or choose another --out")
    elif record.exists():
        raise SecateurError(f"{record} exists: pass --resume to add to it or choose another "
                            "--out")
    out.mkdir(parents=True, exist_ok=True)
    points: dict[str, Any] = result.setdefault("points", {})
    result.update({"model": model_name, "settings": spec.settings(),
                   "machine": platform.processor() or platform.machine(),
                   "runtime": f"llama-cpp-python {runtime._llama_cpp().__version__}"})

    def save(name: str, row: dict[str, Any]) -> None:
        points[name] = row
        write_json_atomic(record, result)
        mark_output(out, ["frontier.json"])
        ppl = ", ".join(f"{k} {row[k]:.3f}" for k in TEXTS if k in row)
        say(f"{name}: {row['mib']:.1f} MiB, {ppl}")

    base = load(model_name)
    evals = _texts(base, spec)
    result["protocol"] = {name: {"origin": e["origin"], "windows": len(e["windows"]),
                                 "seqlen": spec.seqlen, "bos": e["bos"]}
                          for name, e in evals.items()}
    prompt = evals["wiki"]["windows"][0].reshape(-1)[:16].tolist()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        f32 = Path(tmp) / "f32.gguf"
        export_model(base.model, base.tokenizer, "gguf", f32, outtype="f32", name=model_name)
        if "f32" not in points:
            save("f32", _measure(f32, evals, spec, prompt))
        imatrix = None
        for preset in spec.presets:
            # llama.cpp refuses some presets without an imatrix: they get only that arm
            arms = (True,) if preset in NEEDS_IMATRIX else (False, True)
            for with_imatrix in arms:
                name = f"llama.cpp {preset}" + (" imatrix" if with_imatrix else "")
                if name in points:
                    continue
                if with_imatrix and imatrix is None:
                    dense = copy_loaded(base)
                    quantize(dense, GGUFConfig(preset="q4_k_m", rounding="rtn",
                                               sequential=False), spec.calibration,
                             progress=False)
                    means = model_imatrix(dense.model)
                    write_imatrix(out / "imatrix.gguf", means, spec.calibration.source,
                                  spec.calibration.seqlen, spec.calibration.nsamples)
                    mark_output(out, ["imatrix.gguf"])
                    imatrix = {k: v for k, (v, _) in means.items()}
                    del dense
                path = Path(tmp) / "llama.gguf"
                runtime.quantize(f32, path, preset, imatrix if with_imatrix else None,
                                 spec.threads)
                save(name, _measure(path, evals, spec, prompt))
                path.unlink()
        for preset in spec.secateur_presets:
            for rounding in spec.roundings:
                name = f"secateur {preset} {rounding}"
                if name in points:
                    continue
                kept = gguf_name(preset, rounding) in keep
                path = out / gguf_name(preset, rounding) if kept else Path(tmp) / "ours.gguf"
                save(name, _ours(base, preset, rounding, spec, path, evals, prompt,
                                 model_name))
                if kept:
                    mark_output(out, [path.name])
                else:
                    path.unlink()
        for folder in spec.pruned:
            label = pruned_label(folder)
            todo = [(p, r) for p in spec.pruned_presets for r in spec.pruned_roundings
                    if f"secateur {label} {p} {r}" not in points]
            if not todo:
                continue
            small = load(folder)
            for preset, rounding in todo:
                path = Path(tmp) / "pruned.gguf"
                row = _ours(small, preset, rounding, spec, path, evals, prompt, label)
                row["pruned_from"] = model_name
                row["model"] = str(folder)
                row["parameters"] = sum(p.numel() for p in small.model.parameters())
                save(f"secateur {label} {preset} {rounding}", row)
                path.unlink()
            del small
    plot_frontier(result, out / "frontier.png")
    mark_output(out, ["frontier.png"])
    return result


def _ours(base: Loaded, preset: str, rounding: str, spec: FrontierSpec, path: Path,
          evals: dict[str, Any], prompt: list[int], name: str) -> dict[str, Any]:
    """secateur's GGUF of `base` at `preset` with `rounding` (+dwq from `base` itself),
    written to `path` and measured."""
    model = copy_loaded(base)
    t = time.perf_counter()
    quantize(model, GGUFConfig(preset=preset, **ROUNDINGS[rounding.removesuffix(DWQ_SUFFIX)]),
             spec.calibration, progress=False)
    if rounding.endswith(DWQ_SUFFIX):
        from secateur.recovery.dwq import DWQConfig, dwq

        dwq(model, base, DWQConfig(data=spec.calibration.source, steps=spec.dwq_steps, lr=1e-3,
                                   seqlen=min(256, spec.calibration.seqlen), batch_size=1,
                                   seed=spec.calibration.seed),
            progress=False)
    seconds = time.perf_counter() - t
    export_model(model.model, base.tokenizer, "gguf", path, overwrite=True, outtype=preset,
                 name=name, quantized=ggml_states(model.model), has_imatrix=True)
    row = _measure(path, evals, spec, prompt)
    row["quantize_seconds"] = seconds
    return row


def plot_frontier(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = figure(result, plt)
    fig.savefig(path, dpi=110)
    plt.close(fig)
