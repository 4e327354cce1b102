from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.schema import Entry
from services.consumer.batch import Batch
from services.consumer.sink import Abandoned, FileSink, safe_host


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def batch(n: int) -> Batch:
    b = Batch(3)
    b.entries = [Entry(timestamp=f"2019-10-12T07:20:{i:02d}Z", value=f"v{i}") for i in range(n)]
    return b


async def test_writes_json_lines_under_a_name_with_host_and_worker(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    sink = FileSink(tmp_path, "pod_a/1", executor)
    name = await sink.write(batch(3), "3-1")
    assert re.fullmatch(r"pod-a-1_3-1_\d{8}T\d{12}Z_\d{8}\.jsonl", name)
    lines = (tmp_path / name).read_text().splitlines()
    assert [json.loads(line) for line in lines] == batch(3).entries
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


async def test_an_abandoned_batch_leaves_no_file(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    sink = FileSink(tmp_path, "h", executor)
    b = batch(2)
    b.abandon()
    with pytest.raises(Abandoned):
        await sink.write(b, "0-0")
    assert list(tmp_path.iterdir()) == []


async def test_names_never_collide(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    sink = FileSink(tmp_path, "h", executor)
    names = await asyncio.gather(*(sink.write(batch(1), "0-0") for _ in range(50)))
    assert len(set(names)) == 50


def test_prepare_removes_only_this_hosts_temporary_files(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    (tmp_path / ".h_0-0_x.jsonl.tmp").write_text("partial")
    (tmp_path / ".other_0-0_x.jsonl.tmp").write_text("another replica, mid-write")
    (tmp_path / "h_0-0_x.jsonl").write_text("{}\n")
    assert FileSink(tmp_path / "", "h", executor).prepare() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other_0-0_x.jsonl.tmp", "h_0-0_x.jsonl"]


async def test_rejected_bodies_are_kept_under_a_dot_directory(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    sink = FileSink(tmp_path, "h", executor)
    name = await sink.reject(b"\xffnot json", "not JSON", "m-1")
    document = json.loads((tmp_path / ".rejected" / name).read_text())
    assert document == {"reason": "not JSON", "message_id": "m-1", "body": "\xffnot json"}
    assert not list(tmp_path.glob("*.jsonl"))


def test_host_names_fit_file_names() -> None:
    assert safe_host("consumer-7d9f_x") == "consumer-7d9f-x"
    assert safe_host("") == "host"


async def test_check_fails_when_the_directory_cannot_be(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    (tmp_path / "a-file").write_text("")
    sink = FileSink(tmp_path / "a-file", "h", executor)
    with pytest.raises(FileExistsError):
        await sink.check()


async def test_check_creates_a_directory_missing_at_start(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    sink = FileSink(tmp_path / "late", "h", executor)
    await sink.check()
    assert (tmp_path / "late").is_dir()
    assert list((tmp_path / "late").iterdir()) == []
