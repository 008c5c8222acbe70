"""Models bigger than memory: decoder layers read from safetensors one at a time.

`load_streamed(path)` builds the model on the meta device (no weights allocated) and loads
only what sits outside the decoder layers (embeddings, final norm, head, rotary buffers). The
layer-wise engine asks the returned `StreamedWeights` to materialise layer i just before it
runs, to write the changed layer to its own output shard, and to free it; `finish` adds the
rest and an index, so the output is an ordinary sharded model folder that
`AutoModelForCausalLM.from_pretrained` loads. Resident weights: the non-layer tensors plus
one layer.

A quantize method (GPTQ, RTN, W8A8) leaves a grid on each linear it quantized
(`secateur.quant.state`): such a layer is written packed, in compressed-tensors' layout
(`packed_save`), and `finish` writes the `quantization_config`, so the streamed output is the
same checkpoint `save_packed` makes of the model quantized in memory, except that the
embeddings keep the source's bytes (save_packed stores them in float16).

Tensors are read and written with plain file I/O in the safetensors format rather than
through mmap: a mapped file's touched pages count towards this process's resident memory
until it is unmapped, and `safetensors.torch.save_file` serialises to one more in-memory copy.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.errors import SecateurError
from secateur.models.base import ModelAdapter, adapter_for
from secateur.models.mask import MASK, clear_mask, mask_keys
from secateur.quant.ggml_names import ggml_keys
from secateur.quant.state import GRID_TENSORS, clear_quant_state, is_quantized, quant_state

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# -- safetensors files, without mmap --------------------------------------------------------

def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            size_bytes = f.read(8)
            if len(size_bytes) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", size_bytes)
            if n > 100_000_000:
                raise ValueError("header size is not plausible")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if os.path.getsize(path) < 8 + n + end:
            raise ValueError("truncated")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SecateurError(f"'{path}' is not a readable safetensors file ({err}): re-save or "
                            "re-download the model") from None
    return header, 8 + n


def read_tensors(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file, each read straight into its own memory."""
    header, start = read_header(path)
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as f:
        for key in keys:
            info = header[key]
            if info["dtype"] not in _DTYPES:
                raise SecateurError(f"'{path}': tensor {key} has dtype {info['dtype']}, which "
                                    "secateur cannot stream; load the model normally")
            t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            if end > begin:
                f.seek(start + begin)
                view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                read = 0
                while read < end - begin:  # readinto may return short counts on big reads
                    got = f.readinto(view[read:])
                    if not got:
                        raise SecateurError(f"'{path}' ended early reading {key}: re-save the "
                                            "model")
                    read += got
            out[key] = t
    return out


