"""Reload saved models the way a user without secateur does, in one fresh interpreter.

Every test that checks "the saved folder works in plain transformers" goes through
`reload_without_secateur`, so each of them runs a forward AND greedy generation with and
without the KV cache: a load alone has passed while the first forward failed (issue 29:
transformers 5.25's kernel hub broke the saved modeling code at its first forward), and a
removed attention branch shows up only in generation, as a wrong KV cache index.

Tests doing this are marked `reload` (declared in pyproject.toml), so that
`scripts/test_newest.sh` can run exactly them against the newest versions the pyproject allows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The repo, the editable-install finder and the current directory are all taken off the import
# path, so the saved code cannot lean on secateur. Per model: a forward, then greedy
# generation with and without the KV cache; an error is reported per model, not raised, so
# one subprocess (most of its time is importing transformers) serves many models.
_SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys, traceback
    spec = json.loads(sys.argv[1])
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                     and "editable" not in str(f).lower()]
    sys.path = [p for p in sys.path if p not in ("", ".") and not p.startswith(spec["repo"])
                or "site-packages" in p]
    sys.path_hooks = [h for h in sys.path_hooks if "editable" not in str(h).lower()]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("secateur") is None, "secateur is still importable"
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(spec["ids"])
    new = spec["new_tokens"]
    kwargs = {"trust_remote_code": spec["trust_remote_code"]}
    if spec["dtype"] is not None:
        kwargs["dtype"] = getattr(torch, spec["dtype"])
    models = {}
    for name, path in spec["dirs"].items():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            with torch.no_grad():
                logits = model(ids).logits[0].float().tolist()
                gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
                cached = model.generate(ids, use_cache=True, **gen)[0].tolist()
                uncached = model.generate(ids, use_cache=False, **gen)[0].tolist()
            models[name] = {"cls": type(model).__name__, "logits": logits, "cached": cached,
                            "uncached": uncached}
        except Exception:
            models[name] = {"error": traceback.format_exc()[-3000:]}
    print(json.dumps({"models": models,
                      "secateur": [m for m in sys.modules if m.startswith("secateur")]}))
""")


def reload_without_secateur(dirs: Mapping[str, str | Path], ids: list[list[int]],
                            cwd: str | Path, *, new_tokens: int = 4,
                            trust_remote_code: bool = True, dtype: str | None = "float32",
                            strict: bool = True, timeout: float = 900) -> dict[str, dict]:
    """Load each saved folder with plain transformers in one interpreter without secateur.

    Returns, per name, `cls` (the loaded class), `logits` (positions x vocab for `ids[0]`),
    `cached` and `uncached` (prompt plus `new_tokens` greedy tokens, with and without the KV
    cache), or `error` (a traceback tail) where loading or running failed. With `strict`,
    every model must have loaded, run and generated the same tokens either way. `dtype` None
    loads each checkpoint in its own dtype.
    """
    import secateur

    spec: dict[str, Any] = {
        "repo": str(Path(secateur.__file__).resolve().parents[1]),
        "dirs": {name: str(path) for name, path in dirs.items()},
        "ids": ids, "new_tokens": new_tokens, "trust_remote_code": trust_remote_code,
        "dtype": dtype,
    }
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(spec)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["secateur"] == [], f"the reload imported {out['secateur']}"
    models = out["models"]
    if strict:
        for name, got in models.items():
            assert "error" not in got, f"{name}: {got['error']}"
            assert len(got["cached"]) == len(ids[0]) + new_tokens, name
            assert got["cached"] == got["uncached"], f"{name}: KV cache changes the tokens"
    return models


def reload_one(path: str | Path, ids: list[list[int]], cwd: str | Path,
               **kwargs: Any) -> dict:
    """`reload_without_secateur` for one folder (strict): its record."""
    return reload_without_secateur({"model": path}, ids, cwd, **kwargs)["model"]
