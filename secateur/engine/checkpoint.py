"""Resuming a layer-wise run: after each finished layer, what the next one needs, on disk.

The checkpoint folder holds

    checkpoint.json           the commit point: fingerprint, finished layers, their reports
    layer-00003.safetensors   layer 3 after the method, tensors named as in the whole model:
                              its state_dict, quantization grids and a gguf step's
                              llama.cpp blocks included; their schemes and W8A8 marks
                              as JSON in its metadata
    hidden-00004.safetensors  layer 4's inputs (one tensor per window) and the RNG state

Each file is written under a partial name, flushed and renamed (`secateur.io`), and
checkpoint.json is replaced last, so a kill at any instant leaves the previous state or the
new one. Only the newest hidden-*.safetensors is kept: the checkpoint is the finished layers
plus one set of activations. Every file is safetensors or JSON (nothing is unpickled), and
each safetensors file names the run that wrote it (a hash of the fingerprint): a layer written
by a run with other settings is refused, never mixed in. The jobs keep this folder inside
--out's working folder, locked while they run (`secateur.workdir`).

A checkpoint written with another model, method setting, calibration set or device is
refused with one line naming what differs, rather than overwritten: it may be hours of work
that a mistyped flag would otherwise delete. What a method measures before the layer loop
(OWL's outlier ratios) is recomputed by the caller's `prepare()` on the same dense model and
calibration, then checked against the saved summary, so a measurement that came out
differently is refused too instead of silently mixing two sets of layer targets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.formats.streaming import StreamedWeights, read_header, read_tensors, write_tensors
from secateur.io import write_atomic, write_json_atomic
from secateur.methods.base import LayerReport, LayerwiseMethod
from secateur.outputs import check_output_folder
from secateur.quant.ggml import GGMLScheme, clear_ggml_state, ggml_scheme, set_ggml_scheme
from secateur.quant.ggml_names import PREFIX as GGML_PREFIX
from secateur.quant.scheme import QuantScheme
from secateur.quant.state import (
    G_IDX,
    INT8_TOKEN,
    SCALE,
    ZERO,
    QuantState,
    activation_quant,
    clear_quant_state,
    quant_scheme,
    set_quant_state,
)

# 3: grids in the layer's state_dict; 4: llama.cpp block codes kept too; 5: those codes as
# buffers of the state_dict
VERSION = 5
STATE = "checkpoint.json"
QUANT = "quant"  # a layer file's metadata key: its grids' schemes and W8A8 marks (JSON)
_SAMPLE = 4096  # values hashed per tensor: tells models apart without reading every weight

# No live run can hold the checkpoint being read (the jobs lock --out): starting over is safe.
_START_OVER = "start over without --resume"
_PARTS = {"model": "model", "method": "method settings", "calibration": "calibration data",
          "run": "device or engine version"}


def _tensor_digest(h: Any, name: str, t: torch.Tensor, values: bool = True) -> None:
    h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
    if not values or t.is_meta or t.numel() == 0:
        return
    flat = t.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].cpu().contiguous()
    h.update(sample.view(torch.uint8).numpy().tobytes())


def _settings(method: LayerwiseMethod) -> Any:
    config = getattr(method, "config", None)
    return config.settings() if hasattr(config, "settings") else repr(config)


def fingerprint(model: nn.Module, method: LayerwiseMethod, calibration: list[torch.Tensor],
                sequential: bool, device: torch.device | None,
                stream: StreamedWeights | None = None) -> dict[str, str]:
    """Hashes of what decides the result; call it on the dense model, after `prepare()`."""
    m = hashlib.sha256(model.config.to_json_string().encode())
    for name, t in model.state_dict().items():
        # Streamed tensors come and go (meta or not); their source files stand for them.
        _tensor_digest(m, name, t, values=stream is None)
    if stream is not None:
        m.update(stream.source.fingerprint().encode())
    c = hashlib.sha256()
    for w in calibration:
        c.update(f"{tuple(w.shape)}:{w.dtype}".encode())
        c.update(w.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    method_part = json.dumps({"class": type(method).__qualname__, "settings": _settings(method),
                              "sequential": sequential}, sort_keys=True, default=str)
    prepared = json.dumps(method.summary(), sort_keys=True, default=str)
    run = {"version": VERSION, "device": str(torch.device(device).type if device else "cpu")}
    return {"model": m.hexdigest(), "calibration": c.hexdigest(),
            "method": hashlib.sha256(method_part.encode()).hexdigest(),
            "run": hashlib.sha256(json.dumps(run).encode()).hexdigest(),
            "prepared": hashlib.sha256(prepared.encode()).hexdigest()}


@dataclass
class Resumed:
    """Where an interrupted run stopped: layers [0, done) are finished."""

    done: int
    reports: list[LayerReport]
    hidden: list[torch.Tensor]
    rng: torch.Tensor


def _quant_marks(layer: nn.Module) -> dict[str, dict[str, Any]]:
    """What quantize methods leave on a layer's linears besides the state_dict's tensors: each
    grid's scheme (`secateur.quant.state`), each llama.cpp block type (`secateur.quant.ggml`)
    and a run-time activation quantization mark (W8A8)."""
    marks: dict[str, dict[str, Any]] = {}
    for path, module in layer.named_modules():
        scheme, ggml, act = quant_scheme(module), ggml_scheme(module), activation_quant(module)
        if scheme is not None or ggml is not None or act is not None:
            marks[path] = {"grid": None if scheme is None else asdict(scheme),
                           "ggml": None if ggml is None else asdict(ggml), "act": act}
    return marks


def _module_key(prefix: str, path: str) -> str:
    """Where a submodule's tensors start in the layer file's names (`path` "" is the layer)."""
    return f"{prefix}{path}." if path else prefix


def _restore_quant(layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor],
                   marks: dict[str, dict[str, Any]]) -> None:
    """Register the saved grids and llama.cpp blocks (so that `load_state_dict` finds their
    keys) and marks."""
    from secateur.runtime.int8 import mark_w8a8

    for module in layer.modules():
        clear_quant_state(module)
        clear_ggml_state(module)
    for path, mark in marks.items():
        module = layer.get_submodule(path) if path else layer
        key = _module_key(prefix, path)
        if mark["grid"] is not None:
            scheme = QuantScheme(**mark["grid"])
            set_quant_state(module, QuantState(
                scheme.bits, scheme.group_size, scheme.symmetric, tensors[key + SCALE],
                tensors[key + ZERO], tensors.get(key + G_IDX), scheme.actorder))
        if mark["ggml"] is not None:
            # the buffers directly under this module (a submodule's would hold a dot)
            blocks = {k[len(key):]: v for k, v in tensors.items()
                      if k.startswith(key + GGML_PREFIX) and "." not in k[len(key):]}
            set_ggml_scheme(module, GGMLScheme(**mark["ggml"]), blocks)
        if mark["act"] == INT8_TOKEN:
            mark_w8a8(module)
        elif mark["act"] is not None:
            raise SecateurError(f"checkpoint holds activation quantization '{mark['act']}', "
                                f"which this secateur cannot restore: {_START_OVER}")


class LayerCheckpoint:
    """Save after each finished layer; on a rerun, say where to continue."""

    def __init__(self, folder: Path, fingerprint: dict[str, str], layers_path: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.layers_path = layers_path
        check_output_folder(self.folder, flag="checkpoint")

    def layer_file(self, index: int) -> Path:
        return self.folder / f"layer-{index:05d}.safetensors"

    def _hidden_file(self, index: int) -> Path:
        return self.folder / f"hidden-{index:05d}.safetensors"

    def _prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."

    @property
    def _run(self) -> str:
        """The writing run's name inside every file: settings of the same fingerprint."""
        blob = json.dumps(self.fingerprint, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def _header(self, path: Path) -> dict[str, Any]:
        """The header of a file this run wrote; a damaged one or another run's is refused."""
        try:
            header, _ = read_header(path)
        except SecateurError:
            raise SecateurError(f"checkpoint '{self.folder}': {path.name} is not a readable "
                                f"safetensors file: {_START_OVER}") from None
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or meta.get("run") != self._run:
            raise SecateurError(f"checkpoint '{self.folder}': {path.name} was written by a run "
                                f"with other settings: {_START_OVER}")
        return header

    def _read(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        header = self._header(path)
        return header, read_tensors(path, [k for k in header if k != "__metadata__"])

    # -- reading -----------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        """The saved state, None for a fresh start; refuses a checkpoint of other settings."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            saved = state["fingerprint"]
            done = int(state["done"])
            hidden_name, windows = str(state["hidden"]), int(state["windows"])
            reports = [LayerReport(**r) for r in state["reports"]]
            if not (isinstance(saved, dict) and re.fullmatch(r"hidden-\d{5}\.safetensors",
                                                             hidden_name)):
                raise ValueError("not a checkpoint of this layout")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SecateurError(f"checkpoint '{self.folder}' is unreadable ({err}): "
                                f"{_START_OVER}") from None
        if state.get("version") != VERSION:
            raise SecateurError(f"checkpoint '{self.folder}' was written by another secateur "
                                f"version: {_START_OVER}")
        differ = [label for key, label in _PARTS.items() if saved.get(key) !=
                  self.fingerprint[key]]
        if differ:
            raise SecateurError(f"checkpoint '{self.folder}' was written by a run with a "
                                f"different {', '.join(differ)}: rerun with the same settings, "
                                f"or {_START_OVER}")
        if saved.get("prepared") != self.fingerprint["prepared"]:
            raise SecateurError(f"checkpoint '{self.folder}': the method's measurement before "
                                "the layer loop (e.g. OWL ratios) came out differently this "
                                f"time; {_START_OVER}")
        needed = [self.layer_file(i) for i in range(done)] + [self.folder / hidden_name]
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise SecateurError(f"checkpoint '{self.folder}' is incomplete (no {missing[0]}): "
                                f"{_START_OVER}")
        for path in needed[:-1]:  # the finished layers: this run's, before any is used
            self._header(path)
        _, tensors = self._read(self.folder / hidden_name)
        if set(tensors) != {f"window-{i:05d}" for i in range(windows)} | {"rng"}:
            raise SecateurError(f"checkpoint '{self.folder}': {hidden_name} does not hold the "
                                f"activations it should: {_START_OVER}")
        hidden = [tensors[f"window-{i:05d}"] for i in range(windows)]
        return Resumed(done, reports, hidden, tensors["rng"])

    def restore_layer(self, index: int, layer: nn.Module) -> None:
        """Put a finished layer's saved weights (and grids) back into the in-memory model."""
        prefix = self._prefix(index)
        header, tensors = self._read(self.layer_file(index))
        try:
            marks = json.loads(header["__metadata__"].get(QUANT, "{}"))
            _restore_quant(layer, prefix, tensors, marks)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SecateurError(f"checkpoint '{self.folder}': {self.layer_file(index).name} is "
                                f"damaged: {_START_OVER}") from None
        try:
            layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()},
                                  strict=True)
        except RuntimeError:
            raise SecateurError(f"checkpoint '{self.folder}': layer {index} does not fit the "
                                f"model: {_START_OVER}") from None

    # -- writing -----------------------------------------------------------------------------
    def save(self, index: int, layer: nn.Module, hidden: list[torch.Tensor],
             reports: list[LayerReport]) -> Path:
        """Commit layer `index` as finished, with the inputs of layer `index + 1`."""
        prefix = self._prefix(index)
        layer_path = self.layer_file(index)
        run = {"run": self._run}
        tensors = {prefix + k: v for k, v in layer.state_dict().items()}
        marks = _quant_marks(layer)
        meta = {**run, QUANT: json.dumps(marks)} if marks else run
        write_atomic(layer_path, lambda tmp: write_tensors(tmp, tensors, meta))
        hidden_path = self._hidden_file(index + 1)
        saved = {f"window-{i:05d}": h for i, h in enumerate(hidden)}
        saved["rng"] = torch.get_rng_state()
        write_atomic(hidden_path, lambda tmp: write_tensors(tmp, saved, run))
        write_json_atomic(self.folder / STATE, {
            "version": VERSION, "fingerprint": self.fingerprint, "done": index + 1,
            "hidden": hidden_path.name, "windows": len(hidden),
            "reports": [asdict(r) for r in reports]})
        for old in self.folder.glob("hidden-*.safetensors"):
            if old != hidden_path:
                old.unlink(missing_ok=True)
        return layer_path

    def remove(self) -> None:
        remove_checkpoint(self.folder)


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint's files (the state first, so a kill midway leaves no state pointing
    at missing files), and the folder if nothing else is in it."""
    folder = Path(folder)
    (folder / STATE).unlink(missing_ok=True)
    for pattern in ("layer-*.safetensors", "hidden-*.safetensors"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # it holds something else of the user's: leave it
        folder.rmdir()
