"""Finding result JSON in run folders and files; what cannot be read is said, not skipped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError
from secateur.report.frontier import is_frontier
from secateur.report.recovery import is_recovery

SKIP = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "sweep.json", "model.safetensors.index.json"}


@dataclass
class Run:
    """One prune/eval result (a sweep cell is one) under a display name."""

    name: str
    data: dict[str, Any]


@dataclass
class Collected:
    runs: list[Run] = field(default_factory=list)
    benches: list[Run] = field(default_factory=list)
    frontiers: list[Run] = field(default_factory=list)  # `secateur frontier`'s frontier.json
    recoveries: list[Run] = field(default_factory=list)  # bench/recovery.py's result files
    warnings: list[str] = field(default_factory=list)


def kind(data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if is_frontier(data):
        return "frontier"
    if is_recovery(data):
        return "recovery"
    if "speedup_vs_baseline" in data and "models" in data:
        return "bench"
    if "perplexity" in data or "zeroshot" in data or "options" in data:
        return "run"
    return None


def why(err: BaseException) -> str:
    """The first line of an error, or its OS reason."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _candidates(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise SecateurError(f"'{path}' does not exist: give run directories or result .json "
                            "files")
    files = sorted((path / "results").glob("*.json")) + sorted(path.glob("*.json"))
    return [f for f in files if f.name not in SKIP]


def collect(paths: list[Path]) -> Collected:
    """Every result under `paths`. A file named on its own must be a result; inside a folder,
    unreadable JSON (and anything in results/ that is not a result) becomes a warning."""
    if not paths:
        raise SecateurError("give at least one run directory or result .json file")
    out = Collected()
    for path in map(Path, paths):
        found = 0
        for f in _candidates(path):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                if path.is_file():
                    raise SecateurError(f"{f} is not readable JSON ({why(err)}): fix or remove "
                                        "it") from None
                out.warnings.append(f"{f} is not readable JSON ({why(err)}): left out")
                continue
            found_kind = kind(data)
            if found_kind is None:
                if f.parent.name == "results" and f.parent.parent == path:
                    out.warnings.append(f"{f} is not a prune, eval or bench result: left out")
                continue
            found += 1
            label = data.get("cell") or f.stem
            name = f"{path.name}/{label}" if path.is_dir() and len(paths) > 1 else label
            {"bench": out.benches, "frontier": out.frontiers,
             "recovery": out.recoveries}.get(found_kind, out.runs).append(
                Run(name, data))
        if not found:
            seen = [w for w in out.warnings if str(path) in w]
            detail = f" ({seen[-1]})" if seen else ""
            raise SecateurError(
                f"no results in '{path}'{detail}: expected results/*.json (from `secateur "
                "sweep`), frontier.json (from `secateur frontier`) or the .json written by "
                "`secateur prune/eval/bench --json`")
    return out
