"""Imported first by the command line, before torch and transformers (seconds of imports):
Ctrl-C or SIGTERM meanwhile is one line and exit 128+signal, not a traceback from deep inside
an import. `restore` gives the previous handlers back once the imports are done; `main` then
installs its own."""

from __future__ import annotations

import os
import signal
import sys
import threading

_previous: dict[int, object] = {}


def _during_imports(signum: int, _frame: object) -> None:
    name = signal.Signals(signum).name
    sys.stderr.write(f"interrupted ({name}) while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(128 + signum)  # nothing to clean up yet: no output has been started


def restore() -> None:
    while _previous:
        signum, handler = _previous.popitem()
        signal.signal(signum, handler)


if threading.current_thread() is threading.main_thread():  # signal() works only there
    for _sig in (signal.SIGINT, signal.SIGTERM):
        _previous[_sig] = signal.signal(_sig, _during_imports)
