"""Group commit: batch files sealed at about the same time — by any worker of any shard —
made durable together, so the per-file costs that do not depend on the file (the ledger's
fdatasync, the directory's fsync) are paid once per group.

How the files' data is made durable (SYNC_MODE):

- `group` (the default, Linux 5.8+): the whole group is one step on one writer thread.
  Each temporary file is encoded (JSON Lines, compressed: `encoding`) and written (not
  synced), one after the other, in its batch's directory under the output root, made if
  missing; the records of all its files are appended to the ledger and the file system is
  synced once (`syncfs`): every file's data and the records are durable together, one
  write-back and one disk flush however many files the group holds; then each file's own
  write-back errors are checked on its descriptor, and the renames follow (below). One
  thread hand-off per group, not per file; and files created one after the other do not
  contend for their directory's lock (threads creating files in one directory at once
  spin on it: measured, `bench.consumer_drain`);
- `file`: each temporary file is fsynced on its own writer thread, and meanwhile its
  record joins the next *record group* (the records of every batch that came while the
  previous one was being synced: one append, one fdatasync). A flush per file: for file
  systems where a whole-file-system sync is unwelcome (a volume shared with others).

Then, the records durable before any rename, the *rename group*: per file, commit (a batch
whose worker timed out was abandoned: its file is dropped, the rest of the group goes on)
and rename into place; one fsync per directory touched — each directory a file was renamed
into, and the parent of each directory not yet known durable (a new one, or one first used
by this process), so a new directory's own entry survives a crash too; then the ledger's
confirmations (of the files whose directories all synced; the others stay unconfirmed until
a later sync succeeds) and abort lines for the dropped ones, in one append. The ledger
names files by their path relative to the output root.

A group starts at once while fewer than `max_groups` groups of its kind are in progress
(SYNC_MODE=group: one, `SerialGroups`, whose writer thread starts the next group itself),
so a lone batch at low load waits at most for the group in progress; under load, the
batches that came meanwhile form the next group.
Groups in progress at once share their syncs (`SharedSync`): a syncfs or directory fsync
that starts after a group asked for it serves every group that asked meanwhile, so the
disk sees about one flush per step however many groups wait.

Only after its renames does a batch's future resolve (or fail with OSError /
`Abandoned`, for that batch alone), and its deliveries can be acked. A kill at any point
leaves temporary files (removed at start-up; their deliveries were never acked) and records
whose files are in place or not: the ledger counts a record only if its file is there and
the directory was synced since.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Protocol, TypeVar

from services.common.schema import Entry
from services.consumer.batch import Batch, Span
from services.consumer.encoding import json_lines
from services.consumer.files import (
    HeldCalls,
    fsync_directory,
    sync_filesystem,
    syncfs_available,
    write_durably,
)
from services.consumer.ledger_log import LedgerLog

log = logging.getLogger(__name__)

MAX_GROUPS = 4  # SYNC_MODE=file: groups of each kind in progress at once (sharing syncs)
# SYNC_MODE=group: one group in progress at a time, the next started by the writer thread
# itself as the last one ends (`SerialGroups`). Measured on 2 cores (bench/consumer_drain.py,
# defaults, same run): 11,850 entries/s with one group at a time, 9,900 with two, 8,200
# with four — each more halves the groups, multiplies the syncfs calls and has threads
# contend for the GIL and their directory's lock. A lone batch waits at most for the group
# in progress (a few ms).
# Directories remembered as durable (their own entry synced); past it the memory starts
# over, which only costs one more parent fsync per directory.
MAX_KNOWN_DIRECTORIES = 10_000
SyncMode = Literal["group", "file"]

Outcome = BaseException | None  # None: that step succeeded


class Abandoned(Exception):
    """The batch's worker timed out before the write committed; the file was not made."""


@dataclass(eq=False)
class _Job:
    batch: Batch
    name: str
    temporary: Path
    final: Path
    done: asyncio.Future[None]
    spans: list[Span] = field(default_factory=list)
    # Its directory and those above it (relative) not known durable when it was written.
    unsynced: list[str] = field(default_factory=list)
    written: bool = False  # the temporary file's write ended (error set if it failed)
    recorded: bool = False  # the record step ended (True at once without a ledger)
    in_log: bool = False  # its record is in the ledger's log (an abort must say so)
    error: BaseException | None = None
    fd: int | None = None  # SYNC_MODE=group: the temporary file, open until checked


