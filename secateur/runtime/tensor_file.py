"""Tensors of a safetensors file read into memory the model owns, one at a time, no mapping.

Why not `safe_open`: its tensors are views of the file's memory mapping, and every page a
loader touches stays resident while any of those views is alive; copying them out leaves the
whole file resident until the mapping closes. A packed model's loader reads each tensor once
(codes into a kernel's layout, tables into the model), so plain reads bound the peak to what is
kept plus one tensor in flight (smollm2 int8: peak ~0.96 of the fp32 model above the import
floor with mapped reads and copies).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from secateur.errors import SecateurError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class TensorFile:
    """`keys()` and `get_tensor(key)` as safe_open has them, each tensor a fresh allocation."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            try:
                header = json.loads(f.read(size))
            except ValueError as err:
                raise SecateurError(f"'{self.path}' is not a safetensors file (its header does "
                                    f"not parse: {err})") from None
        header.pop("__metadata__", None)
        self.entries = header
        self.start = 8 + size

    def keys(self) -> list[str]:
        return list(self.entries)

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        if entry["dtype"] not in DTYPES:
            raise SecateurError(f"'{key}' in '{self.path}' has dtype {entry['dtype']}, which "
                                "secateur's packed loader does not read")
        begin, end = entry["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(memoryview(data.numpy())) != end - begin:
                raise SecateurError(f"'{self.path}' ends inside tensor '{key}': the file is "
                                    "truncated")
        return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
