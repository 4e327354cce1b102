"""Durable file-system steps the sink and the ledger share."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import sys
from pathlib import Path


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

_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    release = tuple(int(p) for p in re.findall(r"\d+", platform.release())[:2])
    if release < (5, 8) or not hasattr(libc, "syncfs") or not hasattr(libc, "sync_file_range"):
        return None
    libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return libc


LIBC = _libc()


def syncfs_available() -> bool:
    return LIBC is not None


def write_unflushed(path: Path, data: bytes) -> int:
    """Create `path` (it must not exist) and write `data`, not synced; returns the open
    descriptor, for `check_written` after `sync_filesystem`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_written(fd: int) -> None:
    """After `sync_filesystem`: raise OSError if writing this file's data back failed
    (its own errors since it was opened; no I/O, no flush). Closes `fd`."""
    assert LIBC is not None
    try:
        if LIBC.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WAIT_AFTER) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Flush the file system holding `path`: everything written to it is durable."""
    assert LIBC is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if LIBC.syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)