class SharedSync:
    """A sync many threads need, run once for all of them: `sync()` returns after a run of
    `fn` that started after the call (so it covers everything the caller did before), and
    raises that run's OSError. Callers that come while a run is in progress share the next
    one: two groups in progress need about one run between them, not one each."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn = fn
        self._cond = threading.Condition()
        self._started = 0  # runs started so far
        self._finished = 0
        self._running = False
        self._errors: dict[int, BaseException] = {}  # run -> its failure, for its waiters

    def sync(self) -> None:
        with self._cond:
            wanted = self._started + 1  # the first run starting after now
            while self._finished < wanted:
                if not self._running and self._started < wanted:
                    self._running = True
                    self._started = run = wanted
                    break
                self._cond.wait()
            else:
                failed = self._errors.get(wanted)
                if failed is not None:
                    raise failed
                return
        error: BaseException | None = None
        try:
            self._fn()
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter of this run
            error = exc
        with self._cond:
            self._running = False
            self._finished = run
            if error is not None:
                self._errors[run] = error
            for old in [r for r in self._errors if r < run - 64]:
                del self._errors[old]
            self._cond.notify_all()
        if error is not None:
            raise error


class HasDone(Protocol):
    @property
    def done(self) -> asyncio.Future[None]: ...


J = TypeVar("J", bound=HasDone)


class Groups(Generic[J]):
    """Runs `step` on groups of jobs, at most `limit` groups at once; each group is every
    job that came while the earlier ones ran. `step` returns each job's outcome; then
    `after(job, outcome)` (by default: the job's `done` future gets it)."""

    def __init__(
        self,
        step: Callable[[list[J]], Awaitable[list[Outcome]]],
        limit: int,
        *,
        after: Callable[[J, Outcome], None] | None = None,
        on_group: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._step = step
        self._after = after or settle
        self._limit = limit
        self._on_group = on_group
        self._waiting: list[J] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, job: J) -> None:
        self._waiting.append(job)
        self._start()

    def _start(self) -> None:
        while self._waiting and self._running < self._limit:
            jobs, self._waiting = self._waiting, []
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(jobs), name="group-commit")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, jobs: list[J]) -> None:
        self._on_group(len(jobs))
        cancelled = False
        try:
            outcomes = await self._step(jobs)
        except asyncio.CancelledError:
            # The executor dropped the step before it ran (shut down), or this task was
            # cancelled: no job may be left waiting, and none is acked.
            cancelled = True
            outcomes = [Abandoned("the group commit was cancelled")] * len(jobs)
        except Exception as exc:
            log.exception("group commit failed")
            outcomes = [exc] * len(jobs)
        finally:
            self._running -= 1
            self._start()
        for job, outcome in zip(jobs, outcomes, strict=True):
            self._after(job, outcome)
        if cancelled and (task := asyncio.current_task()) is not None and task.cancelling():
            raise asyncio.CancelledError


