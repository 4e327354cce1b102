"""Reading the consumer's output tree as a downstream job would: every batch file under the
root (any directory but the consumer's own dot-directories), decompressed by its suffix."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.consumer.encoding import compression_of, decompress


def batch_files(root: Path) -> Iterator[Path]:
    """Every finished batch file under `root` (never a temporary or the ledger's)."""
    for folder, directories, files in os.walk(root):
        directories[:] = sorted(d for d in directories if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and compression_of(name) is not None:
                yield Path(folder) / name


def file_lines(path: Path) -> list[dict[str, Any]]:
    compression = compression_of(path.name)
    assert compression is not None, path
    text = decompress(path.read_bytes(), compression).decode()
    return [json.loads(line) for line in text.splitlines()]


def output_lines(root: Path) -> list[dict[str, Any]]:
    """Every entry in every batch file under `root`."""
    return [line for path in batch_files(root) for line in file_lines(path)]


def by_directory(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Entries per directory relative to `root` ("" for the root itself)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in batch_files(root):
        relative = path.parent.relative_to(root).as_posix()
        found.setdefault("" if relative == "." else relative, []).extend(file_lines(path))
    return found


# Moments spread over two UTC dates and several hours, written with offsets that move
# some of them across the date line: (timestamp as sent, its UTC date, its UTC hour).
SPREAD = [
    ("2019-10-12T07:20:{s:02d}.52Z", "2019-10-12", "07"),
    ("2019-10-12T09:20:{s:02d}+02:00", "2019-10-12", "07"),
    ("2019-10-12T23:40:{s:02d}Z", "2019-10-12", "23"),
    ("2019-10-13T01:30:{s:02d}+02:00", "2019-10-12", "23"),  # the 13th locally, the 12th in UTC
    ("2019-10-12T22:30:{s:02d}.5-05:00", "2019-10-13", "03"),  # the 12th locally, the 13th
    ("2019-10-13T03:05:{s:02d}z", "2019-10-13", "03"),
    ("2019-10-13T14:59:{s:02d}+00:00", "2019-10-13", "14"),
]
HIVE = "date={year}-{month}-{day}/hour={hour}/shard={shard}"


def spread_entries(n: int, tag: str, start: int = 0) -> list[dict[str, Any]]:
    """n entries with distinct values, cycling through SPREAD's moments and seconds."""
    return [
        {
            "timestamp": SPREAD[i % len(SPREAD)][0].format(s=(i // len(SPREAD)) % 60),
            "value": f"{tag}-{i}",
        }
        for i in range(start, start + n)
    ]


def hive_directory(entry: dict[str, Any], shards_count: int) -> str:
    """Where HIVE puts an entry, worked out independently of the consumer's code."""
    moment = datetime.fromisoformat(entry["timestamp"].upper().replace("Z", "+00:00"))
    utc = moment.astimezone(UTC)
    shard = int(moment.timestamp()) % shards_count
    return f"date={utc:%Y-%m-%d}/hour={utc:%H}/shard={shard}"


TOOLS = {"gzip": ["gzip", "-t"], "zstd": ["zstd", "-q", "-t"]}


def tool_check(path: Path) -> str | None:
    """What `gzip -t` / `zstd -t` (by the file's suffix) say is wrong with it; None: sound.
    Debian's gzip and zstd packages: `make test` installs them (scripts/ensure-tools.sh)."""
    compression = compression_of(path.name)
    assert compression in TOOLS, path
    checked = subprocess.run([*TOOLS[compression], str(path)], capture_output=True, check=False)
    return None if checked.returncode == 0 else checked.stderr.decode(errors="replace")
