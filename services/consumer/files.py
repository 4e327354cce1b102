"""Durable file-system steps the sink and the ledger share."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (os.write may write fewer)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_durably(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist), write `data`, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make the directory's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- one sync for many files (SYNC_MODE=group) -------------------------------------------
#
# Linux only, through libc: files are written without a sync, then `syncfs` writes back and
# flushes the whole file system once (data, journal, disk cache) for all of them; each
# file's own write-back errors are then read with `sync_file_range(WAIT_AFTER)` on the
# descriptor it was written through (no I/O then). syncfs reports errors since Linux 5.8;
# before, it always succeeded, so it is not used there.
#
# The per-file calls of a group (open, write, rename, the write-back check, close) are made
# *holding* the interpreter lock (`ctypes.PyDLL` does not release it), one after the other
# on the writer thread. On a local disk each takes microseconds and does no I/O (the
# page cache, a directory entry); `os.open` and the others release the lock around them, and
# taking it back from a busy event loop cost the writer about a millisecond per call on 2
# cores: the group's file writes took 2.3 s of a 150,000-entry drain that way, 0.9 s held
# (bench/consumer_drain.py). The calls that wait for the disk (syncfs, fsync) release it.
# A volume where these calls are slow (a network file system) would stall the event loop
# meanwhile: `HeldCalls` times them and falls back to the releasing calls for good once
# SLOW_GROUPS groups in a row took longer than HOLD_LIMIT_SECONDS per call on average (a
# slow volume is slow every time; a thread descheduled now and then, as under a container's
# CPU quota, is not).

_SYNC_FILE_RANGE_WAIT_AFTER = 4
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
HOLD_LIMIT_SECONDS = 0.0005
SLOW_GROUPS = 8


def _libc() -> tuple[ctypes.CDLL, ctypes.PyDLL] | None:
    if sys.platform != "linux":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        held = ctypes.PyDLL(name, use_errno=True)
    except OSError:
        return None
    release = tuple(int(p) for p in re.findall(r"\d+", platform.release())[:2])
    if release < (5, 8) or not hasattr(libc, "syncfs") or not hasattr(libc, "sync_file_range"):
        return None
    for lib in (libc, held):
        lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    held.open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint]
    held.write.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
    held.write.restype = ctypes.c_ssize_t
    held.rename.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    held.close.argtypes = [ctypes.c_int]
    return libc, held


_LIBS = _libc()
LIBC = _LIBS[0] if _LIBS else None


def syncfs_available() -> bool:
    return LIBC is not None


def _raise_errno(path: str | None = None) -> None:
    error = ctypes.get_errno()
    if path is None:
        raise OSError(error, os.strerror(error))
    raise OSError(error, os.strerror(error), path)


class HeldCalls:
    """The per-file calls of SYNC_MODE=group, made holding the interpreter lock while they
    are fast (module comment above), the usual releasing calls otherwise. One per sink;
    used from one writer thread at a time."""

    def __init__(self, hold: bool = True) -> None:
        self.holding = hold and _LIBS is not None
        self._slow = 0.0  # seconds the held calls of the current group took, and how many
        self._calls = 0
        self._slow_groups = 0  # groups in a row whose held calls were slow

    def write_unflushed(self, path: str, data: bytes) -> int:
        """Create `path` (it must not exist) and write `data`, not synced; returns the open
        descriptor, for `check_written` after `sync_filesystem`."""
        if not self.holding:
            return write_unflushed(path, data)
        assert _LIBS is not None
        held = _LIBS[1]
        started = time.perf_counter()
        encoded = os.fsencode(path)
        fd: int
        while (fd := held.open(encoded, _OPEN_FLAGS, 0o644)) < 0:
            if ctypes.get_errno() != errno.EINTR:
                _raise_errno(path)
        try:
            while data:
                written: int = held.write(fd, data, len(data))
                if written == 0:  # (never for a regular file; not to spin if it were)
                    raise OSError(errno.EIO, os.strerror(errno.EIO), path)
                if written < 0:
                    if ctypes.get_errno() != errno.EINTR:
                        _raise_errno(path)
                    continue
                data = data[written:]
        except BaseException:
            held.close(fd)
            raise
        self._timed(started)
        return fd

    def rename(self, source: str, target: str) -> None:
        if not self.holding:
            os.rename(source, target)
            return
        assert _LIBS is not None
        started = time.perf_counter()
        if _LIBS[1].rename(os.fsencode(source), os.fsencode(target)) != 0:
            _raise_errno(source)
        self._timed(started)

    def check_written(self, fd: int) -> None:
        """After `sync_filesystem`: raise OSError if writing this file's data back failed
        (its own errors since it was opened; no I/O, no flush). Closes `fd`."""
        assert _LIBS is not None
        lib = _LIBS[1] if self.holding else _LIBS[0]
        try:
            if lib.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_AFTER) != 0:
                _raise_errno()
        finally:
            if self.holding:
                _LIBS[1].close(fd)
            else:
                os.close(fd)

    def group_done(self) -> None:
        """After a group: stop holding for good once the held calls were slow SLOW_GROUPS
        groups in a row."""
        calls, slow = self._calls, self._slow
        self._calls, self._slow = 0, 0.0
        if not (self.holding and calls):
            return
        self._slow_groups = self._slow_groups + 1 if slow / calls > HOLD_LIMIT_SECONDS else 0
        if self._slow_groups >= SLOW_GROUPS:
            self.holding = False
            log.warning(
                "file calls on the output volume take %.1f ms each: made releasing the "
                "interpreter lock from now on (slower on a local disk, but the event loop "
                "is not held up meanwhile)",
                1000 * slow / calls,
            )

    def _timed(self, started: float) -> None:
        self._slow += time.perf_counter() - started
        self._calls += 1


def write_unflushed(path: Path | str, data: bytes) -> int:
    """`HeldCalls.write_unflushed` through the usual calls (releasing the lock)."""
    fd = os.open(path, _OPEN_FLAGS, 0o644)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding `path`: everything written to it is durable."""
    assert LIBC is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if LIBC.syncfs(fd) != 0:
            _raise_errno(str(path))
    finally:
        os.close(fd)
