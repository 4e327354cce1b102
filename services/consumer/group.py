"""Group commit: batch files sealed at about the same time — by any worker of any shard —
made durable together, so the per-file costs that do not depend on the file (the ledger's
fdatasync, the directory's fsync) are paid once per group.

Each batch's temporary file is encoded (JSON Lines, compressed) and written and fsynced on
its own writer thread as soon as it comes (the disk overlaps those fsyncs), in its batch's
directory under the output root, created if missing. A file ready joins the next group; a group is
started at once when fewer than `max_groups` are in progress, so a lone batch at low load
waits for nobody, and under load the files that became ready meanwhile form the next group.
A group, on one thread:

1. the ledger records of all its files: one append, one fdatasync (before any rename);
2. per file: commit (a batch whose worker timed out was abandoned: its file is dropped,
   the rest of the group goes on), rename into place;
3. one fsync per directory touched: each directory a file was renamed into, and the parent
   of each directory not yet known durable (a new one, or one first used by this process),
   so a new directory's own entry survives a crash too;
4. the ledger's confirmations (of the files whose directories all synced; the others stay
   unconfirmed until a later sync succeeds), one append. The ledger names files by their
   path relative to the output root.

Only then does each batch's `commit` return (or raise OSError / `Abandoned` for that batch
alone), and its deliveries can be acked. A kill at any point leaves either temporary files
(removed at start-up, their deliveries unacked) or records whose files are there or not —
the ledger counts a record only if its file is in place and the directory synced.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from services.common.schema import Entry
from services.consumer.batch import Batch
from services.consumer.encoding import json_lines
from services.consumer.files import fsync_directory, write_durably
from services.consumer.ledger_log import LedgerLog

log = logging.getLogger(__name__)

MAX_GROUPS = 2  # groups in progress at once: one committing, the next one forming
# Directories remembered as durable (their own entry synced); past it the memory starts
# over, which only costs one more parent fsync per directory.
MAX_KNOWN_DIRECTORIES = 10_000


class Abandoned(Exception):
    """The batch's worker timed out before the write committed; the file was not made."""


@dataclass(eq=False)
class _Job:
    batch: Batch
    name: str  # the file's path relative to the output root (posix): the ledger's name
    temporary: Path
    final: Path
    done: asyncio.Future[None]
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    # Its directory and those above it (relative) not known durable when it was written.
    unsynced: list[str] = field(default_factory=list)


