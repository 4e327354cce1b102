"""Group commit on a real directory and a real ledger log: several batches made durable
together, and what happens to a group when one of its batches fails, times out, or the
process is killed half-way. An executor that runs its tasks only when the test says so
(the executor seam the sink already has) makes the grouping deterministic."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.common.schema import Entry
from services.consumer.batch import Batch
from services.consumer.encoding import json_lines
from services.consumer.group import Abandoned, GroupCommit, SerialGroups, SyncMode
from services.consumer.ledger_log import LedgerLog
from tests.support.consumer import written_lines
from tests.support.faults import files_limited_to
from tests.support.ledger import written

MODES: list[SyncMode] = ["group", "file"]


class CountingExecutor(ThreadPoolExecutor):
    """Real threads, counting the tasks it is given."""

    def __init__(self) -> None:
        super().__init__(4)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


class SteppedExecutor(Executor):
    """Runs what it is given only in `run()`, in order, on the calling thread."""

    def __init__(self) -> None:
        self.tasks: list[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self.tasks.append((future, fn, args))
        return future

    def run(
        self, when: Callable[[Callable[..., Any], tuple[Any, ...]], bool] = lambda *_: True
    ) -> int:
        """Run the pending tasks whose function and arguments satisfy `when`; returns how
        many."""
        chosen = [task for task in self.tasks if when(task[1], task[2])]
        self.tasks = [task for task in self.tasks if task not in chosen]
        for future, fn, args in chosen:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                future.set_exception(exc)
        return len(chosen)


def not_a_group(fn: Callable[..., Any], args: tuple[Any, ...]) -> bool:
    """A task that is no group's step: with SYNC_MODE=file, a file's own write."""
    serial = isinstance(getattr(fn, "__self__", None), SerialGroups)
    return not serial and not (args and isinstance(args[0], list))


def batch(tag: str, count: int = 2, size: int = 1) -> Batch:
    entries = [Entry(timestamp="2019-10-12T07:20:50Z", value=tag * size) for _ in range(count)]
    return Batch(0, entries, spans=[(f"{tag}/0", 0, count)])


async def turn() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def run_all(executor: SteppedExecutor) -> None:
    while True:
        await turn()
        if not executor.run():
            break
    await turn()


@pytest.fixture
def log_dir(tmp_path: Path) -> tuple[Path, LedgerLog]:
    ledger = LedgerLog(tmp_path, "h")
    ledger.open()
    return tmp_path, ledger


async def busy_group(
    group: GroupCommit, executor: SteppedExecutor, tag: str
) -> asyncio.Future[None]:
    """A batch whose group is in progress (its step not run yet): with SYNC_MODE=file it
    holds one of the rename groups' slots; with group, the writer thread has not started,
    so every batch submitted meanwhile waits for it."""
    done = group.submit(batch(tag), f"{tag}.jsonl")
    for _ in range(4):  # its write (and, per file, its record group) run; the group starts
        await turn()
        executor.run(not_a_group)
    return done


async def a_third_group(
    group: GroupCommit, executor: SteppedExecutor, batches: dict[str, Batch]
) -> dict[str, asyncio.Future[None]]:
    """Both group slots (max_groups=2, SYNC_MODE=file) held by other batches, so these
    batches' writes finish while they wait, and they form one group together (with
    SYNC_MODE=group, one group with the held ones: the writer thread takes all that wait)."""
    held = [await busy_group(group, executor, "x"), await busy_group(group, executor, "y")]
    futures = {tag: group.submit(b, f"{tag}.jsonl") for tag, b in batches.items()}
    for _ in range(4):
        await turn()
        executor.run(not_a_group)
    assert not any(f.done() for f in futures.values())
    await run_all(executor)  # the held groups end; the waiting batches make one group
    await asyncio.gather(*held)
    return futures


@pytest.mark.parametrize("sync", MODES)
async def test_batches_that_come_together_are_made_durable_in_one_group(
    log_dir: tuple[Path, LedgerLog], sync: SyncMode
) -> None:
    directory, ledger = log_dir
    executor = SteppedExecutor()
    sizes: list[int] = []
    group = GroupCommit(directory, executor, ledger, sync=sync, max_groups=2, on_group=sizes.append)
    futures = await a_third_group(group, executor, {t: batch(t) for t in "abc"})
    await asyncio.gather(*futures.values())
    assert sizes == ([1, 1, 3] if sync == "file" else [5])
    assert sorted(p.name for p in directory.glob("*.jsonl")) == [f"{t}.jsonl" for t in "abcxy"]
    fresh = LedgerLog(directory, "other")  # another replica reads the records
    fresh.open()
    assert all(written(fresh, f"{t}/0") == [(0, 2)] for t in "abcxy")


async def test_with_sync_mode_group_groups_run_back_to_back_on_one_thread(
    log_dir: tuple[Path, LedgerLog],
) -> None:
    """SYNC_MODE=group: a lone batch's group starts at once; the batches that come while
    it is in progress are written, recorded, synced and renamed as the next group, which
    the same writer thread takes as soon as the first ends (one executor task for both:
    no hand-off through the event loop between groups)."""
    directory, ledger = log_dir
    executor = CountingExecutor()
    sizes: list[int] = []
    in_first, go_on = threading.Event(), threading.Event()

    def encode(entries: list[Entry]) -> bytes:  # on the writer thread, inside the group
        if entries[0]["value"] == "x":
            in_first.set()
            go_on.wait(10)
        return json_lines(entries)

    group = GroupCommit(directory, executor, ledger, encode=encode, on_group=sizes.append)
    try:
        first = group.submit(batch("x"), "x.jsonl")
        assert await asyncio.to_thread(in_first.wait, 10)  # the lone batch's group started
        later = [group.submit(batch(t), f"{t}.jsonl") for t in "abcd"]
        go_on.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 10)
    finally:
        go_on.set()
        executor.shutdown()
    assert sizes == [1, 4]
    assert executor.submitted == 1
    assert sorted(p.name for p in directory.glob("*.jsonl")) == [f"{t}.jsonl" for t in "abcdx"]


async def test_a_group_the_executor_drops_is_abandoned_not_left_waiting(
    log_dir: tuple[Path, LedgerLog],
) -> None:
    """The executor is shut down (cancel_futures) before the group's step ran: the batch
    fails as abandoned (nothing acked, the broker redelivers) instead of waiting forever."""
    directory, ledger = log_dir
    executor = SteppedExecutor()
    group = GroupCommit(directory, executor, ledger)
    done = group.submit(batch("a"), "a.jsonl")
    await turn()
    future, _, _ = executor.tasks.pop()
    future.cancel()
    with pytest.raises(Abandoned):
        await asyncio.wait_for(done, 5)
    assert not list(directory.glob("*.jsonl"))


async def test_a_batch_submitted_after_the_executor_shut_down_is_abandoned(
    log_dir: tuple[Path, LedgerLog],
) -> None:
    """The executor refuses the writer thread's task (shut down at the end of a drain):
    the batch fails as abandoned at once, and a later one is not left waiting either."""
    directory, ledger = log_dir
    executor = ThreadPoolExecutor(1)
    executor.shutdown()
    group = GroupCommit(directory, executor, ledger)
    for tag in "ab":
        with pytest.raises(Abandoned):
            await asyncio.wait_for(group.submit(batch(tag), f"{tag}.jsonl"), 5)
    assert not list(directory.glob("*.jsonl"))


@pytest.mark.parametrize("sync", MODES)
async def test_one_file_failing_fails_only_its_own_batch(
    log_dir: tuple[Path, LedgerLog], sync: SyncMode
) -> None:
    """The volume refuses one big file (a real EFBIG, through RLIMIT_FSIZE while it is
    written); the group's other batches are made durable, that one fails alone and leaves
    nothing: no file, no temporary file, no record a reader would trust."""
    directory, ledger = log_dir
    executor = SteppedExecutor()
    group = GroupCommit(directory, executor, ledger, sync=sync, max_groups=2)
    held = [await busy_group(group, executor, "x"), await busy_group(group, executor, "y")]
    futures = {t: group.submit(batch(t), f"{t}.jsonl") for t in "ac"}
    futures["b"] = group.submit(batch("b", size=20_000), "b.jsonl")
    with files_limited_to(10_000):  # only the big file crosses it (written in its group's
        for _ in range(4):  # step with SYNC_MODE=group, on its own thread with file)
            await turn()
            executor.run(not_a_group)
        await run_all(executor)
    await asyncio.gather(*held)
    await asyncio.gather(futures["a"], futures["c"])
    with pytest.raises(OSError, match="too large"):
        await futures["b"]
    assert sorted(p.name for p in directory.iterdir() if p.is_file()) == [
        f"{t}.jsonl" for t in "acxy"
    ]
    fresh = LedgerLog(directory, "other")
    fresh.open()
    assert written(fresh, "b/0") == []
    assert written(fresh, "a/0") == [(0, 2)]


@pytest.mark.parametrize("sync", MODES)
async def test_a_batch_timed_out_inside_a_group_leaves_nothing_and_its_retry_writes_once(
    log_dir: tuple[Path, LedgerLog], sync: SyncMode
) -> None:
    """Its worker's timeout fires after the batch joined a group (its file written, its
    record maybe appended), before the group's renames: that batch is dropped alone, the
    others are made durable, and the slot's fresh generation writes it once."""
    directory, ledger = log_dir
    executor = SteppedExecutor()
    group = GroupCommit(directory, executor, ledger, sync=sync, max_groups=2)
    late = batch("t")
    held = [await busy_group(group, executor, "x"), await busy_group(group, executor, "y")]
    futures = {t: group.submit(b, f"{t}.jsonl") for t, b in {"a": batch("a"), "t": late}.items()}
    for _ in range(4):
        await turn()
        executor.run(not_a_group)
    assert late.abandon()  # the pool's timeout: not committed yet, so abandoned
    await run_all(executor)
    await asyncio.gather(*held, futures["a"])
    with pytest.raises(Abandoned):
        await futures["t"]
    assert not (directory / "t.jsonl").exists()
    assert not list(directory.glob(".*.tmp"))
    fresh = LedgerLog(directory, "other")
    fresh.open()
    assert written(fresh, "t/0") == []  # an abort line, or never recorded
    retry = group.submit(batch("t"), "t-retry.jsonl")
    await run_all(executor)
    await retry
    values = [e["value"] for e in written_lines(directory)]
    assert values.count("t") == 2  # its two entries, once


