"""Writing outputs so that a crash, Ctrl-C or SIGKILL never leaves a half-written one.

Every file and folder secateur writes is first built as a hidden sibling named
`.NAME.partial-<pid>-<unix time>-<8 hex>` (files keep NAME's suffix at the end, for writers
that pick a format from it), flushed to disk, then renamed onto NAME in one step. Before the
rename everything in it gets the ordinary modes (0666/0777 less the umask), since temporary
folders and some writers (safetensors) are private (0700/0600), so the output gets the same
permissions as any file the user writes. Before writing into a folder, partials there whose
process has died or that are older than `STALE_SECONDS` are removed; nothing else is.

A folder that already exists is replaced in two renames (rename() cannot replace a non-empty
folder): the old one is moved aside as `.NAME.partial-...-old`, then the new one moved in, then
the old one removed. A kill between the renames leaves no NAME: the next write there (or the
next check of NAME) renames the old copy back instead of deleting it as debris. Every folder
gets secateur's marker (`secateur.outputs.MARKER`), which --overwrite requires.

A full disk (ENOSPC) while writing is one `DiskFullError` line, with the partial removed.

The `check_*` functions (`secateur.outputs`) validate an output path before any work is done,
so that a long run never ends by failing to save.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from secateur.errors import DiskFullError
from secateur.outputs import (
    MARKER,
    check_output_dir,
    check_output_file,
    clean_stale_partials,
    marked_files,
    partial_name,
)


def disk_full(err: BaseException | None, where: Path | None = None) -> bool:
    """`err` (or what caused it) says the disk is full; writers that hide the errno (torch's
    zip writer) count when the filesystem of `where` has under 1 MiB free."""
    seen: set[int] = set()
    first = err
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    if where is None or not isinstance(first, Exception):
        return False
    try:
        return shutil.disk_usage(where).free < 2**20
    except OSError:
        return False


def _disk_full_error(path: Path) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"the disk is full writing '{path}' ({free} now): nothing was left "
                         "behind; free some space and run again")


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
    check_output_file(path, flag="output", overwrite=True)  # callers decide on replacing
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(path.parent)
    tmp = path.with_name(partial_name(path.name, path.suffix))
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies
    try:
        yield tmp
        _give_umask(tmp, current_umask())  # the writer may have replaced it privately
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = disk_full(err, path.parent)
        with contextlib.suppress(OSError):
            tmp.unlink()
        if full:
            raise _disk_full_error(path) from None
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


def _walk(folder: Path) -> list[str]:
    names = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        names += [(rel / n).as_posix() for n in dirs + files]
    return sorted(n for n in names if n != MARKER)


def mark_output(folder: Path, names: Iterable[str] | None = None) -> None:
    """Record that secateur wrote `folder`: `names` (relative paths) are added to its marker,
    or, without names, everything under it now (a folder built whole in a temporary place)."""
    folder = Path(folder)
    listed = marked_files(folder) or set()
    listed.update(_walk(folder) if names is None else names)
    write_json_atomic(folder / MARKER, {"written_by": "secateur", "files": sorted(listed)})


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
        mark_output(tmp)  # what --overwrite may later replace: everything in it is ours
        _finish_tree(tmp)
        if out.exists():
            # Two renames, not one: rename() cannot replace a non-empty folder. A kill between
            # them leaves the old copy as `-old`, which the next run renames back.
            old = out.with_name(tmp.name + "-old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as err:
        full = disk_full(err, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _disk_full_error(out) from None
        raise
    _fsync_path(out.parent)


def dir_bytes(path: Path) -> int:
    """Bytes of the files under a folder (or of one file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

