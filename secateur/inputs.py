"""Inputs checked before the work starts: each check fails in one line naming what is wrong.

- a recipe file: small, text, and a YAML whose aliases do not expand into a huge document
  (a 700-byte alias bomb expands to a billion nodes);
- a recipe's step order: no step after a quantization may move the quantized weights off
  their grid (known before the model loads, not after the earlier steps ran);
- a loaded model: every weight finite, and config.json describing exactly the saved tensors;
- which of a job's settings name local files or folders (what its outputs must not touch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError

MAX_RECIPE_BYTES = 1 << 20  # recipes are a few hundred bytes
MAX_YAML_NODES = 100_000  # after aliases are expanded
# Steps that may follow a quantizing one: they zero weights (zero is on every grid, the zero
# point being an integer) or remove whole layers, so every kept weight stays on its grid. Any
# other step (a second quantization, SparseGPT's weight updates, width pruning, training)
# moves weights off the grid that is saved, and fails only after the earlier steps ran. DWQ
# trains only the grids themselves, codes frozen, and rebuilds the weights on them.
KEEP_GRID = ("blockpruner", "dwq", "magnitude", "shortgpt", "sleb", "wanda")
_CHUNK = 1 << 24  # elements checked at a time: a bool mask of a whole embedding is large


def read_recipe_text(path: Path) -> str:
    """The recipe file's text; a huge or binary file is refused before YAML sees it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise SecateurError(f"recipe '{path}' is {size / 2**20:.1f} MiB: a recipe is a short "
                                f"YAML file (at most {MAX_RECIPE_BYTES // 2**20} MiB)")
        data = path.read_bytes()
    except OSError as err:
        raise SecateurError(f"cannot read recipe '{path}' ({err.strerror})") from None
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1,
                                     "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SecateurError(f"recipe '{path}' is not a text file (byte {err.start} is not "
                            "UTF-8 text): give a YAML recipe") from None


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_yaml_size(text: str, loader: type) -> None:
    """Refuse YAML whose aliases expand past MAX_YAML_NODES nodes, or refer to themselves.

    The composed graph shares aliased nodes, so its expanded size is counted once per node
    (not by expanding it), without recursion."""
    import yaml

    try:
        root = yaml.compose(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return  # the parse that follows reports it, with its position
    except RecursionError:
        raise SecateurError("the recipe is nested too deeply to be a recipe") from None
    size: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)] if root is not None else []
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            visiting.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in _children(node))
            if size[key] > MAX_YAML_NODES:
                raise SecateurError(f"the recipe expands to over {MAX_YAML_NODES:,} YAML nodes "
                                    "through its aliases (&anchor/*alias): write it out plainly")
            continue
        if key in size:
            continue
        if key in visiting:
            raise SecateurError("the recipe refers to itself through a YAML alias: write it "
                                "out plainly")
        visiting.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in visiting:
                raise SecateurError("the recipe refers to itself through a YAML alias: write "
                                    "it out plainly")
            if id(child) not in size:
                stack.append((child, False))


def check_step_order(steps: Sequence[Any]) -> None:
    """Each step can take the model the steps before it leave (a ValueError, for pydantic)."""
    from secateur.config import quantizes

    quantized: tuple[int, str] | None = None
    for i, step in enumerate(steps, 1):
        if quantized is not None and (quantizes(step) or step.method not in KEEP_GRID):
            j, by = quantized
            raise ValueError(f"step {i} ({step.method}) cannot follow step {j} ({by}), which "
                             f"quantized the weights: only {', '.join(KEEP_GRID)} keep them on "
                             "their grid; put the quantization after it")
        if quantized is None and step.method == "dwq":
            raise ValueError(f"step {i} (dwq) learns the grids of a quantized model: put a "
                             "quantize step (gptq, rtn, gguf) before it")
        if quantized is None and quantizes(step):
            quantized = (i, step.method)


def check_finite(model: Any, name: str) -> None:
    """Every floating-point weight is finite; else one line naming the first tensor that is not
    (NaN weights prune and quantize into silent garbage)."""
    import torch

    with torch.no_grad():
        for tensor_name, p in model.named_parameters():
            if not p.is_floating_point() or p.is_meta:
                continue
            flat = p.detach().reshape(-1)
            for start in range(0, flat.numel(), _CHUNK):
                part = flat[start:start + _CHUNK]
                if not torch.isfinite(part).all():
                    what = "NaN" if torch.isnan(part).any() else "infinite values"
                    raise SecateurError(f"'{name}': the tensor '{tensor_name}' holds {what}: the "
                                        "weights are damaged; re-save or re-download the model")


def check_loading_info(info: dict[str, Any], name: str) -> None:
    """transformers' report of tensors the config asked for but the files lack (it fills them
    with random values) or the files hold but the config has no place for (it drops them)."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights"),
                      ("unexpected_keys", "in the weights but not in config.json"),
                      ("mismatched_keys", "of another shape than config.json says")):
        found = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if found:
            problems.append(f"{len(found)} {what} (e.g. '{found[0]}')")
    if problems:
        raise SecateurError(f"'{name}': config.json does not match the weights: "
                            f"{'; '.join(problems)}; restore the config the weights were "
                            "saved with")


def path_values(data: Any) -> list[str]:
    """The strings in `data` (a recipe as a dict, settings) naming existing local paths."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value and len(value) < 4096:
            try:
                if Path(value).expanduser().exists():
                    found.append(value)
            except (OSError, ValueError):
                pass

    walk(data)
    return found
