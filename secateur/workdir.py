"""An output's working folder: a run's checkpoints, under a lock.

A resumable run keeps what it has done so far in `OUT/.secateur-work/`, inside the folder it
writes (`--out`), never beside it: only someone who can write OUT can put a checkpoint where
secateur will read one, and the folder goes when the finished output replaces OUT whole
(`secateur.io.atomic_dir`). Everything in it is safetensors or JSON; nothing is unpickled.

`lock` in that folder is held with `fcntl.flock` for as long as the run lives, so a second run
on the same OUT fails at once naming the first one's pid. The kernel drops the lock when the
process ends, however it ends, so a killed run never leaves a stale lock behind: its
checkpoints stay for the next run to resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from secateur.errors import SecateurError

WORK = ".secateur-work"
LOCK = "lock"
_TRIES = 5  # a probe (`holder`) holds the lock for microseconds: retry rather than refuse

_held: dict[Path, WorkDir] = {}  # OUT (absolute) -> the lock this process holds on it
P = ParamSpec("P")
T = TypeVar("T")


def _key(out: Path) -> Path:
    return Path(os.path.realpath(Path(out).expanduser()))


def _read_pid(fd: int) -> int | None:
    for _ in range(_TRIES):  # the holder writes its pid just after taking the lock
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.02)
    return None


def in_use_message(out: Path, pid: int | None) -> str:
    who = f"pid {pid}" if pid is not None else "a process whose pid is not recorded"
    return (f"'{out}' is in use by a running secateur ({who}): wait for it to finish, or "
            "choose another --out")


def holder(out: Path) -> int | None:
    """The pid of another live run holding OUT's lock (-1 if it recorded none); None when
    OUT is free or this process holds it. Creates nothing."""
    out = Path(out)
    if _key(out) in _held:
        return None
    try:
        fd = os.open(out / WORK / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # no lock file (or one we may not read: `acquire` refuses it)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            return -1 if pid is None else pid
        except OSError:
            return None  # no locks on this filesystem: nothing to learn
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_free(out: Path) -> None:
    """One line naming the pid if a live run holds OUT; call it before any work."""
    pid = holder(out)
    if pid is not None:
        raise SecateurError(in_use_message(out, None if pid < 0 else pid))


def _check_ours(path: Path) -> None:
    """A working folder planted by someone else (or a link to elsewhere) is never used."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise SecateurError(f"'{path}' is not a folder secateur made: remove it or choose "
                            "another --out")
    if st.st_uid != os.geteuid():
        raise SecateurError(f"'{path}' belongs to another user: choose another --out")


class WorkDir:
    """OUT's working folder; `with WorkDir(out) as work:` holds its lock for the block.

    On release the folder is removed if it holds nothing but the lock (the run finished, or
    failed before checkpointing anything), and OUT too if this run created it and it is empty;
    checkpoints are kept for a rerun to resume."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / WORK
        self._fd: int | None = None
        self._made_out = False

    def folder(self, name: str) -> Path:
        """A checkpoint folder of this run (not created)."""
        return self.path / name

    def discard(self, name: str) -> None:
        """Start afresh: remove one checkpoint folder (never the lock)."""
        shutil.rmtree(self.folder(name), ignore_errors=True)

    def acquire(self) -> WorkDir:
        if self._fd is not None:
            return self
        key = _key(self.out)
        if key in _held:
            raise SecateurError(f"'{self.out}' is already being written by this process")
        # removed again on release if it is left empty: a failed start leaves no folder
        self._made_out = not self.out.exists() or only_work(self.out)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SecateurError(f"cannot create '{self.path}' ({err.strerror}): choose a "
                                "folder you can write to as --out") from None
        _check_ours(self.path)
        self._fd = self._lock(self.path / LOCK)
        _held[key] = self
        return self

    def _lock(self, lock: Path) -> int:
        for _ in range(_TRIES):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise SecateurError(f"cannot open the lock '{lock}' ({err.strerror}): "
                                    "choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                if holder(self.out) is None:  # a probe, gone now
                    time.sleep(0.02)
                    continue
                raise SecateurError(in_use_message(self.out, pid)) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)
                    raise
                # this filesystem has no locks: run unlocked rather than not at all
            # A finishing run unlinks its lock file: the one we locked must still be there.
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except OSError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)
        raise SecateurError(in_use_message(self.out, holder(self.out)))

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if {e.name for e in self.path.iterdir()} <= {LOCK}:
                (self.path / LOCK).unlink(missing_ok=True)
                self.path.rmdir()
                if self._made_out:
                    self.out.rmdir()  # only if empty: a failed run leaves no folder behind
        _held.pop(_key(self.out), None)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkDir:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def only_work(folder: Path) -> bool:
    """`folder` holds nothing but a working folder: an interrupted run's output, resumable."""
    try:
        return [e.name for e in Path(folder).iterdir()] == [WORK]
    except OSError:
        return False


def with_exit_stack(job: Callable[Concatenate[contextlib.ExitStack, P], T]) -> Callable[P, T]:
    """Call `job` with a `contextlib.ExitStack` as its first argument, closed when the job
    returns or raises: a lock it takes midway (`stack.enter_context(WorkDir(out))`, once its
    output checks passed) is released however the job ends."""

    @functools.wraps(job)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        with contextlib.ExitStack() as stack:
            return job(stack, *args, **kwargs)

    return run
