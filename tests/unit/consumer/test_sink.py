from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.schema import Entry
from services.consumer.batch import Batch
from services.consumer.sink import Abandoned, FileSink, safe_host
from tests.support.consumer import written_lines
from tests.support.deliveries import data_path, delivery, entries, message, until


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
    written = await sink.write(batch(3), "3-1")
    assert written.entries == batch(3).entries
    [name] = [p.name for p in tmp_path.iterdir()]
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
    await asyncio.gather(*(sink.write(batch(1), "0-0") for _ in range(50)))
    assert len(list(tmp_path.glob("*.jsonl"))) == 50


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


async def test_nothing_is_acked_until_a_directory_sync_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is renamed, then the directory's fsync fails (EIO, on NFS say): the rename
    may not survive a power loss, so the retry must not take the file as written and ack
    before a directory sync has succeeded. (The kernel's failure is simulated at the one
    call that makes it: fsync on a directory.)"""
    failing = [False]
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if failing[0] and stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "directory sync failed")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log: list[str] = []
    async with data_path(tmp_path) as path:
        failing[0] = True
        values = entries("m", 2)
        path.submit(delivery(message(log, "m", values, message_id="m"), 2), values)
        await asyncio.sleep(1.5)  # a few retries (0.2 s, 0.4 s, 0.8 s)
        assert "ack m" not in log, "acked although no directory sync succeeded"
        failing[0] = False
        await until(lambda: "ack m" in log, what="ack once the directory syncs")
    assert [e["value"] for e in written_lines(tmp_path)] == ["m0", "m1"]
