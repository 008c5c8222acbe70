"""The package's import graph runs one way: no circles, and no arrow from a floor down to one
above it. Every import counts, those inside functions too, because a late import is still a
dependency: it only hides the circle from the interpreter, not from the reader.

A unit is a top-level module (`secateur/io.py`) or subpackage (`secateur/formats/`). A new
unit needs a floor in `FLOORS`; it may import units on its own floor or below.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "secateur"

# Bottom to top. The model code (models, stats, quant, surgery, runtime) sits below `formats`,
# the one place that knows file layouts; the runner and its entry points sit above both.
FLOORS: dict[str, int] = {
    "errors": 0,
    "_startup": 1, "config": 1, "device": 1, "offline": 1, "params": 1, "workdir": 1,
    "inputs": 2, "outputs": 2, "data": 2,
    "io": 3,
    "models": 4,
    "stats": 5, "quant": 5,
    "surgery": 6,
    "runtime": 7,
    "formats": 8,
    "eval": 10, "report": 10,
    "bench": 11,
    "methods": 12,
    "distributed": 13, "recovery": 13,
    "engine": 14,
    "api": 15, "registry": 15, "results": 15,
    "cli_flags": 16, "recipe": 16,
    "jobs": 17,
    "sweep": 18, "frontier": 18,
    "cli": 19,
    "__main__": 20,
}
# Up to here the floors hold the model code, the formats and what measures a model; above it,
# the methods and the runner.
RUNNER = FLOORS["methods"]


def _unit(module: str) -> str | None:
    """`secateur.a.b` -> `a` if `secateur/a` is a package or `secateur/a.py` a module."""
    parts = module.split(".")
    if parts[0] != "secateur" or len(parts) < 2:
        return None
    name = parts[1]
    if (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file():
        return name
    return None


@functools.cache
def import_edges() -> dict[tuple[str, str], list[str]]:
    """(importer unit, imported unit) -> where ('file:line'), over every import in the package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts = parts[:-1]
        source = _unit(".".join(parts))
        if source is None:
            continue
        package = parts if is_init else parts[:-1]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                # `from secateur import io` names a unit in its alias, not in its module
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                unit = _unit(target)
                if unit is not None and unit != source:
                    where = f"{file.relative_to(PACKAGE.parent)}:{node.lineno}"
                    edges.setdefault((source, unit), []).append(where)
    return edges


def _units() -> set[str]:
    found = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return found | {p.name for p in PACKAGE.iterdir()
                    if p.is_dir() and (p / "__init__.py").is_file()}


def _circles(units: set[str]) -> list[str]:
    """Each circle among `units`, as the imports that close it."""
    edges = {k: v for k, v in import_edges().items() if k[0] in units and k[1] in units}
    graph = nx.DiGraph(list(edges))
    return [", ".join(f"{a} -> {b} ({edges[a, b][0]})" for a in c for b in c if (a, b) in edges)
            for c in nx.strongly_connected_components(graph) if len(c) > 1]


def _upward(importers: set[str]) -> list[str]:
    return [f"{a} (floor {FLOORS[a]}) -> {b} (floor {FLOORS[b]}) at {', '.join(sorted(set(w)))}"
            for (a, b), w in sorted(import_edges().items())
            if a in importers and b in FLOORS and FLOORS[a] < FLOORS[b]]


def test_every_unit_has_a_floor():
    missing = sorted(_units() - set(FLOORS))
    assert not missing, f"give these units a floor in FLOORS: {missing}"


def test_no_import_circle_below_the_runner():
    circles = _circles({u for u in _units() if FLOORS.get(u, RUNNER) < RUNNER})
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_nothing_below_the_runner_imports_up_a_floor():
    upward = _upward({u for u in FLOORS if FLOORS[u] < RUNNER})
    assert not upward, "imports reaching up a floor:\n" + "\n".join(upward)


def test_no_import_circle():
    circles = _circles(_units())
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_import_reaches_up_a_floor():
    upward = _upward(set(FLOORS))
    assert not upward, "imports reaching up a floor:\n" + "\n".join(upward)


def test_formats_is_imported_by_no_model_code():
    # the contract behind the floors, stated directly: file layouts live only in formats/
    below = {"models", "stats", "quant", "surgery", "runtime"}
    wrong = [f"{a} -> formats at {where[0]}" for (a, b), where in import_edges().items()
             if b == "formats" and a in below]
    assert not wrong, wrong


def test_importing_the_methods_does_not_import_training_or_jobs():
    # registering the methods must stay cheap: no training loop, no end-to-end job
    trainers = sorted(
        ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        for f in PACKAGE.rglob("*.py")
        if "torch.optim" in f.read_text(encoding="utf-8")
        or "from torch import optim" in f.read_text(encoding="utf-8"))
    code = ("import sys, secateur.methods\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('secateur'))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=PACKAGE.parent)
    loaded = set(done.stdout.split())
    unwanted = sorted(m for m in loaded
                      if m == "secateur.jobs" or m.startswith("secateur.recovery")
                      or m in trainers)
    assert not unwanted, f"`import secateur.methods` imported {unwanted}"
