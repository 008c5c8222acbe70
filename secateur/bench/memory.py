"""Memory figures: the process's peak resident set, and the peak tensor memory of one pass.

The working memory of a forward pass (activations, logits, KV cache) is not visible in the
resident set: once a round has run, the allocator reuses pages the process already holds, and
the kernel may drop file-backed weight pages meanwhile, so "peak RSS minus RSS before" reads 0
or less. torch's profiler instead records every CPU tensor allocation and free in order; the
running sum's maximum is the pass's peak tensor memory, exactly and independent of load.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
from collections.abc import Callable, Iterator


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_mib() -> float:
    return peak_rss_bytes() / 2**20


@contextlib.contextmanager
def _without_profiler_banner() -> Iterator[None]:
    """kineto writes a `USDT:` line straight to fd 2 when a profiler starts or stops; drop those
    lines and pass anything else through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith("USDT:"):
                    sys.stderr.write(line)


def peak_tensor_bytes(fn: Callable[[], object]) -> int | None:
    """Peak bytes of CPU tensors alive during `fn()` beyond those alive before it; None when
    this torch's profiler does not expose its allocation events."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _without_profiler_banner():
        prof.start()
    try:
        fn()
    finally:
        with _without_profiler_banner():
            prof.stop()
    try:
        events = prof.profiler.kineto_results.events()
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    except AttributeError:
        return None
    current = peak = 0
    for _, delta in deltas:
        current += delta
        peak = max(peak, current)
    return peak


def peak_tensor_mib(fn: Callable[[], object]) -> float | None:
    peak = peak_tensor_bytes(fn)
    return None if peak is None else peak / 2**20