@dataclass(frozen=True)
class FileRange:
    """A tensor's bytes inside a safetensors file, copied to another without loading them."""

    path: Path
    offset: int
    nbytes: int
    dtype: str  # safetensors code, e.g. F32
    shape: tuple[int, ...]


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor | FileRange],
                  metadata: Mapping[str, str] | None = None) -> int:
    """Write a safetensors file (not atomically: see `secateur.io.atomic_file`); its size."""
    flat = {k: v if isinstance(v, FileRange) else v.detach().cpu().contiguous()
            for k, v in tensors.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key, t in flat.items():
        if isinstance(t, FileRange):
            code, shape, nbytes = t.dtype, list(t.shape), t.nbytes
        elif t.dtype in _CODES:
            code, shape, nbytes = _CODES[t.dtype], list(t.shape), t.numel() * t.element_size()
        else:
            raise SecateurError(f"cannot write tensor {key} of dtype {t.dtype} to safetensors")
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in flat.values():
            if isinstance(t, FileRange):
                _copy_range(t, f)
            elif t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return 8 + len(raw) + offset


def _copy_range(src: FileRange, out: Any, chunk: int = 1 << 20) -> None:
    with open(src.path, "rb") as f:
        f.seek(src.offset)
        left = src.nbytes
        while left:
            data = f.read(min(chunk, left))
            if not data:
                raise SecateurError(f"'{src.path}' ended early: re-save the model")
            out.write(data)
            left -= len(data)


# -- the source checkpoint -------------------------------------------------------------------

class SafetensorsSource:
    """Which file of a local model folder holds each tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise SecateurError(f"'{self.folder / INDEX}' is not a valid index ({err}): "
                                    "re-save the model") from None
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        elif (self.folder / SINGLE).is_file():
            header, _ = read_header(self.folder / SINGLE)
            self.files = {k: self.folder / SINGLE for k in header if k != "__metadata__"}
        else:
            raise SecateurError(f"'{self.folder}' has no safetensors weights ({SINGLE} or "
                                f"{INDEX}): streaming reads safetensors only; re-save the "
                                "model with save_pretrained")
        read = {p: read_header(p) for p in sorted(set(self.files.values()))}
        self.headers = {p: h for p, (h, _) in read.items()}
        self.starts = {p: start for p, (_, start) in read.items()}
        self._maps: dict[Path, mmap.mmap] = {}

    def range(self, key: str) -> FileRange:
        path = self.files[key]
        info = self.headers[path][key]
        begin, end = info["data_offsets"]
        return FileRange(path, self.starts[path] + begin, end - begin, info["dtype"],
                         tuple(info["shape"]))

    def mapped(self, key: str) -> torch.Tensor:
        """A read-only tensor over the file's pages. Its memory is the page cache: only the
        pages touched become resident, and none count as this process's private memory."""
        r = self.range(key)
        if r.dtype not in _DTYPES:
            raise SecateurError(f"'{r.path}': tensor {key} has dtype {r.dtype}, which "
                                "secateur cannot stream; load the model normally")
        dtype = _DTYPES[r.dtype]
        if r.nbytes == 0:
            return torch.empty(r.shape, dtype=dtype)
        if r.path not in self._maps:
            with open(r.path, "rb") as f:
                self._maps[r.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only on purpose: nothing writes these tensors
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._maps[r.path], dtype=dtype,
                                    count=r.nbytes // dtype.itemsize, offset=r.offset)
        return flat.view(r.shape)

    def release_maps(self) -> None:
        """Forget the mappings; each closes once no tensor uses it any more."""
        self._maps.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            out.update(read_tensors(path, names))
        return out

    def fingerprint(self) -> str:
        """Each file's header, size and 16 evenly spaced 4 KiB samples: cheap at any size."""
        h = hashlib.sha256()
        for path, header in self.headers.items():
            size = path.stat().st_size
            h.update(json.dumps(header, sort_keys=True).encode() + str(size).encode())
            with open(path, "rb") as f:
                for k in range(16):
                    f.seek(size * k // 16)
                    h.update(f.read(4096))
        return h.hexdigest()


# -- the meta-device model -------------------------------------------------------------------

def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._parameters:
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value


def _materialise_buffers(model: nn.Module) -> None:
    """Buffers computed in __init__ (rotary frequencies, Gemma's embedding scale) are meta
    too; transformers' own loader restores them the same way: empty, then `_init_weights`."""
    for module in model.modules():
        meta = [k for k, b in module._buffers.items() if b is not None and b.is_meta]
        for k in meta:
            module._buffers[k] = torch.empty_like(module._buffers[k], device="cpu")
        if meta:
            model._init_weights(module)


def _checkpoint_names(model: nn.Module, file_keys: list[str]) -> dict[str, str]:
    """Model tensor name -> name in the files. transformers renames some on loading (GPT-NeoX's
    `embed_out` is the model's `lm_head`; a base-model checkpoint lacks the `model.` prefix);
    its own renaming rules are applied here. Tensors it would merge or split (fused experts)
    are left out, so asking for them fails with a clear message."""
    names = {k: k for k in file_keys}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        conversions = get_model_conversion_mapping(model)
    except (ImportError, AttributeError, TypeError):  # another transformers: names as saved
        return names
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    for key in sorted(file_keys):
        renamed, converted = rename_source_key(key, renamings, converters, prefix, meta)
        if converted is None:
            names[renamed] = key
    return names


class StreamedWeights:
    """The decoder layers of a meta-device model, read from and written to safetensors."""

    def __init__(self, source: SafetensorsSource, model: nn.Module, adapter: ModelAdapter,
                 dtype: torch.dtype) -> None:
        self.source, self.model, self.adapter, self.dtype = source, model, adapter, dtype
        self.names = _checkpoint_names(model, list(source.files))
        self.num_layers = adapter.num_layers
        self.work: Path | None = None
        self.written: dict[int, Path] = {}
        # per written layer: its linears written packed (name -> Scheme as stored) and the
        # linears it left unquantized
        self.packed: dict[int, dict[str, Any]] = {}
        self.unpacked: dict[int, list[str]] = {}
        self._widths: list[int] | None = None
        self.rest_loaded = False
        state = model.state_dict(keep_vars=True)
        self.model_bytes = sum(t.numel() * t.element_size()
                               for t in {id(t): t for t in state.values()}.values())
        self.largest_layer_bytes = max(self._layer_bytes(i) for i in range(self.num_layers))

    # -- names ---------------------------------------------------------------------------
    def prefix(self, index: int) -> str:
        return f"{self.adapter.layers_path}.{index}."

    def _layer_bytes(self, index: int) -> int:
        return sum(t.numel() * t.element_size()
                   for t in self.adapter.layers[index].state_dict(keep_vars=True).values())

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by their names in the model, read under their names in the files."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise SecateurError(f"'{self.source.folder}' has no tensor for {missing[0]} (or "
                                "stores it in a layout transformers converts on loading): load "
                                "the model normally instead of streaming it")
        tensors = self.source.read(self.names[n] for n in names)
        return {n: tensors[self.names[n]].to(self.dtype)
                if tensors[self.names[n]].is_floating_point() else tensors[self.names[n]]
                for n in names}

    # -- the non-layer tensors -------------------------------------------------------------
    def _rest_parameters(self) -> list[list[str]]:
        """Names of the parameters outside the decoder layers, tied ones grouped."""
        layers = f"{self.adapter.layers_path}."
        groups: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if not name.startswith(layers):
                groups.setdefault(id(p), []).append(name)
        return list(groups.values())

    def _same_dtype(self, name: str) -> bool:
        return name in self.names and \
            _DTYPES.get(self.source.range(self.names[name]).dtype) == self.dtype

    def _rest_tensor(self, name: str) -> torch.Tensor:
        """Mapped from the file when no conversion is needed: a 262k-token vocabulary's
        embeddings then cost only the rows the calibration windows touch."""
        if self._same_dtype(name):
            return self.source.mapped(self.names[name])
        return self._read([name])[name]

    def load_rest(self) -> None:
        """Everything outside the decoder layers; tied tensors are read once and stay tied.
        A no-op while they are loaded."""
        if self.rest_loaded:
            return
        for names in self._rest_parameters():
            key = next((n for n in names if n in self.names), names[0])
            value = nn.Parameter(self._rest_tensor(key), requires_grad=False)
            for name in names:
                _set_tensor(self.model, name, value)
        layers = f"{self.adapter.layers_path}."
        for name, module in self.model.named_modules():
            if name == self.adapter.layers_path or name.startswith(layers):
                continue
            for leaf, buf in module._buffers.items():
                key = f"{name}.{leaf}" if name else leaf
                if buf is not None and leaf not in module._non_persistent_buffers_set \
                        and key in self.names:
                    module._buffers[leaf] = self._read([key])[key]
        self.rest_loaded = True

    def unload_rest(self) -> None:
        """Free the embeddings and head while only decoder layers run: a large vocabulary's
        embeddings can outweigh a layer many times over. `load_rest` reads them again."""
        for names in self._rest_parameters():
            p = self.model.get_parameter(names[0])
            empty = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                 requires_grad=False)
            for name in names:
                _set_tensor(self.model, name, empty)
        self.source.release_maps()
        self.rest_loaded = False

    # -- one layer ---------------------------------------------------------------------------
    def load_layer(self, index: int) -> None:
        layer = self.adapter.layers[index]
        for module in layer.modules():
            clear_mask(module)  # no file holds one; the method records it anew
        names = list(layer.state_dict(keep_vars=True))
        prefix = self.prefix(index)
        tensors = self._read([prefix + n for n in names])
        for n in names:
            _set_tensor(layer, n, tensors[prefix + n])

    def unload_layer(self, index: int) -> None:
        """Back to meta tensors of the same shapes: the weights' memory is freed, and so are
        the grids a quantize method left (they are in the written shard)."""
        layer = self.adapter.layers[index]
        for module in layer.modules():
            clear_quant_state(module)
            clear_mask(module)  # only for the step that recorded it: no output holds it
        for n, t in layer.state_dict(keep_vars=True).items():
            _set_tensor(layer, n, torch.empty(t.shape, dtype=t.dtype, device="meta"))

    def _loaded(self, index: int) -> bool:
        return not any(t.is_meta for t in
                       self.adapter.layers[index].state_dict(keep_vars=True).values())

    def _quantized(self, index: int) -> bool:
        return is_quantized(self.adapter.layers[index])

    def _linear_widths(self) -> list[int]:
        """Input widths of every decoder-layer linear (known on the meta device too): the
        stored group size is their gcd with the grid's, as `save_packed` makes it."""
        if self._widths is None:
            self._widths = sorted({
                p.module.in_features for layer in self.adapter.layers
                for p in self.adapter.linears(layer).values()
                if isinstance(p.module, nn.Linear)})
        return self._widths

    def _output_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s tensors as saved: quantized linears packed (compressed-tensors)."""
        tensors = self.layer_tensors(index)
        self.packed.pop(index, None)
        self.unpacked.pop(index, None)
        if not self._quantized(index):
            return tensors
        from dataclasses import replace

        from secateur.formats.packed_save import packed_tensors, scheme_of, stored_group
        packed: dict[str, Any] = {}
        unpacked: list[str] = []
        for name, module in self.adapter.layers[index].named_modules():
            full = self.prefix(index) + name
            state = quant_state(module)
            if state is None:
                if isinstance(module, nn.Linear):
                    unpacked.append(full)
                continue
            scheme = scheme_of(full, module, state)
            stored = replace(scheme, group_size=stored_group(scheme.group_size,
                                                             self._linear_widths()))
            for leaf in ("weight", *GRID_TENSORS):
                tensors.pop(f"{full}.{leaf}", None)
            tensors.update(packed_tensors(full, module, state, stored))
            packed[full] = stored
        self.packed[index], self.unpacked[index] = packed, unpacked
        return tensors

    def layer_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s saved tensors under their names in the whole model (no pruning
        mask nor llama.cpp block buffers: plain transformers must load the output)."""
        prefix = self.prefix(index)
        layer = self.adapter.layers[index]
        skip = mask_keys(layer) | ggml_keys(layer)
        return {prefix + k: v for k, v in layer.state_dict().items() if k not in skip}

    # -- the output ------------------------------------------------------------------------
    def begin(self, work: Path) -> None:
        """Write output shards into the folder `work` (an `atomic_dir`'s temporary folder)."""
        self.work = Path(work)
        self.written = {}

    def _shard(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.num_layers + 1:05d}.safetensors"

    def _need_work(self) -> Path:
        if self.work is None:
            raise SecateurError("StreamedWeights.begin(folder) must be called before the "
                                "layers are written")
        return self.work

    def write_layer(self, index: int) -> Path:
        path = self._need_work() / self._shard(index + 2)
        write_tensors(path, self._output_tensors(index))
        self.written[index] = path
        return path

    def adopt_layer(self, index: int, file: Path) -> Path:
        """A finished layer already saved (by a checkpoint) becomes its output shard. A
        quantized layer is written packed instead, from memory: the checkpoint holds it
        dequantized."""
        if self._loaded(index) and self._quantized(index):
            return self.write_layer(index)
        header, start = read_header(Path(file))
        if any(key.rpartition(".")[2] in GRID_TENSORS for key in header):
            raise SecateurError("a streamed quantization cannot resume from its checkpoint "
                                "yet (the checkpoint holds dequantized layers): run it again "
                                "without --resume")
        path = self._need_work() / self._shard(index + 2)
        path.unlink(missing_ok=True)
        if any(key.rpartition(".")[2] == MASK for key in header):
            # the checkpoint keeps the layer's pruning masks, which no output may: the other
            # tensors' bytes are copied without them
            write_tensors(path, {
                k: FileRange(Path(file), start + v["data_offsets"][0],
                             v["data_offsets"][1] - v["data_offsets"][0], v["dtype"],
                             tuple(v["shape"]))
                for k, v in header.items()
                if k != "__metadata__" and k.rpartition(".")[2] != MASK})
        else:
            try:
                os.link(file, path)  # no second copy of the bytes on disk
            except OSError:
                shutil.copyfile(file, path)
        self.written[index] = path
        self.packed.pop(index, None)
        self.unpacked.pop(index, None)
        return path

    def _quantization_config(self, work: Path) -> None:
        """config.json with compressed-tensors' quantization_config, as `save_packed` writes
        it: one config group per scheme, every other linear (the head) ignored."""
        from secateur.formats.packed_save import write_quantization_config

        if len(self.packed) != self.num_layers:
            plain = sorted(set(range(self.num_layers)) - set(self.packed))
            raise SecateurError(f"layers {plain} were written unquantized while others are "
                                "packed: run the quantization again from the start")
        groups: dict[Any, list[str]] = {}
        for index in sorted(self.packed):
            for name, scheme in self.packed[index].items():
                groups.setdefault(scheme, []).append(name)
        layers = f"{self.adapter.layers_path}."
        ignore = [n for n, m in self.model.named_modules()
                  if isinstance(m, nn.Linear) and not n.startswith(layers)]
        ignore += [n for index in sorted(self.unpacked) for n in self.unpacked[index]]
        write_quantization_config(self.model, groups, ignore, work)

    def finish(self, tokenizer: Any = None) -> Path:
        """The non-layer tensors (copied from the source file when their dtype is kept), the
        index, config, generation config and tokenizer."""
        work = self._need_work()
        missing = [i for i in range(self.num_layers) if i not in self.written]
        if missing:
            raise SecateurError(f"layers {missing} were never written; the prune did not "
                                "finish")
        layers = f"{self.adapter.layers_path}."
        rest: dict[str, torch.Tensor | FileRange] = {}
        seen: set[int] = set()
        for key, t in self.model.state_dict(keep_vars=True).items():
            if key.startswith(layers) or id(t) in seen:
                continue  # a tied head is saved once, under the embeddings' name
            seen.add(id(t))
            if self._same_dtype(key):  # layer-wise methods leave these alone: copy the bytes
                rest[key] = self.source.range(self.names[key])
            elif t.is_meta:
                rest[key] = self._read([key])[key]
            else:
                rest[key] = t.detach()
        weight_map = {k: self._shard(1) for k in rest}
        write_tensors(work / self._shard(1), rest)
        for _, path in sorted(self.written.items()):
            header, _ = read_header(path)
            weight_map.update({k: path.name for k in header if k != "__metadata__"})
        total = sum((work / f).stat().st_size for f in set(weight_map.values()))
        (work / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                              "weight_map": weight_map}, indent=2) + "\n")
        if self.packed:
            self._quantization_config(work)
        else:
            self.model.config.save_pretrained(work)
        generation = self.source.folder / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, work / generation.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
        return work