class GroupCommit:
    def __init__(
        self,
        directory: Path,
        executor: Executor,
        ledger: LedgerLog | None = None,
        *,
        max_groups: int = MAX_GROUPS,
        encode: Callable[[list[Entry]], bytes] = json_lines,
        on_group: Callable[[int], None] = lambda batches: None,
    ) -> None:
        """`directory` is the output root (each batch's own directory is under it);
        `executor` runs the writes and the groups (it needs a thread per batch being
        written at once, plus `max_groups`); `encode` makes a file's bytes of its entries
        (on the writer thread); `on_group(batches)` is told each group's size."""
        self.directory = directory
        self._executor = executor
        self._ledger = ledger
        self._encode = encode
        # Relative directories whose own entry is known synced. Written from the writer
        # threads, one set operation at a time (each atomic under the GIL).
        self._durable: set[str] = set()
        self._max_groups = max_groups
        self._on_group = on_group
        self._ready: list[_Job] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

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
        )
        written = loop.run_in_executor(self._executor, self._write_temporary, job)
        written.add_done_callback(lambda future: self._written(job, future))
        return job.done

    def _written(self, job: _Job, future: asyncio.Future[None]) -> None:
        if future.cancelled():  # the executor was shut down: nothing was made
            _settle(job, Abandoned(job.name))
            return
        error = future.exception()
        if error is not None:
            _settle(job, error)
            return
        self._ready.append(job)
        self._start_groups()

    def _start_groups(self) -> None:
        while self._ready and self._running < self._max_groups:
            jobs, self._ready = self._ready, []
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._group(jobs), name="group-commit")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _group(self, jobs: list[_Job]) -> None:
        self._on_group(len(jobs))
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._commit, jobs)
        except BaseException as exc:
            outcomes = [exc] * len(jobs)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running -= 1
            self._start_groups()
        for job, outcome in zip(jobs, outcomes, strict=True):
            _settle(job, outcome)

    def _commit(self, jobs: list[_Job]) -> list[BaseException | None]:
        """Writer thread: steps 1-4 of the module's docstring for one group; each job's
        outcome (None: durable)."""
        outcomes: list[BaseException | None] = [None] * len(jobs)
        live = [i for i, job in enumerate(jobs) if not job.batch.abandoned]
        for i in set(range(len(jobs))) - set(live):  # timed out while its file was written
            outcomes[i] = Abandoned(jobs[i].name)
            jobs[i].temporary.unlink(missing_ok=True)
        if not live:
            return outcomes
        if self._ledger is not None:
            try:
                self._ledger.record([(jobs[i].name, jobs[i].spans) for i in live])
            except OSError as exc:
                for i in live:
                    outcomes[i] = exc
                    jobs[i].temporary.unlink(missing_ok=True)
                return outcomes
        renamed = [i for i in live if _rename(jobs[i], outcomes, i)]
        failed = self._sync_directories(jobs[i] for i in renamed)
        synced: list[int] = []
        for i in renamed:
            error = next((failed[d] for d in _needs(jobs[i]) if d in failed), None)
            if error is None:
                synced.append(i)
                self._durable.update(jobs[i].unsynced)
            else:
                # In place but not durable: not confirmed, not acked. A retry finds the
                # file unconfirmed and trusts it only once a directory sync succeeds.
                outcomes[i] = error
        if len(self._durable) > MAX_KNOWN_DIRECTORIES:
            self._durable.clear()
        if self._ledger is not None:
            confirmed = [(jobs[i].name, jobs[i].spans) for i in synced]
            unsynced = [(jobs[i].name, jobs[i].spans) for i in renamed if i not in synced]
            aborted = [jobs[i].name for i in live if i not in renamed]
            self._ledger.settled(confirmed, unsynced, aborted)
        return outcomes

    def _sync_directories(self, jobs: Iterable[_Job]) -> dict[str, OSError]:
        """One fsync for each directory the jobs need synced (relative; "" the root),
        deepest first; the directories whose sync failed, with the error."""
        needed = {directory for job in jobs for directory in _needs(job)}
        failed: dict[str, OSError] = {}
        for directory in sorted(needed, key=lambda d: (-d.count("/"), d)):
            try:
                fsync_directory(self.directory / directory if directory else self.directory)
            except OSError as exc:
                failed[directory] = exc
        return failed

    def _write_temporary(self, job: _Job) -> None:
        """Writer thread: the job's bytes in its temporary file, fsynced; its directory
        made if missing."""
        data = self._encode(job.batch.entries)
        directory = job.batch.directory
        try:
            try:
                write_durably(job.temporary, data)
            except FileNotFoundError:
                if not directory:
                    raise  # the root itself is gone: the directory check recreates it
                self._make_directories(directory)
                write_durably(job.temporary, data)
        except BaseException:
            job.temporary.unlink(missing_ok=True)
            raise
        job.unsynced = [d for d in _ancestry(directory) if d not in self._durable]

    def _make_directories(self, directory: str) -> None:
        """Create the relative `directory` and any missing above it (not the root). A
        directory created here is not durable until its parent is synced."""
        for relative in _ancestry(directory):
            try:
                (self.directory / relative).mkdir()
            except FileExistsError:
                continue
            self._durable.discard(relative)  # (removed by someone, made again)


def _rename(job: _Job, outcomes: list[BaseException | None], i: int) -> bool:
    """Commit the job's batch and rename its file into place; False (and the outcome set)
    if it was abandoned or the rename failed."""
    try:
        if not job.batch.commit():
            raise Abandoned(job.name)
        os.rename(job.temporary, job.final)
    except (OSError, Abandoned) as exc:
        outcomes[i] = exc
        job.temporary.unlink(missing_ok=True)
        return False
    return True


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


def _settle(job: _Job, outcome: BaseException | None) -> None:
    if job.done.done():
        return
    if outcome is None:
        job.done.set_result(None)
    else:
        job.done.set_exception(outcome)
    # Nobody may be waiting any more (the worker gave up): the outcome is not an error then.
    job.done.add_done_callback(lambda f: f.exception())
