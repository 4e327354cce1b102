"""What a batch file holds, as bytes: JSON Lines, compressed as OUTPUT_COMPRESSION says.

Pure functions of the entries, independent of where the bytes go (a local file today, an
object's body for an object-store sink): the uncompressed size that BATCH_MAX_BYTES bounds,
the body, and the name's suffix.

Each body is one complete stream (a gzip member, a zstd frame), so a file under its final
name decompresses whole with the standard tools (`gzip -t`, `zstd -t`). Compressing is CPU
work: callers run `encode` off the event loop (zlib and libzstd run without the GIL).

zstd comes from `backports.zstd`, the standard library's `compression.zstd` of Python 3.14
for earlier versions (the same maintainers' binding of libzstd, 1.8 MB installed; the
`zstandard` package is 24 MB, which the images' 200 MB bound has no room for).
"""

from __future__ import annotations

import gzip
import sys
from typing import Literal, get_args

from pydantic_core import to_json

from services.common.schema import Entry

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

Compression = Literal["none", "gzip", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = get_args(Compression)

SUFFIXES: dict[Compression, str] = {"none": ".jsonl", "gzip": ".jsonl.gz", "zstd": ".jsonl.zst"}

# gzip's own default level (Python's gzip.compress defaults to 9: much slower, a few percent
# smaller); zstd's default level.
GZIP_LEVEL = 6
ZSTD_LEVEL = 3


def line(entry: Entry) -> bytes:
    """One entry's line in a batch file."""
    return to_json(entry) + b"\n"


def line_size(entry: Entry) -> int:
    """Bytes of an entry's line, uncompressed: what BATCH_MAX_BYTES counts."""
    return len(to_json(entry)) + 1


def json_lines(entries: list[Entry]) -> bytes:
    return b"".join([to_json(entry) + b"\n" for entry in entries])


def compress(data: bytes, compression: Compression) -> bytes:
    """`data` as one complete stream of `compression` (itself for "none")."""
    if compression == "gzip":
        # mtime 0: the same entries give the same bytes (no time in the header).
        return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0)
    if compression == "zstd":
        return zstd.compress(data, level=ZSTD_LEVEL)  # one frame; safe from any thread
    return data


def encode(entries: list[Entry], compression: Compression) -> bytes:
    """A batch file's bytes: its entries' JSON Lines, compressed."""
    return compress(json_lines(entries), compression)


def decompress(data: bytes, compression: Compression) -> bytes:
    """The JSON Lines of a body `encode` made (for readers: tests, tools)."""
    if compression == "gzip":
        return gzip.decompress(data)
    if compression == "zstd":
        return zstd.decompress(data)
    return data


def compression_of(name: str) -> Compression | None:
    """The compression a final file name says, None if it is no batch file's."""
    for compression, suffix in SUFFIXES.items():
        if name.endswith(suffix):
            return compression
    return None
