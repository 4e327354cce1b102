"""The disk's own limit for small durable files, measured on a directory: four threads, each
writing 5-line files one at a time, each file on its own — write, fsync, rename, directory
fsync — as a naive durable writer would. The consumer's files/s are compared with this,
measured in the same run on the same directory.

The files are left in `DIRECTORY/.disk-limit` for the caller to remove when its whole
measurement is over: on ext4 without a journal (this machine's disk), creating files
shortly after many were deleted is several times slower (the inode allocator skips inodes
deleted in the last seconds, reading each one), which would slow whatever is measured next.

    python -m bench.disk_limit DIRECTORY [SECONDS]
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

THREADS = 4
LINE = b'{"timestamp":"2019-10-12T07:20:50.52Z","value":"value-0"}\n'


def files_per_second(directory: Path, seconds: float = 3.0, threads: int = THREADS) -> float:
    folder = directory / ".disk-limit"
    folder.mkdir(parents=True, exist_ok=True)
    stop = time.monotonic() + seconds
    counts = [0] * threads
    data = LINE * 5

    def writer(number: int) -> None:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while time.monotonic() < stop:
                name = f"{number}-{counts[number]}.jsonl"
                temporary = folder / f".{name}.tmp"
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(temporary, folder / name)
                os.fsync(dir_fd)
                counts[number] += 1
        finally:
            os.close(dir_fd)

    started = time.monotonic()
    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    return sum(counts) / elapsed


if __name__ == "__main__":
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    try:
        print(f"{files_per_second(Path(sys.argv[1]), seconds):.0f} files/s")
    finally:
        shutil.rmtree(Path(sys.argv[1]) / ".disk-limit", ignore_errors=True)
