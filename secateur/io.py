"""Writing outputs so that a crash, Ctrl-C or SIGKILL never leaves a half-written one.

Every file and folder secateur writes is first built as a hidden sibling named
`.NAME.partial-<pid>-<unix time>-<8 hex>` (files keep NAME's suffix at the end, for writers
that pick a format from it), flushed to disk, then renamed onto NAME in one step. Before the
rename everything in it gets the ordinary modes (0666/0777 less the umask), since temporary
folders and some writers (safetensors) are private (0700/0600), so the output gets the same
permissions as any file the user writes. Before writing into a folder, partials there whose
process has died or that are older than `STALE_SECONDS` are removed; nothing else is.

The `check_*` functions validate an output path before any work is done, so that a long run
never ends by failing to save.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError
from secateur.workdir import check_free, only_work

STALE_SECONDS = 12 * 3600  # a partial this old is debris even if its pid is alive (pid reuse)
# Files that mark a folder as one secateur may replace with --overwrite.
OUTPUT_MARKERS = ("config.json", "secateur.json", "sweep.json")

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-(?P<time>\d+)-[0-9a-f]{8}"
                      r"(?:-old)?(?:\.[^./]*)?$")
# Earlier versions named partial folders `.NAME.partial.<mkdtemp random>` with no pid.
_LEGACY_PARTIAL = re.compile(r"^\..+\.partial\.[a-z0-9_]{8}$")


def partial_name(name: str, suffix: str = "") -> str:
    """A fresh temporary sibling name for NAME, recognisable by `clean_stale_partials`."""
    return f".{name}.partial-{os.getpid()}-{int(time.time())}-{secrets.token_hex(4)}{suffix}"


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
        if not _is_stale(entry, now, max_age):
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


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def _give_umask(path: Path, umask: int) -> None:
    """The mode `path` would have had if created plainly: some writers (safetensors, mkstemp)
    create private 0600 files, which a rename would carry into the output."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return
    # Folders 0777, files 0666 plus any execute bits they had; less the umask.
    wanted = (0o777 if stat.S_ISDIR(st.st_mode) else 0o666 | (st.st_mode & 0o111)) & ~umask
    if stat.S_IMODE(st.st_mode) != wanted:
        os.chmod(path, wanted)


def _fsync_path(path: Path) -> None:
    """fsync a file or folder by path; folders need O_RDONLY, which works for files too."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync folders; the rename is still atomic
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Give every file and folder under root the umask's mode, and flush them to disk."""
    umask = current_umask()
    for folder, _, files in os.walk(root):
        for f in files:
            _give_umask(Path(folder) / f, umask)
            _fsync_path(Path(folder) / f)
        _give_umask(Path(folder), umask)
        _fsync_path(Path(folder))


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `path`; it replaces `path` only if the block succeeds.

    Write to the yielded path (any writer: open, savefig, to_parquet); on success it is
    fsynced and renamed onto `path`, on any error or interrupt it is removed."""
    path = Path(path)
    check_output_file(path, flag="output")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(path.parent)
    tmp = path.with_name(partial_name(path.name, path.suffix))
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
    try:
        yield tmp
        _give_umask(tmp, current_umask())  # the writer may have replaced it privately
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_path(path.parent)


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` writes the content to the temporary path it is given; see `atomic_file`."""
    with atomic_file(path) as tmp:
        write(tmp)
    return Path(path)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: Iterable[str | Path] = (),
               flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temporary sibling folder; it replaces `out` only if the block succeeds."""
    out = Path(out)
    check_output_dir(out, overwrite, inputs, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out.parent)
    tmp = out.with_name(partial_name(out.name))
    tmp.mkdir(0o777)  # umask applies, unlike mkdtemp's 0700
    try:
        yield tmp
        _finish_tree(tmp)
        if out.exists():
            # Two renames, not one: rename() cannot replace a non-empty folder. The old one
            # carries a partial name so that a kill between the renames leaves only debris.
            old = out.with_name(tmp.name + "-old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(out.parent)


def dir_bytes(path: Path) -> int:
    """Bytes of the files under a folder (or of one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _resolve(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def _check_can_create(where: Path, shown: Path, flag: str) -> None:
    """`where` (resolved) can be created: its nearest existing ancestor is a writable folder."""
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


def _check_not_cwd(where: Path, shown: Path, flag: str) -> None:
    cwd = _resolve(Path.cwd())
    if where == cwd or where in cwd.parents:
        raise SecateurError(f"{flag} '{shown}' is the current folder or one of its parents: "
                            f"name a new folder, e.g. {flag} runs/NAME")


def check_output_dir(out: Path, overwrite: bool, inputs: Iterable[str | Path] = (),
                     flag: str = "--out") -> None:
    """Fail before any work if writing the folder `out` would fail or destroy something.

    `inputs` are the paths the job reads (the model): `out` may not be one of them or hold
    one, since --overwrite replaces `out` whole."""
    out = Path(out)
    where = _resolve(out)
    _check_not_cwd(where, out, flag)
    for inp in inputs:
        if not str(inp) or not Path(inp).expanduser().exists():
            continue  # a Hub or built-in name, not a path
        src = _resolve(Path(inp))
        if where == src or where in src.parents:
            raise SecateurError(f"{flag} '{out}' is or holds the input '{inp}': choose a folder "
                                "outside it")
    check_free(out)  # a live run's folder is never replaced (secateur.workdir)
    # a folder holding only an interrupted run's checkpoints is that run's own output
    if where.exists() and not only_work(where):
        if not where.is_dir():
            raise SecateurError(f"{flag} '{out}' is a file, not a folder: remove it or choose "
                                f"another {flag}")
        if not overwrite:
            raise SecateurError(f"output directory '{out}' already exists: pass --overwrite or "
                                f"choose another {flag}")
        has_entries = any(where.iterdir())
        if has_entries and not any((where / m).is_file() for m in OUTPUT_MARKERS):
            raise SecateurError(
                f"{flag} '{out}' holds files but no saved model (no config.json or "
                f"secateur.json), so --overwrite will not delete it: choose another {flag}")
    _check_can_create(where, out, flag)


def check_output_file(path: Path, flag: str = "--json", inputs: Iterable[str | Path] = ()) -> None:
    """Fail before any work if the file `path` cannot be written, or would replace an input."""
    path = Path(path)
    where = _resolve(path)
    if where.is_dir():
        raise SecateurError(f"{flag} '{path}' is a folder: give a file path, e.g. "
                            f"{path / 'result.json'}")
    if where.exists() and not where.is_file():
        raise SecateurError(f"{flag} '{path}' exists and is not a regular file: choose "
                            "another path")
    for inp in inputs:
        if str(inp) and Path(inp).expanduser().exists() and where == _resolve(Path(inp)):
            raise SecateurError(f"{flag} '{path}' is the input '{inp}': choose another path")
    _check_can_create(where, path, flag)


def check_output_folder(folder: Path, flag: str = "--out") -> None:
    """A folder that files are added to (a report's): a folder if it exists, else creatable."""
    folder = Path(folder)
    where = _resolve(folder)
    if where.exists() and not where.is_dir():
        raise SecateurError(f"{flag} '{folder}' is a file, not a folder: remove it or choose "
                            f"another {flag}")
    _check_can_create(where / "x", folder, flag)
