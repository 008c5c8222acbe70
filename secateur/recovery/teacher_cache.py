"""Teacher targets computed once per window and read back when the data is replayed.

Two layouts, each a set of .npy memory maps in one folder: `topk` keeps the k largest
log-probabilities with their token ids plus the log of the remaining mass ((2k + 1) * 4 bytes
per position: 516 at k = 64), `full` keeps every log-probability in float16 (2 * vocab bytes
per position: 98 KB for a 49k vocabulary, so only for small runs). The folder
is complete only once `meta.json` is written, last, with the fingerprint of what it holds; a
folder with another fingerprint or without it is rebuilt. The teacher runs on fixed batches in
window order, so a rebuilt cache holds the same bits.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.io import write_json_atomic
from secateur.recovery.kd_loss import TeacherTargets, teacher_targets

META = "meta.json"


def _fingerprint(meta: Path) -> str | None:
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("fingerprint") if isinstance(data, dict) else None


class TeacherCache:
    def __init__(self, folder: Path, kind: Literal["topk", "full"], topk: int,
                 temperature: float, start: int) -> None:
        self.folder, self.kind, self.topk = Path(folder), kind, topk
        self.temperature, self.start = temperature, start
        self.rows: dict[int, int] = {}
        self.seconds = 0.0
        self._logp: np.ndarray | None = None
        self._index: np.ndarray | None = None

    def _open(self, windows: list[int]) -> None:
        self.rows = {w: r for r, w in enumerate(windows)}
        # plain arrays only: an object array (pickled) is refused, never unpickled
        self._logp = np.load(self.folder / "logp.npy", mmap_mode="r", allow_pickle=False)
        if self.kind == "topk":
            self._index = np.load(self.folder / "index.npy", mmap_mode="r", allow_pickle=False)
        if self._logp.shape[0] != len(windows) or (
                self._index is not None and self._index.shape[0] != len(windows)):
            raise ValueError("the cache holds other windows")

    def build(self, teacher: nn.Module, windows: torch.Tensor, used: torch.Tensor,
              fingerprint: str, batch_size: int, bf16: bool, progress: bool) -> None:
        """Fill the cache for windows `used` (rows of `windows`) unless it already holds them."""
        meta = self.folder / META
        wanted = [int(i) for i in used]
        if _fingerprint(meta) == fingerprint:
            try:
                self._open(wanted)
                return
            except (OSError, ValueError):
                pass  # damaged, or not arrays: built again
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        begin = time.perf_counter()
        positions = windows.shape[1] - 1 - self.start
        vocab = teacher.get_output_embeddings().weight.shape[0]
        width = self.topk + 1 if self.kind == "topk" else vocab
        logp = np.lib.format.open_memmap(self.folder / "logp.npy", mode="w+",
                                         dtype=np.float32 if self.kind == "topk" else np.float16,
                                         shape=(len(wanted), positions, width))
        index = None
        if self.kind == "topk":
            index = np.lib.format.open_memmap(self.folder / "index.npy", mode="w+",
                                              dtype=np.int32,
                                              shape=(len(wanted), positions, self.topk))
        device = next(teacher.parameters()).device
        batches = range(0, len(wanted), batch_size)
        for first in tqdm(batches, desc="teacher cache", disable=not progress, leave=False):
            rows = wanted[first:first + batch_size]
            ids = windows[rows].to(device)
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = teacher(input_ids=ids, use_cache=False).logits[:, self.start:-1]
            targets = teacher_targets(logits, self.temperature,
                                      self.topk if self.kind == "topk" else None)
            logp[first:first + len(rows)] = targets.logp.cpu().numpy()
            if index is not None:
                index[first:first + len(rows)] = targets.index.int().cpu().numpy()
        logp.flush()
        if index is not None:
            index.flush()
        del logp, index
        self.seconds = time.perf_counter() - begin
        write_json_atomic(meta, {"fingerprint": fingerprint, "kind": self.kind,
                                 "windows": len(wanted), "seconds": self.seconds})
        self._open(wanted)

    def get(self, index: torch.Tensor, device: torch.device) -> TeacherTargets:
        rows = [self.rows[int(i)] for i in index]
        logp = torch.from_numpy(np.stack([self._logp[r] for r in rows])).float().to(device)
        if self._index is None:
            return TeacherTargets(logp)
        ids = torch.from_numpy(np.stack([self._index[r] for r in rows])).long().to(device)
        return TeacherTargets(logp, ids)

    def bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.glob("*.npy"))