KILLED_CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from services.common.schema import Entry
    from services.consumer.batch import Batch
    from services.consumer.files import HeldCalls
    from services.consumer.group import GroupCommit
    from services.consumer.ledger_log import LedgerLog

    directory, sync = Path(sys.argv[1]), sys.argv[2]
    ledger = LedgerLog(directory, "h")
    ledger.open()

    def killed(*args):  # the first rename of the group: the records are durable by now
        os.kill(os.getpid(), signal.SIGKILL)

    os.rename = killed  # SYNC_MODE=file; group renames through HeldCalls
    HeldCalls.rename = lambda self, source, target: killed()

    async def main():
        group = GroupCommit(directory, ThreadPoolExecutor(8), ledger, sync=sync)
        batches = [
            Batch(0, [Entry(timestamp="2019-10-12T07:20:50Z", value=f"{tag}{i}") for i in range(2)],
                  spans=[(f"{tag}/0", 0, 2)])
            for tag in "abc"
        ]
        await asyncio.gather(*(group.submit(b, f"{i}.jsonl") for i, b in enumerate(batches)))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sync", MODES)
async def test_a_kill_between_the_ledger_record_and_the_renames_loses_and_duplicates_nothing(
    tmp_path: Path, sync: SyncMode
) -> None:
    """kill -9 of a process whose group has made its records durable but renamed nothing:
    after a restart the records do not count (no file is in place), the temporary files
    are cleaned up, and the redelivered batches are written once each."""
    child = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path), sync],
        capture_output=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[3],
        check=False,
    )
    assert child.returncode == -9, child.stderr.decode()
    records = [
        json.loads(line)
        for line in (tmp_path / ".ledger" / "h.log").read_bytes().splitlines()
        if line.startswith(b'{"t"')
    ]
    # The groups that reached their renames had their records durable (at least one).
    assert records
    assert {r["f"] for r in records} <= {"0.jsonl", "1.jsonl", "2.jsonl"}
    assert not list(tmp_path.glob("*.jsonl"))  # nothing renamed
    # The restart: the sink removes this host's temporary files; the ledger reads its log.
    for stale in tmp_path.glob(".*.tmp"):
        stale.unlink()
    ledger = LedgerLog(tmp_path, "h")
    ledger.open()
    assert all(written(ledger, f"{tag}/0") == [] for tag in "abc")
    executor = SteppedExecutor()
    group = GroupCommit(tmp_path, executor, ledger, sync=sync)
    again = [group.submit(batch(tag), f"again-{tag}.jsonl") for tag in "abc"]
    await run_all(executor)
    await asyncio.gather(*again)
    values = sorted(e["value"] for e in written_lines(tmp_path))
    assert values == ["a", "a", "b", "b", "c", "c"]
    assert os.listdir(tmp_path / ".ledger") == ["h.log"]
