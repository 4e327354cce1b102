"""When each batch file appeared under its final name: inotify (IN_MOVED_TO, the rename into
place) on the output directory, read on a thread, stamped with time.monotonic() — the clock
the load client stamps its 201s with. Linux only, as the benchmark's machine."""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
import time
from pathlib import Path

IN_MOVED_TO = 0x00000080
_EVENT = struct.Struct("iIII")


class Renames:
    def __init__(self, directory: Path) -> None:
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self._fd, str(directory).encode(), IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.05)
            if not ready:
                continue
            now = time.monotonic()
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(data):
                _, _, _, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0").decode()
                self.seen.setdefault(name, now)
                offset = start + length
