"""Faults the real parts cannot produce on demand, made by the kernel itself."""

from __future__ import annotations

import contextlib
import resource
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def files_limited_to(size: int) -> Iterator[None]:
    """The volume "fills" at `size` bytes per file (RLIMIT_FSIZE: a write crossing it is
    cut short, the next fails), for this process and only inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