class SerialGroups(Generic[J]):
    """Runs the blocking `step` on groups of jobs on one executor thread, one group after
    the other: each group is every job that came while the one before ran, and the thread
    takes it as soon as that one ends, without waiting for the event loop (a busy loop
    took about 1.5 ms per group to start the next: a third of the writer's time). The
    thread leaves when no job waits; the next job starts it again. `step` returns each
    job's outcome; the jobs' `done` futures get them on the loop."""

    def __init__(
        self,
        step: Callable[[list[J]], list[Outcome]],
        executor: Executor,
        *,
        on_group: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._step = step
        self._executor = executor
        self._on_group = on_group
        self._lock = threading.Lock()
        self._waiting: list[J] = []
        self._running = False  # a thread is taking groups (or about to)

    def add(self, job: J) -> None:
        with self._lock:
            self._waiting.append(job)
            if self._running:
                return
            self._running = True
        loop = asyncio.get_running_loop()
        try:
            runner = loop.run_in_executor(self._executor, self._run, loop)
        except RuntimeError:  # the executor is shut down: nothing more is written
            self._drop()
            return
        runner.add_done_callback(self._ended)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Writer thread: groups back to back until none waits."""
        while True:
            with self._lock:
                jobs, self._waiting = self._waiting, []
                if not jobs:
                    self._running = False
                    return
            try:
                outcomes = self._step(jobs)
            except Exception as exc:
                log.exception("group commit failed")
                outcomes = [exc] * len(jobs)
            try:
                loop.call_soon_threadsafe(self._finish, jobs, outcomes)
            except RuntimeError:  # the loop is closed: nobody waits for them any more
                return

    def _finish(self, jobs: list[J], outcomes: list[Outcome]) -> None:
        self._on_group(len(jobs))
        for job, outcome in zip(jobs, outcomes, strict=True):
            settle(job, outcome)

    def _ended(self, runner: asyncio.Future[None]) -> None:
        """The thread's task ended. Dropped before it ran (the executor shut down, or it was
        cancelled), or died of something not an Exception: the jobs waiting fail as
        abandoned (none is acked), and the next job starts a thread again."""
        if runner.cancelled() or runner.exception() is not None:
            self._drop()

    def _drop(self) -> None:
        with self._lock:
            jobs, self._waiting = self._waiting, []
            self._running = False
        for job in jobs:
            settle(job, Abandoned("the group commit was cancelled"))


class GroupCommit:
    def __init__(
        self,
        directory: Path,
        executor: Executor,
        ledger: LedgerLog | None = None,
        *,
        sync: SyncMode = "group",
        max_groups: int | None = None,
        encode: Callable[[list[Entry]], bytes] = json_lines,
        on_group: Callable[[int], None] = lambda batches: None,
    ) -> None:
        """`directory` is the output root (each batch's own directory is under it);
        `executor` runs the writes and the groups (SYNC_MODE=group: one thread;
        file: a thread per batch being written at once, plus twice `max_groups`);
        `max_groups` (SYNC_MODE=file): groups of a kind in progress at once (MAX_GROUPS);
        `encode` makes a file's bytes of its entries (on the writer thread);
        `on_group(batches)` is told each rename group's size."""
        self.directory = directory
        self._executor = executor
        self._ledger = ledger
        self._encode = encode
        # Relative directories whose own entry is known synced. Written from the writer
        # threads, one set operation at a time (each atomic under the GIL).
        self._durable: set[str] = set()
        if sync == "group" and not syncfs_available():
            log.warning("SYNC_MODE=group needs Linux 5.8 or later (syncfs); using SYNC_MODE=file")
            sync = "file"
        self.sync = sync
        # Shared by the groups in progress: one run serves the ones that asked meanwhile.
        self._flush_all = SharedSync(lambda: sync_filesystem(directory))
        # One per directory (relative; "" the root), made on first use.
        self._directory_syncs: dict[str, SharedSync] = {}
        self._directory_syncs_lock = threading.Lock()
        # SYNC_MODE=group: one step per group (write, record, syncfs, rename). file: the
        # files are written and fsynced each on a thread, then record and rename groups.
        limit = max_groups or MAX_GROUPS
        self._commits = SerialGroups(self._commit, executor, on_group=on_group)
        self._calls = HeldCalls()
        self._records = Groups(self._in_thread(self._record), limit, after=self._recorded)
        self._renames = Groups(self._in_thread(self._rename), limit, on_group=on_group)

    def _in_thread(
        self, step: Callable[[list[_Job]], list[Outcome]]
    ) -> Callable[[list[_Job]], Awaitable[list[Outcome]]]:
        def run(jobs: list[_Job]) -> Awaitable[list[Outcome]]:
            return asyncio.get_running_loop().run_in_executor(self._executor, step, jobs)

        return run

    def submit(self, batch: Batch, name: str) -> asyncio.Future[None]:
        """Write `batch` to the file `name`, durably, as part of a group. The future is
        done when it is in place, fsynced, its directory fsynced (and, with a ledger,
        recorded); it fails with OSError or `Abandoned` otherwise. Not cancellable (await
        it shielded): a job always finishes with its group, or finds its batch abandoned."""
        loop = asyncio.get_running_loop()
        folder = self.directory / batch.directory if batch.directory else self.directory
        job = _Job(
            batch,
            f"{batch.directory}/{name}" if batch.directory else name,
            folder / f".{name}.tmp",
            folder / name,
            loop.create_future(),
            batch.spans,
            recorded=self._ledger is None,
        )
        if self.sync == "group":
            self._commits.add(job)
            return job.done
        written = loop.run_in_executor(self._executor, self._write_temporary, job)
        written.add_done_callback(lambda future: self._written(job, future))
        if not job.recorded:
            self._records.add(job)
        return job.done

    def _written(self, job: _Job, future: asyncio.Future[None]) -> None:
        if future.cancelled():  # the executor was shut down: nothing was made
            job.error = job.error or Abandoned(job.name)
        elif (error := future.exception()) is not None:
            job.error = job.error or error
        job.written = True
        self._advance(job)

    def _recorded(self, job: _Job, outcome: Outcome) -> None:
        if outcome is not None:
            job.error = job.error or outcome
        job.recorded = True
        self._advance(job)

    def _advance(self, job: _Job) -> None:
        if job.written and job.recorded:  # also when one failed: the rename step cleans up
            self._renames.add(job)

    def _record(self, jobs: list[_Job]) -> list[Outcome]:
        """Writer thread: one append and one fdatasync for the records of `jobs` (those
        not abandoned already)."""
        assert self._ledger is not None
        live = [job for job in jobs if not job.batch.abandoned]
        if not live:
            return [None] * len(jobs)
        try:
            self._ledger.record([(job.name, job.spans) for job in live])
        except OSError as exc:
            return [exc] * len(jobs)
        for job in live:
            job.in_log = True
        return [None] * len(jobs)

    def _commit(self, jobs: list[_Job]) -> list[Outcome]:
        """Writer thread, SYNC_MODE=group: the group's whole commit — its temporary files,
        one after the other, then the records, the syncfs and the renames (`_rename`)."""
        for job in jobs:
            if job.batch.abandoned:
                job.error = Abandoned(job.name)
                continue
            try:
                self._write_temporary(job)
            except Exception as exc:  # noqa: BLE001 - that batch's own failure
                job.error = exc
        try:
            return self._rename(jobs)
        finally:
            self._calls.group_done()

    def _flush(self, jobs: list[_Job]) -> None:
        """SYNC_MODE=group: append the records of the group's live files, then one syncfs
        makes them and the files' data durable. Marks the jobs that failed."""
        live = [job for job in jobs if job.error is None and not job.batch.abandoned]
        try:
            if live:
                if self._ledger is not None:
                    self._ledger.record([(job.name, job.spans) for job in live], sync=False)
                    for job in live:
                        job.in_log = True
                self._flush_all.sync()
        except OSError as exc:
            # Records appended but maybe not durable are aborted below with their files.
            for job in live:
                job.error = exc
        for job in jobs:
            fd, job.fd = job.fd, None
            if fd is None:
                continue
            try:
                self._calls.check_written(fd)
            except OSError as exc:
                job.error = job.error or exc

    def _rename(self, jobs: list[_Job]) -> list[Outcome]:
        """Writer thread: per job commit and rename, one directory fsync, the ledger's
        confirmations and aborts; each job's outcome (None: durable)."""
        if self.sync == "group":
            self._flush(jobs)
        outcomes: list[Outcome] = [self._put_in_place(job) for job in jobs]
        renamed = [i for i, outcome in enumerate(outcomes) if outcome is None]
        failed = self._sync_directories(jobs[i] for i in renamed)
        synced: list[_Job] = []
        for i in renamed:
            job = jobs[i]
            error = next((failed[d] for d in _needs(job) if d in failed), None)
            if error is None:
                synced.append(job)
                self._durable.update(job.unsynced)
            else:
                # In place but not durable: not confirmed, not acked. A retry finds the
                # file unconfirmed and trusts it only once a directory sync succeeds.
                outcomes[i] = error
        if len(self._durable) > MAX_KNOWN_DIRECTORIES:
            self._durable.clear()
        if self._ledger is not None:
            in_place = [jobs[i] for i in renamed]
            confirmed = [(job.name, job.spans) for job in synced]
            unsynced = [(job.name, job.spans) for job in in_place if job not in synced]
            aborted = [job.name for job in jobs if job.in_log and job not in in_place]
            self._ledger.settled(confirmed, unsynced, aborted)
        return outcomes

    def _sync_directories(self, jobs: Iterable[_Job]) -> dict[str, OSError]:
        """One fsync for each directory the jobs need synced (relative; "" the root),
        deepest first; the directories whose sync failed, with the error."""
        needed = {directory for job in jobs for directory in _needs(job)}
        failed: dict[str, OSError] = {}
        for directory in sorted(needed, key=lambda d: (-d.count("/"), d)):
            try:
                self._directory_sync(directory).sync()
            except OSError as exc:
                failed[directory] = exc
        return failed

    def _directory_sync(self, directory: str) -> SharedSync:
        """The shared fsync of one directory: groups in progress that need the same
        directory synced share one run."""
        with self._directory_syncs_lock:
            shared = self._directory_syncs.get(directory)
            if shared is None:
                if len(self._directory_syncs) >= MAX_KNOWN_DIRECTORIES:
                    self._directory_syncs.clear()  # (a thread still using one keeps it)
                path = self.directory / directory if directory else self.directory
                shared = SharedSync(lambda: fsync_directory(path))
                self._directory_syncs[directory] = shared
            return shared

    def _write_temporary(self, job: _Job) -> None:
        """Writer thread: the job's bytes in its temporary file — synced (SYNC_MODE=file)
        or left open for the group's syncfs (SYNC_MODE=group) — its directory made if
        missing."""
        data = self._encode(job.batch.entries)
        directory = job.batch.directory
        try:
            try:
                self._write_bytes(job, data)
            except FileNotFoundError:
                if not directory:
                    raise  # the root itself is gone: the directory check recreates it
                self._make_directories(directory)
                self._write_bytes(job, data)
        except BaseException:
            job.temporary.unlink(missing_ok=True)
            raise
        job.unsynced = [d for d in _ancestry(directory) if d not in self._durable]

    def _write_bytes(self, job: _Job, data: bytes) -> None:
        if self.sync == "group":
            job.fd = self._calls.write_unflushed(str(job.temporary), data)
        else:
            write_durably(job.temporary, data)

    def _make_directories(self, directory: str) -> None:
        """Create the relative `directory` and any missing above it (not the root). A
        directory created here is not durable until its parent is synced."""
        for relative in _ancestry(directory):
            try:
                (self.directory / relative).mkdir()
            except FileExistsError:
                continue
            self._durable.discard(relative)  # (removed by someone, made again)

    def _put_in_place(self, job: _Job) -> Outcome:
        """Commit the job's batch and rename its file; the failure if it cannot be."""
        try:
            if job.error is not None:
                raise job.error
            if self._ledger is not None and not job.in_log:
                raise Abandoned(job.name)  # abandoned before its record: never renamed
            if not job.batch.commit():
                raise Abandoned(job.name)
            if self.sync == "group":
                self._calls.rename(str(job.temporary), str(job.final))
            else:
                os.rename(job.temporary, job.final)
        except (OSError, Abandoned) as exc:
            job.temporary.unlink(missing_ok=True)
            return exc
        return None


def _ancestry(directory: str) -> list[str]:
    """ "a/b/c" -> ["a", "a/b", "a/b/c"]; "" (the root) -> []."""
    if not directory:
        return []
    parts = directory.split("/")
    return ["/".join(parts[: n + 1]) for n in range(len(parts))]


def _needs(job: _Job) -> list[str]:
    """The directories (relative, "" the root) to sync before the job's file is durable:
    its own, and the parent of each one not known durable."""
    parents = [d.rpartition("/")[0] for d in job.unsynced]
    return [job.batch.directory, *parents]


def settle(job: HasDone, outcome: Outcome) -> None:
    """Hand a job's outcome to its `done` future (unless someone already did)."""
    if job.done.done():
        return
    if outcome is None:
        job.done.set_result(None)
    else:
        job.done.set_exception(outcome)
    # Nobody may be waiting any more (the worker gave up): the outcome is not an error then.
    job.done.add_done_callback(lambda f: f.exception())
