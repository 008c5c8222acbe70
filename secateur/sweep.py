"""`secateur sweep`: a grid of methods x sparsities, one result file per finished cell.

Layout of a sweep directory:
  sweep.json          what the sweep is (model, calibration, evaluation, tasks); a resumed
                      sweep must match it
  results/dense.json  the unpruned model's perplexity and zero-shot numbers
  results/<cell>.json one per (method, sparsity), written atomically when the cell finishes,
                      so an interrupted sweep resumes at the first cell without a file
  models/<cell>/      the pruned model while it is evaluated (kept with keep_models)
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secateur.api import CalibrationConfig
from secateur.config import MethodConfig
from secateur.errors import SecateurError
from secateur.eval.zeroshot import ZeroShotSpec
from secateur.io import write_json_atomic
from secateur.jobs import EvalSpec, eval_job, prune_job
from secateur.outputs import check_output_folder
from secateur.registry import make_config
from secateur.workdir import WorkDir, check_free, with_exit_stack

_NM = re.compile(r"^\d+:\d+$")


@dataclass(frozen=True)
class SweepSpec:
    model: str
    methods: tuple[str, ...]
    sparsities: tuple[str, ...]  # "0.5", "2:4", or "field=value" (e.g. "ratio=0.25")
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    evaluation: EvalSpec = field(default_factory=EvalSpec)
    zeroshot: ZeroShotSpec | None = None
    dtype: str = "float32"
    compact: bool = False  # store masks as bitmasks: bytes_on_disk then shows the saving
    keep_models: bool = False
    # where cells compute; not part of the identity: a sweep may resume on another device
    device: str = "auto"

    def identity(self) -> dict[str, Any]:
        """What must not change between an interrupted sweep and its resumption."""
        return {"model": self.model, "calibration": self.calibration.to_dict(),
                "evaluation": asdict(self.evaluation),
                "zeroshot": None if self.zeroshot is None else asdict(self.zeroshot),
                "dtype": self.dtype, "compact": self.compact}


def cell_options(method: str, value: str) -> MethodConfig:
    """One grid cell's config: '0.5' -> sparsity, '2:4' -> nm, 'field=value' -> that field
    (the config class parses the text: 'owl=false' is False, not the string 'false')."""
    value = value.strip()
    if _NM.match(value):
        return make_config({"method": method, "nm": value})
    if "=" in value:
        key, raw = (x.strip() for x in value.split("=", 1))
        return make_config({"method": method, key: raw})
    try:
        sparsity = float(value)
    except ValueError:
        raise SecateurError(f"sweep value '{value}' is neither a sparsity (0.5), an N:M pattern "
                            "(2:4) nor field=value (ratio=0.25)") from None
    return make_config({"method": method, "sparsity": sparsity})


def cell_id(method: str, value: str) -> str:
    return f"{method}-{value.strip().replace(':', 'of').replace('=', '')}"


def grid(spec: SweepSpec) -> list[tuple[str, MethodConfig]]:
    if not spec.methods or not spec.sparsities:
        raise SecateurError("a sweep needs at least one --methods and one --sparsities value")
    cells = []
    for method in spec.methods:
        for value in spec.sparsities:
            # every cell's config is validated here, before hours of work
            cells.append((cell_id(method, value), cell_options(method, value)))
    return cells


def _check_or_write_identity(out: Path, spec: SweepSpec) -> None:
    import json

    path = out / "sweep.json"
    ident = json.loads(json.dumps(spec.identity()))  # tuples -> lists, as read back
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("identity") != ident:
            raise SecateurError(f"{out} holds a sweep with other settings ({path}); give a new "
                                "--out or the same model, calibration, evaluation and tasks")
        grid_ = {"methods": sorted(set(saved["methods"]) | set(spec.methods)),
                 "sparsities": sorted(set(saved["sparsities"]) | set(spec.sparsities))}
    else:
        grid_ = {"methods": list(spec.methods), "sparsities": list(spec.sparsities)}
    write_json_atomic(path, {"identity": ident, **grid_})


def finished(out: Path) -> dict[str, dict]:
    import json

    results = out / "results"
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


@with_exit_stack
def run_sweep(hold: contextlib.ExitStack, spec: SweepSpec, out: Path, progress: bool = True,
              say: Callable[[str], None] = print) -> dict[str, dict]:
    """Run every missing cell; returns all results in the directory, keyed by cell. The
    folder is locked while the sweep runs: a second sweep on it fails at once."""
    from secateur.device import resolve_device

    dev = resolve_device(spec.device)  # --device cuda without CUDA: before anything loads
    out = Path(out)
    check_free(out)
    cells = grid(spec)
    if spec.evaluation.data is None and spec.zeroshot is None:
        raise SecateurError("a sweep needs something to measure: --eval or --tasks")
    check_output_folder(out, inputs=[spec.model, spec.calibration.source,
                                     spec.evaluation.data])
    hold.enter_context(WorkDir(out))
    _check_or_write_identity(out, spec)
    done = finished(out)
    if "dense" not in done:
        say("dense: evaluating the unpruned model")
        res = eval_job(spec.model, spec.evaluation, None, spec.dtype, progress, spec.zeroshot,
                       device=str(dev)).to_json()
        res.update({"cell": "dense", "method": "dense", "sparsity": 0.0})
        write_json_atomic(out / "results" / "dense.json", res)
        done["dense"] = res
    dense_ppl = done["dense"].get("perplexity")
    for n, (cid, options) in enumerate(cells, 1):
        if cid in done:
            say(f"[{n}/{len(cells)}] {cid}: done already, skipped")
            continue
        say(f"[{n}/{len(cells)}] {cid}")
        model_dir = out / "models" / cid
        res = prune_job(spec.model, options, spec.calibration, spec.evaluation, model_dir,
                        overwrite=True, dtype=spec.dtype, progress=progress,
                        compact=spec.compact, dense_perplexity=dense_ppl,
                        device=str(dev)).to_json()
        if spec.zeroshot is not None:
            from secateur.eval.zeroshot import zeroshot
            from secateur.formats.loader import load

            loaded = load(str(model_dir), dtype=spec.dtype)
            res["zeroshot"] = zeroshot(loaded.model, loaded.tokenizer, spec.zeroshot, spec.dtype,
                                       device=dev)
            del loaded
        res["cell"] = cid
        if not spec.keep_models:
            shutil.rmtree(model_dir)
            res["out"] = None
        write_json_atomic(out / "results" / f"{cid}.json", res)
        done[cid] = res
    return done