def streamable_path(name_or_path: str | Path) -> Path:
    """The local safetensors folder to stream: a model folder, or a built-in name's cache."""
    from secateur.models.loading import OFFLINE
    from secateur.offline import cache_dir

    name = str(name_or_path)
    if name in OFFLINE:
        path = cache_dir() / "models" / name
        if not (path / "config.json").is_file():
            raise SecateurError(f"'{name}' is not cached as safetensors yet: run "
                                f"secateur.load('{name}') once (it holds the whole model in "
                                "memory), then stream it")
        return path
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SecateurError(f"'{name}' is not a local model folder (no config.json): streaming "
                            "reads a local safetensors folder or a cached built-in name")
    return path


def load_streamed(name_or_path: str | Path, dtype: str = "float32",
                  trust_remote_code: bool = False) -> tuple[Any, StreamedWeights]:
    """(Loaded with its decoder layers on the meta device, the weights that stream them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from secateur.models.loading import Loaded

    if dtype not in _TORCH_DTYPES:
        raise SecateurError(f"unknown dtype '{dtype}': use one of {', '.join(_TORCH_DTYPES)}")
    path = streamable_path(name_or_path)
    from secateur.formats.compact import is_compact

    if is_compact(path):
        raise SecateurError(f"'{path}' is a compact (per-layer width) model, which cannot be "
                            "streamed yet: load it normally")
    source = SafetensorsSource(path)
    # models saved as secateur's own classes (per-layer widths, removed blocks) need them
    from secateur.formats import registry as _registry  # noqa: F401

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_TORCH_DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    adapter = adapter_for(model)
    _materialise_buffers(model)
    weights = StreamedWeights(source, model, adapter, _TORCH_DTYPES[dtype])
    weights.load_rest()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return Loaded(model, tokenizer, adapter, str(name_or_path), str(path)), weights
