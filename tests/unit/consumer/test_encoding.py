from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from services.common.schema import Entry
from services.consumer.encoding import (
    COMPRESSIONS,
    SUFFIXES,
    Compression,
    compression_of,
    decompress,
    encode,
    json_lines,
    line_size,
)
from tests.support.output import tool_check

ENTRIES = [
    Entry(timestamp=f"2019-10-12T07:20:{i % 60:02d}Z", value=f"välue {i} " * (i % 7))
    for i in range(500)
]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_a_body_decompresses_to_the_entries_json_lines(compression: Compression) -> None:
    body = encode(ENTRIES, compression)
    lines = decompress(body, compression).decode().splitlines()
    assert [json.loads(line) for line in lines] == ENTRIES


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_the_standard_tools_check_each_file_whole(compression: Compression, tmp_path: Path) -> None:
    """Each file is one complete stream that `gzip -t` / `zstd -t` (Debian's gzip and zstd
    packages, installed by `make test`: scripts/ensure-tools.sh) accept, and that they
    decompress to the entries."""
    path = tmp_path / f"x{SUFFIXES[compression]}"
    path.write_bytes(encode(ENTRIES, compression))
    assert tool_check(path) is None
    tool = "gzip" if compression == "gzip" else "zstd"
    out = subprocess.run([tool, "-dc", str(path)], capture_output=True, check=True).stdout
    assert out == json_lines(ENTRIES)


def test_compression_saves_most_of_repetitive_json_lines() -> None:
    plain = len(encode(ENTRIES, "none"))
    assert len(encode(ENTRIES, "gzip")) < plain / 4
    assert len(encode(ENTRIES, "zstd")) < plain / 4


def test_line_size_is_the_uncompressed_line() -> None:
    assert sum(line_size(e) for e in ENTRIES) == len(json_lines(ENTRIES))


def test_suffixes_name_the_compression() -> None:
    assert [compression_of(f"a{SUFFIXES[c]}") for c in COMPRESSIONS] == list(COMPRESSIONS)
    assert compression_of("a.json") is None


def test_a_file_cut_short_fails_the_tools_check(tmp_path: Path) -> None:
    for compression in ("gzip", "zstd"):
        path = tmp_path / f"cut{SUFFIXES[compression]}"
        body = encode(ENTRIES, compression)
        path.write_bytes(body[: len(body) // 2])
        assert tool_check(path) is not None
