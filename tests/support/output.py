"""Reading the consumer's output tree as a downstream job would: every batch file under the
root (any directory but the consumer's own dot-directories), decompressed by its suffix."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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
