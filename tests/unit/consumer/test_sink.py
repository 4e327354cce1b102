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
from services.consumer.encoding import SUFFIXES, Compression
from services.consumer.group import SyncMode
from services.consumer.ledger import Ledger
from services.consumer.ledger_log import LedgerLog
from services.consumer.sink import Abandoned, FileSink, safe_host
from tests.support.consumer import written_lines
from tests.support.deliveries import data_path, delivery, entries, message, until
from tests.support.ledger import written
from tests.support.output import batch_files, file_lines, output_lines


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


def batch_in(directory: str, n: int, tag: str = "v") -> Batch:
    b = Batch(1, directory=directory)
    b.entries = [Entry(timestamp="2019-10-12T07:20:50Z", value=f"{tag}{i}") for i in range(n)]
    return b


def synced_directories(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories fsynced from now on, in order (the real fsync is still made)."""
    seen: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.parametrize("sync", ["group", "file"])
@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
async def test_a_batch_goes_to_its_directory_compressed_and_named_for_it(
    tmp_path: Path, executor: ThreadPoolExecutor, compression: Compression, sync: SyncMode
) -> None:
    sink = FileSink(tmp_path, "h", executor, compression=compression, sync=sync)
    sink.prepare()
    await sink.write(batch_in("date=2019-10-12/hour=07", 3), "1-0")
    [path] = batch_files(tmp_path)
    assert path.parent == tmp_path / "date=2019-10-12" / "hour=07"
    assert path.name.endswith(SUFFIXES[compression])
    assert [e["value"] for e in file_lines(path)] == ["v0", "v1", "v2"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


@pytest.mark.parametrize("sync", ["group", "file"])
async def test_new_directories_and_their_parents_are_synced_before_the_write_returns(
    tmp_path: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, sync: SyncMode
) -> None:
    sink = FileSink(tmp_path, "h", executor, sync=sync)
    sink.prepare()
    synced = synced_directories(monkeypatch)
    await sink.write(batch_in("a/b", 1), "1-0")
    assert sorted(synced) == sorted([f"{tmp_path}/a/b", f"{tmp_path}/a", str(tmp_path)])
    synced.clear()
    await sink.write(batch_in("a/b", 1), "1-0")  # known durable now: only its own
    assert synced == [f"{tmp_path}/a/b"]
    synced.clear()
    # Batches spread over directories: each synced, the new one's parent too.
    await asyncio.gather(*(sink.write(batch_in(d, 1), "1-0") for d in ["a/b", "a/c", "a/b"]))
    assert sorted(set(synced)) == sorted([f"{tmp_path}/a/b", f"{tmp_path}/a/c", f"{tmp_path}/a"])


async def test_a_directory_removed_under_it_is_made_again(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    sink = FileSink(tmp_path, "h", executor)
    sink.prepare()
    await sink.write(batch_in("x/y", 1, "a"), "1-0")
    for path in (tmp_path / "x" / "y").iterdir():
        path.unlink()
    (tmp_path / "x" / "y").rmdir()
    await sink.write(batch_in("x/y", 1, "b"), "1-0")
    assert [e["value"] for e in output_lines(tmp_path)] == ["b0"]


def test_prepare_removes_this_hosts_temporary_files_in_every_directory(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    deep = tmp_path / "date=2019-10-12" / "hour=07"
    deep.mkdir(parents=True)
    (deep / ".h_0-0_x.jsonl.zst.tmp").write_text("partial")
    (deep / ".other_0-0_x.jsonl.tmp").write_text("another replica, mid-write")
    (deep / "h_0-0_y.jsonl").write_text("{}\n")
    (tmp_path / ".rejected").mkdir()
    (tmp_path / ".rejected" / ".h_rejected_z.json.tmp").write_text("partial")
    assert FileSink(tmp_path, "h", executor).prepare() == 2
    assert sorted(p.name for p in deep.iterdir()) == [".other_0-0_x.jsonl.tmp", "h_0-0_y.jsonl"]
    assert list((tmp_path / ".rejected").iterdir()) == []


async def test_the_ledger_names_files_relative_to_the_output_root(
    tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    log: list[str] = []
    values = entries("m", 2)
    ledger = Ledger(LedgerLog(tmp_path, "h"))
    sink = FileSink(tmp_path, "h", executor, ledger, compression="gzip")
    sink.prepare()
    d = delivery(message(log, "m", values, message_id="m"), 2)
    b = Batch(0, directory="shard=0/hour=07")
    b.add(d, values)
    await sink.write(b, "0-0")
    [path] = batch_files(tmp_path)
    relative = path.relative_to(tmp_path).as_posix()
    records = [
        json.loads(line) for line in (tmp_path / ".ledger" / "h.log").read_text().splitlines()
    ]
    assert any(r.get("f") == relative for r in records)
    assert any(r.get("d") == relative for r in records)
    # A restarted process finds the file through its relative name: the entries count.
    again = Ledger(LedgerLog(tmp_path, "h"))
    again.open()
    [part] = d.parts
    assert written(again.log, part.id or "") == [(0, 2)]
