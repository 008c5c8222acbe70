"""Where secateur may write: one set of path rules, checked by every command before any work.

Never delete what secateur did not write:
- an existing output folder is replaced (--overwrite) only if secateur wrote it: it holds the
  marker file `.secateur-output`, which lists every file secateur put there, and nothing else;
- never the current folder or one of its parents, an input, a folder holding an input, or a
  folder inside an input;
- an output file (--json, a .gguf) replaces an existing file only with --overwrite, and never
  an input or a file inside an input folder.

Paths are checked as the writers (`secateur.io`) will use them: symlink loops, names that the
temporary sibling makes too long for the filesystem, folders that cannot be written and, given
an estimate, too little free space each fail in one line before the work starts.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from secateur.errors import DiskFullError, SecateurError
from secateur.workdir import WORK, check_free

MARKER = ".secateur-output"
# Files the desktop adds to any folder it shows; they do not make a folder the user's.
_DESKTOP_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}
# What `partial_name` adds to a name: `.` + `.partial-<pid>-<time>-<8 hex>-old`,
# with a pid of up to 7 digits (Linux's pid_max is at most 2**22) and a 10-digit time.
PARTIAL_EXTRA = len("." + ".partial-" + "9" * 7 + "-" + "9" * 10 + "-" + "f" * 8 + "-old")
# Names of files inside an output folder (shards, their temporary siblings) on top of its path.
_INNER_PATH = 128
_SHOWN_FOREIGN = 3


# -- secateur's temporary siblings ---------------------------------------------------------

STALE_SECONDS = 12 * 3600  # a partial this old is debris even if its pid is alive (pid reuse)

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-(?P<time>\d+)-[0-9a-f]{8}"
                      r"(?P<old>-old)?(?:\.[^./]*)?$")
# Earlier versions named partial folders `.NAME.partial.<mkdtemp random>` with no pid.
_LEGACY_PARTIAL = re.compile(r"^\..+\.partial\.[a-z0-9_]{8}$")


def partial_name(name: str, suffix: str = "") -> str:
    """A fresh temporary sibling name for NAME, recognisable by `clean_stale_partials`."""
    return f".{name}.partial-{os.getpid()}-{int(time.time())}-{secrets.token_hex(4)}{suffix}"


def is_partial_name(name: str) -> bool:
    """`name` is one of secateur's temporary siblings (any process's, any version's)."""
    return bool(_PARTIAL.match(name) or _LEGACY_PARTIAL.match(name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _is_stale(entry: Path, now: float, max_age: float) -> bool:
    m = _PARTIAL.match(entry.name)
    if m:
        pid, born = int(m["pid"]), int(m["time"])
        if now - born > max_age:
            return True
        return pid != os.getpid() and not _alive(pid)
    if _LEGACY_PARTIAL.match(entry.name):
        try:
            return now - entry.lstat().st_mtime > max_age
        except OSError:
            return False
    return False


def clean_stale_partials(folder: Path, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove partials in `folder` left by dead processes (or older than max_age); only those."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not _is_stale(entry, now, max_age) or _restore(entry):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another process cleaning the same folder, or not ours to remove
    return removed


def _restore(entry: Path) -> bool:
    """A stale `-old` partial is the previous output, moved aside by a replace that was killed
    before it moved the new one in: if nothing took its name since, it goes back."""
    m = _PARTIAL.match(entry.name)
    if not m or not m["old"]:
        return False
    target = entry.with_name(m["name"])
    if os.path.lexists(target):
        return False  # the replace finished: the old copy is debris
    try:
        entry.rename(target)
    except OSError:
        return False
    return True


def recover_replaced(out: Path) -> None:
    """Put back `out`'s previous copy if a replace of it was killed between its two renames;
    call before deciding whether `out` exists."""
    out = Path(out)
    if os.path.lexists(out):
        return
    now = time.time()
    try:
        entries = sorted(out.parent.glob(f".{glob.escape(out.name)}.partial-*-old"),
                         key=lambda e: e.name, reverse=True)  # the newest first
    except OSError:
        return
    for entry in entries:
        if _is_stale(entry, now, STALE_SECONDS) and _restore(entry):
            return



# -- the marker: which files secateur wrote ------------------------------------------------


def marked_files(folder: Path) -> set[str] | None:
    """The paths (relative, '/'-separated) the folder's marker lists; None without a marker."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if data.get("written_by") != "secateur" or not isinstance(files, list):
        return None
    return {f for f in files if isinstance(f, str)}


def _ours_by_name(name: str) -> bool:
    """secateur's working files, in any folder it writes: temporary siblings, a run's
    working folder, a write probe."""
    return (is_partial_name(name) or name in (WORK, MARKER)
            or name.startswith(".secateur-probe-"))


def _entries(folder: Path) -> list[str]:
    """The names in `folder` other than secateur's working files."""
    return [e.name for e in os.scandir(folder) if not _ours_by_name(e.name)]


def foreign_files(folder: Path) -> list[str] | None:
    """What in `folder` secateur did not write (a few, enough to name); None without a marker.

    A listed folder holding its own marker (a saved model inside a recipe's output) answers
    for its contents; secateur's temporary siblings do not count."""
    listed = marked_files(folder)
    if listed is None:
        return None
    foreign: list[str] = []

    def walk(path: Path, rel: str) -> None:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if len(foreign) >= _SHOWN_FOREIGN:
                return
            name = rel + entry.name
            if entry.name in _DESKTOP_FILES or _ours_by_name(entry.name):
                continue
            if name not in listed:
                foreign.append(name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
            elif entry.is_dir(follow_symlinks=False):
                inner = Path(entry.path)
                if (inner / MARKER).is_file():
                    foreign.extend(f"{name}/{f}" for f in foreign_files(inner) or [])
                else:
                    walk(inner, name + "/")

    walk(Path(folder), "")
    return foreign[:_SHOWN_FOREIGN]


def _refuse_unowned(where: Path, shown: Path, flag: str) -> None:
    """--overwrite may delete `where` only if secateur wrote everything in it."""
    if not _entries(where):  # empty, or an interrupted run's working files only
        return
    foreign = foreign_files(where)
    if foreign is None:
        raise SecateurError(f"{flag} '{shown}' holds files but no saved model secateur wrote "
                            f"(no {MARKER} marker), so --overwrite will not delete it: choose "
                            f"another {flag}")
    if foreign:
        raise SecateurError(f"{flag} '{shown}' holds files secateur did not write "
                            f"({', '.join(foreign)}), so --overwrite will not delete it: move "
                            f"them out or choose another {flag}")


# -- paths --------------------------------------------------------------------------------


def resolve(path: Path, flag: str) -> Path:
    """The absolute, symlink-free path; a symlink loop is a one-line error."""
    try:
        return Path(os.path.abspath(Path(path).expanduser())).resolve()
    except (RuntimeError, OSError) as err:  # RuntimeError: a loop, before Python 3.13
        raise SecateurError(f"{flag} '{path}' cannot be resolved ({err}): remove the symbolic "
                            "link loop or choose another path") from None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _check_not_link(path: Path, flag: str) -> None:
    # A rename onto a link replaces the link, not what it points to: name the real path.
    if Path(path).expanduser().is_symlink():
        raise SecateurError(f"{flag} '{path}' is a symbolic link: give the path it points to, "
                            "or another path")


def _check_can_create(where: Path, shown: Path, flag: str) -> Path:
    """`where` (resolved) can be created: its nearest existing ancestor is a writable folder.
    Returns that ancestor."""
    base = _nearest_existing(where.parent)
    if not base.is_dir():
        raise SecateurError(f"{flag} '{shown}': '{base}' is a file, not a folder; choose a path "
                            "under a folder")
    # access() says yes to root on folders it cannot write (sysfs, some mounts): try for real.
    probe = base / f".secateur-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as err:
        raise SecateurError(f"{flag} '{shown}': cannot write in '{base}' ({err.strerror}); "
                            "choose a folder you can write to") from None
    return base


def _limit(base: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(base, name)
    except (OSError, ValueError):
        return default


def _check_lengths(where: Path, shown: Path, flag: str, base: Path, inner: int) -> None:
    """Every folder to create fits the filesystem's name limit, the output's name with the
    temporary sibling's extra bytes too, and the whole path with `inner` bytes more."""
    name_max = _limit(base, "PC_NAME_MAX", 255)
    new = [where, *[p for p in where.parents if base in p.parents]]
    for part in new:
        size = len(os.fsencode(part.name)) + (PARTIAL_EXTRA if part == where else 0)
        if size > name_max:
            extra = f" and its temporary copy's {PARTIAL_EXTRA} more" if part == where else ""
            raise SecateurError(
                f"{flag} '{shown}': the name '{part.name[:40]}...' is "
                f"{len(os.fsencode(part.name))} bytes{extra}, over this filesystem's "
                f"{name_max}: use a name of at most "
                f"{name_max - (PARTIAL_EXTRA if part == where else 0)} bytes")
    path_max = _limit(base, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(str(where))) + PARTIAL_EXTRA + inner
    if size > path_max:
        raise SecateurError(f"{flag} '{shown}': the path is too long for this filesystem "
                            f"({size} of at most {path_max} bytes with the files secateur "
                            "writes in it): choose a shorter path")


def _check_space(base: Path, needed: int | None, shown: Path, flag: str) -> None:
    if not needed:
        return
    free = shutil.disk_usage(base).free
    if free < needed:
        raise DiskFullError(f"{flag} '{shown}': {_size(free)} free in '{base}' but the output "
                            f"needs about {_size(needed)}: free some space or choose another "
                            f"{flag}")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _check_not_cwd(where: Path, shown: Path, flag: str) -> None:
    cwd = resolve(Path.cwd(), "the current folder")
    if where == cwd or where in cwd.parents:
        raise SecateurError(f"{flag} '{shown}' is the current folder or one of its parents: "
                            f"name a new folder, e.g. {flag} runs/NAME")


def _inputs(inputs: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(as given, resolved) for each input that is a local path; Hub and built-in names and
    paths that do not exist are not files that a write could harm."""
    found = []
    for inp in inputs:
        if inp is None or not str(inp):
            continue
        path = Path(inp).expanduser()
        if path.exists():
            found.append((str(inp), resolve(path, "input")))
    return found


def _check_inputs(where: Path, shown: Path, flag: str, inputs: Iterable[str | Path],
                  is_dir: bool) -> None:
    what = "folder" if is_dir else "path"
    for given, src in _inputs(inputs):
        if where == src or (is_dir and where in src.parents):
            kind = "is or holds" if is_dir else "is"
            raise SecateurError(f"{flag} '{shown}' {kind} the input '{given}': choose a {what} "
                                "outside it")
        if src in where.parents:
            raise SecateurError(f"{flag} '{shown}' is inside the input '{given}', whose files "
                                f"secateur never writes: choose a {what} outside it")


# -- the checks ---------------------------------------------------------------------------


def check_output_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                     flag: str = "--out", needed_bytes: int | None = None) -> None:
    """Fail before any work if writing the folder `out` would fail or destroy something.

    `inputs` are the paths the job reads (model, texts, recipe). `needed_bytes`, an estimate
    of the output's size, is checked against the free space."""
    out = Path(out)
    _check_not_link(out, flag)
    where = resolve(out, flag)
    recover_replaced(where)  # a replace killed between its two renames: the old copy is back
    _check_not_cwd(where, out, flag)
    _check_inputs(where, out, flag, inputs, is_dir=True)
    check_free(out)  # a live run's folder is never replaced (secateur.workdir)
    if where.exists():
        if not where.is_dir():
            raise SecateurError(f"{flag} '{out}' is a file, not a folder: remove it or choose "
                                f"another {flag}")
        if overwrite:
            _refuse_unowned(where, out, flag)
        elif not any(where.iterdir()) or _entries(where):  # not just a run's working files
            raise SecateurError(f"output directory '{out}' already exists: pass --overwrite or "
                                f"choose another {flag}")
    base = _check_can_create(where, out, flag)
    _check_lengths(where, out, flag, base, _INNER_PATH)
    _check_space(base, needed_bytes, out, flag)


def check_run_folder(out: Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                     resumable: bool = False, needed_bytes: int | None = None) -> bool:
    """`secateur run`'s --out: a new folder, or (--overwrite) one secateur wrote, or one it
    wrote that holds a checkpoint to resume. Returns whether it is to be deleted first."""
    out = Path(out)
    if resumable and not overwrite:
        where = resolve(out, "--out")
        _check_not_cwd(where, out, "--out")
        _check_inputs(where, out, "--out", inputs, is_dir=True)
        foreign = foreign_files(where) if _entries(where) else []
        if foreign is None or foreign:
            what = f" ({', '.join(foreign)})" if foreign else f" (no {MARKER} marker)"
            raise SecateurError(f"--out '{out}' holds a checkpoint and files secateur did not "
                                f"write{what}: a run resumes only in a folder it wrote; choose "
                                "another --out")
        _check_can_create(where / "x", out, "--out")
        return False
    check_output_dir(out, overwrite, inputs, needed_bytes=needed_bytes)
    return out.exists()


def check_output_file(path: Path, flag: str = "--json", inputs: Iterable[str | Path] = (),
                      overwrite: bool = False) -> None:
    """Fail before any work if the file `path` cannot be written, would replace an existing
    file without `overwrite`, or is (or is inside) an input."""
    path = Path(path)
    _check_not_link(path, flag)
    where = resolve(path, flag)
    if where.is_dir():
        raise SecateurError(f"{flag} '{path}' is a folder: give a file path, e.g. "
                            f"{path / 'result.json'}")
    if where.exists() and not where.is_file():
        raise SecateurError(f"{flag} '{path}' exists and is not a regular file: choose "
                            "another path")
    _check_inputs(where, path, flag, inputs, is_dir=False)
    if where.exists() and not overwrite:
        raise SecateurError(f"{flag} '{path}' already exists: pass --overwrite to replace it "
                            "or choose another path")
    base = _check_can_create(where, path, flag)
    _check_lengths(where, path, flag, base, len(path.suffix))


def check_output_folder(folder: Path, flag: str = "--out", inputs: Iterable[str | Path] = (),
                        files: Iterable[str] = ()) -> None:
    """A folder that files are added to (a report's, a sweep's): a folder if it exists, else
    creatable, never an input or inside one. Of `files` (relative paths it will write), those
    that exist must be secateur's (listed in the folder's marker)."""
    folder = Path(folder)
    _check_not_link(folder, flag)
    where = resolve(folder, flag)
    if where.exists() and not where.is_dir():
        raise SecateurError(f"{flag} '{folder}' is a file, not a folder: remove it or choose "
                            f"another {flag}")
    for given, src in _inputs(inputs):
        if where == src or src in where.parents:
            raise SecateurError(f"{flag} '{folder}' is or is inside the input '{given}': choose "
                                "a folder outside it")
    listed = marked_files(where) or set()
    for name in files:
        target = where / name
        if target.exists() and (name not in listed or target.is_symlink()):
            raise SecateurError(f"{flag} '{folder}' already holds '{name}', which secateur did "
                                f"not write: move it or choose another {flag}")
        if any(target == src for _, src in _inputs(inputs)):
            raise SecateurError(f"{flag} '{folder}': '{name}' is an input: choose another "
                                f"{flag}")
    base = _check_can_create(where / "x", folder, flag)
    _check_lengths(where / "x", folder, flag, base, _INNER_PATH)


def model_bytes(model: str | Path) -> int | None:
    """The bytes of a local model's weights (what a pruned copy needs); None for names."""
    path = Path(str(model)).expanduser()
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir()
                       if f.suffix in (".safetensors", ".bin", ".gguf") and f.is_file())
    except OSError:
        pass
    return None
