"""The ledger: which entries are already in batch files, so that none is written twice.

Entries are known by part (`services.common.wire`): a part id and an index in the part. The
ledger is a log per consumer process in the output volume, `.ledger/<host>.log`, JSON
Lines:

- `{"g": generation}` — the first line, new at each compaction (readers notice the rewrite);
- `{"t": time, "f": file, "p": [[part, first, end], ...]}` — appended and fsynced *before*
  the batch file is renamed into place (so a file under its final name is always recorded);
- `{"d": file}` — appended after the rename and the directory sync (not synced itself): the
  record is confirmed. A record without it (the process died between the two) counts only
  if the file exists (the directory is synced before it is trusted);
- `{"s": [part, ...]}` — parts whose message is settled (acked, and the ack known to have
  reached the broker): they cannot come back, so every reader forgets them.

Writing a batch (`admit` → sink → `release`): its ranges are claimed first, so another copy
of the same entries in this process waits for this write's outcome instead of racing it.
Entries of a delivery that may already be written (a redelivery, a part with an
Idempotency-Key, a batch retried after a failed attempt) are looked up — in this process's
records and in every other process's log in the same directory (replicas sharing a volume),
read incrementally, on an executor thread — and those already in a file are left out.
Deliveries are still settled for every entry. The event loop never waits for the lock the
writer threads hold across disk I/O.

What is kept: unsettled parts (messages written but whose ack is not known to have arrived)
and parts with an Idempotency-Key for LEDGER_RETENTION_SECONDS, at most LEDGER_MAX_PARTS
(oldest forgotten first, counted). The own log is compacted to that when it has doubled.

Limits (README, Guarantees): another replica's write of the same entries that is still in
progress (recorded, not yet renamed) is not waited for; a retry arriving after the
retention, or after its part was forgotten for room, is written again; a broker that
forgets acks it had applied (a crash, a quorum leader change) redelivers settled messages.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiormq.abc import AbstractChannel as RawChannel
from pydantic_core import to_json

from services.common.schema import Entry
from services.consumer.batch import Batch, Delivery
from services.consumer.files import fsync_directory, write_all, write_durably

log = logging.getLogger(__name__)

LEDGER_DIR = ".ledger"
COMPACT_BYTES = 8 * 1024 * 1024

Span = tuple[str, int, int]  # part id, first, end (indices in the part)


class Ledger:
    def __init__(
        self,
        directory: Path,
        host: str,
        *,
        retention: float = 3600.0,
        max_parts: int = 250_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.folder = directory / LEDGER_DIR
        self._path = self.folder / f"{host}.log"
        self._retention = retention
        self._max_parts = max_parts
        self._clock = clock
        # Hooks for metrics: parts forgotten for room; entries left out (shard, count).
        self.on_forget: Callable[[int], None] = lambda count: None
        self.on_skip: Callable[[int, int], None] = lambda shard, count: None
        # The writer threads and the executor share these; the event loop never takes it.
        self._lock = threading.Lock()
        self._opened = False
        self._size = 0
        self._compact_at = COMPACT_BYTES
        # part id -> [(first, end, file)] written; insertion order is age order.
        self._written: dict[str, list[tuple[int, int, str]]] = {}
        self._born: dict[str, float] = {}
        self._unconfirmed: set[str] = set()  # recorded files not known to be in place
        self._own: dict[str, tuple[float, list[Span]]] = {}  # this log's records, by file
        self._recording: dict[str, tuple[float, list[Span]]] = {}  # recorded, not renamed
        self._others: dict[str, tuple[object, int]] = {}  # other log -> (generation, read)
        # Event loop only: part id -> ranges being written now, with the write's outcome.
        self._writing: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._claims: dict[Batch, tuple[asyncio.Future[None], list[str]]] = {}
        # Event loop only: acked deliveries' parts waiting for a barrier on their channel.
        self._acked: dict[RawChannel, list[str]] = {}
        self.skipped = 0  # entries found already written (duplicates avoided)
        # Lookups and settling, off the event loop but not on its default executor: closing
        # the loop waits for that one, and a thread hung on the volume would hold the exit.
        self._io = ThreadPoolExecutor(4, thread_name_prefix="adp-ledger")
        self._torn = False  # a failed append left a partial line it could not remove

    # --- start-up -------------------------------------------------------------------------

    def open(self) -> None:
        """Load every log in the directory (this host's included: what it recorded before a
        restart), then rewrite this host's, compacted."""
        with self._lock:
            self._open()

    # --- the write path (event loop) ----------------------------------------------------------

    async def admit(self, batch: Batch) -> Batch:
        """The batch to write: without entries already in a file, with the spans the file
        will hold. Its ranges stay claimed until `release` (also if this raises OSError:
        then it releases them itself)."""
        check = any(delivery.check for delivery, _, _ in batch.sources)
        if check:
            waited = False
            while waits := self._overlapping(batch):
                await asyncio.wait(waits)
                waited = True
            if waited:
                # A delivery whose channel died meanwhile is redelivered, and its copy may
                # have been written while this batch waited: it must not be written here.
                batch = batch.without_stale()
        # Claimed before any await: a copy admitted meanwhile waits for this one.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        claimed = self._claim(batch, future)
        try:
            if check:
                loop = asyncio.get_running_loop()
                admitted = await loop.run_in_executor(self._io, self._refresh_and_trim, batch)
            else:
                admitted = batch.only(batch.entries, self._spans(batch))
        except BaseException:
            self._unclaim(future, claimed)
            raise
        self._claims[admitted] = (future, claimed)
        return admitted

    def release(self, batch: Batch) -> None:
        """The write of an admitted batch ended (written or not)."""
        claim = self._claims.pop(batch, None)
        if claim is not None:
            self._unclaim(*claim)

    # --- the write path (writer threads) ------------------------------------------------------

    def record(self, name: str, spans: list[Span]) -> None:
        """Before the rename: make the record durable."""
        now = self._clock()
        line = to_json({"t": now, "f": name, "p": spans}) + b"\n"
        with self._lock:
            if not self._opened:  # the volume was unusable at start-up
                self._open()
            self._recording[name] = (now, spans)
            fd = self._append(line)
        try:
            os.fdatasync(fd)  # outside the lock: the writers' syncs overlap
        finally:
            os.close(fd)

    def abort(self, name: str) -> None:
        """The recorded file was not renamed into place after all."""
        with self._lock:
            self._recording.pop(name, None)

    def unsynced(self, name: str, spans: list[Span]) -> None:
        """After the rename, the directory sync failed: the file is in place but the rename
        may not survive a power loss. Known as recorded and unconfirmed (as a record read
        from a log without its confirmation): a lookup trusts it only after a directory
        sync of its own succeeds."""
        with self._lock:
            now = self._clock()
            self._recording.pop(name, None)
            self._own[name] = (now, spans)
            self._add(name, spans, now)
            self._unconfirmed.add(name)

    def confirm(self, name: str, spans: list[Span]) -> None:
        """After the rename and a successful directory sync: the file is in place. Never
        raises: the durable record already says so."""
        with self._lock:
            now = self._clock()
            self._recording.pop(name, None)
            self._own[name] = (now, spans)
            self._add(name, spans, now)
            self._trim_to_limits(now)
            try:
                os.close(self._append(to_json({"d": name}) + b"\n"))
                if self._size > self._compact_at:
                    self._compact()
            except OSError as exc:
                log.warning("ledger: could not append or compact (%s); the record stands", exc)

    # --- settling ---------------------------------------------------------------------------

    def acked(self, delivery: Delivery) -> None:
        """Its ack was sent; its unkeyed parts settle after the next barrier."""
        ids = [p.id for p in delivery.parts if p.id is not None and not p.keyed]
        if ids and delivery.channel is not None:
            self._acked.setdefault(delivery.channel, []).extend(ids)

    async def settle(self, barrier: Callable[[RawChannel], object]) -> int:
        """For each channel with acked deliveries: a synchronous round trip on it (the
        broker handles a channel's frames in order, so every ack sent before is applied),
        then their parts are forgotten, here and — through the log — in other readers. A
        channel that fails the barrier settles nothing: its messages may come back."""
        pending, self._acked = self._acked, {}
        settled: list[str] = []
        for channel, ids in pending.items():
            if channel.is_closed:
                continue
            try:
                await barrier(channel)  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - any failure means "not known applied"
                log.info("ack barrier failed (%s); %d parts stay recorded", exc, len(ids))
                continue
            settled.extend(ids)
        if settled:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._io, self._settle, settled)
        return len(settled)

    # --- inspection ---------------------------------------------------------------------------

    @property
    def parts(self) -> int:
        return len(self._written)

    def written(self, part: str) -> list[tuple[int, int]]:
        with self._lock:
            return [(a, b) for a, b, f in self._written.get(part, ()) if f not in self._unconfirmed]

    def refresh(self) -> None:
        """Read what other processes appended to their logs; confirm records whose file is
        in place."""
        with self._lock:
            self._read_others()
            self._confirm()

    # --- internals ----------------------------------------------------------------------------

    def _open(self) -> None:
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.directory)  # the new folder's own entry is durable too
        self._read_others()
        self._confirm()
        self._compact()

    def _spans(self, batch: Batch) -> list[Span]:
        return [(p.id, a, b) for _, p, a, b, _ in batch.ranges() if p.id is not None]

    def _refresh_and_trim(self, batch: Batch) -> Batch:
        """Executor thread: the batch without what is already written, looked up for the
        deliveries that may have been (the others' entries cannot have been: a reused
        `message_id` of someone else's must not make them vanish)."""
        entries: list[Entry] = []
        spans: list[Span] = []
        # Two copies may share the batch itself (a client's retry right behind the
        # original): what this batch already takes counts as written for the rest of it.
        taken: dict[str, list[tuple[int, int]]] = {}
        with self._lock:
            self._read_others()
            self._confirm()
            for delivery, part, first, end, offset in batch.ranges():
                if part.id is None:  # not identifiable: written as it is
                    entries.extend(batch.entries[offset : offset + end - first])
                    continue
                mine = taken.setdefault(part.id, [])
                done: list[tuple[int, int]] = list(mine)
                if delivery.check:
                    done += [
                        (a, b)
                        for a, b, f in self._written.get(part.id, ())
                        if f not in self._unconfirmed
                    ]
                for a, b in _missing(first, end, done):
                    entries.extend(batch.entries[offset + a - first : offset + b - first])
                    spans.append((part.id, a, b))
                    mine.append((a, b))
        skipped = len(batch.entries) - len(entries)
        if skipped:
            self.skipped += skipped
            self.on_skip(batch.shard, skipped)
            log.info("shard %d: %d entries already written, left out", batch.shard, skipped)
        return batch.only(entries, spans)

    def _overlapping(self, batch: Batch) -> list[asyncio.Future[None]]:
        waits = []
        for _, part, first, end, _ in batch.ranges():
            for a, b, future in self._writing.get(part.id or "", ()):
                if a < end and first < b:
                    waits.append(future)
        return waits

    def _claim(self, batch: Batch, future: asyncio.Future[None]) -> list[str]:
        claimed = []
        for _, part, first, end, _ in batch.ranges():
            if part.id is not None:
                self._writing.setdefault(part.id, []).append((first, end, future))
                claimed.append(part.id)
        return claimed

    def _unclaim(self, future: asyncio.Future[None], claimed: list[str]) -> None:
        if not future.done():
            future.set_result(None)
        for part in claimed:
            claims = self._writing.get(part)
            if claims is None:
                continue
            kept = [claim for claim in claims if claim[2] is not future]
            if kept:
                self._writing[part] = kept
            else:
                del self._writing[part]

    def _add(self, name: str, spans: Iterable[Span], born: float) -> None:
        for part, first, end in spans:
            ranges = self._written.setdefault(part, [])
            if (first, end, name) not in ranges:  # a log read again after a compaction
                ranges.append((first, end, name))
            self._born.setdefault(part, born)

    def _settle(self, ids: list[str]) -> None:
        with self._lock:
            self._forget(ids)
            try:
                os.close(self._append(to_json({"s": ids}) + b"\n"))
            except OSError as exc:
                log.warning("ledger: could not note settled parts (%s)", exc)

    def _forget(self, ids: Iterable[str]) -> None:
        for part in ids:
            self._born.pop(part, None)
            for _, _, name in self._written.pop(part, ()):
                own = self._own.get(name)
                if own is None:
                    continue
                spans = [span for span in own[1] if span[0] != part]
                if spans:
                    self._own[name] = (own[0], spans)
                else:  # nothing of that file left to remember
                    del self._own[name]

    def _trim_to_limits(self, now: float) -> None:
        """Forget parts past the retention (their time is up), then the oldest beyond
        LEDGER_MAX_PARTS (for room: counted, since a retry of those would be written
        again)."""
        horizon = now - self._retention
        expired: list[str] = []
        for part, born in self._born.items():
            if born >= horizon:
                break
            expired.append(part)
        self._forget(expired)
        excess = len(self._born) - self._max_parts
        if excess > 0:
            self._forget(list(itertools.islice(self._born, excess)))
            self.on_forget(excess)

    def _read_others(self) -> None:
        horizon = self._clock() - self._retention
        for path in self.folder.glob("*.log"):
            if path == self._path and self._opened:
                continue  # our own, after start-up: the index already holds it
            try:
                if path != self._path and path.stat().st_mtime < horizon:
                    # A gone replica's log, untouched for the retention: every record in
                    # it is past the horizon too, so it can go.
                    path.unlink()
                    self._others.pop(path.name, None)
                    continue
                handle = path.open("rb")
            except FileNotFoundError:
                continue
            with handle:
                generation = _generation(handle.readline(200))
                size = os.fstat(handle.fileno()).st_size
                seen, offset = self._others.get(path.name, (generation, 0))
                if seen != generation or size < offset:
                    offset = 0  # rewritten (compacted) by its writer: read it again
                handle.seek(offset)
                data = handle.read()
            complete = data.rfind(b"\n") + 1  # a line being appended is read next time
            self._apply(data[:complete], own=path == self._path)
            self._others[path.name] = (generation, offset + complete)

    def _apply(self, data: bytes, *, own: bool) -> None:
        horizon = self._clock() - self._retention
        for line in data.splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a torn last line of a crashed writer
            try:
                self._apply_one(item, own=own, horizon=horizon)
            except (KeyError, TypeError, ValueError) as exc:  # another version's shape
                log.warning("ledger: a line of an unknown shape skipped (%r)", exc)

    def _apply_one(self, item: object, *, own: bool, horizon: float) -> None:
        if not isinstance(item, dict):
            return
        if "f" in item:
            born = float(item["t"])
            if born < horizon:
                return
            name = str(item["f"])
            spans = [(str(p), int(a), int(b)) for p, a, b in item["p"]]
            self._add(name, spans, born)
            self._unconfirmed.add(name)
            if own:
                self._own[name] = (born, spans)
        elif "d" in item:
            self._unconfirmed.discard(item["d"])
        elif "s" in item:
            self._forget(str(part) for part in item["s"])

    def _confirm(self) -> None:
        """Records without their confirmation whose file is in place count once the
        directory is synced (the rename may not have been, when their writer died)."""
        present = [name for name in self._unconfirmed if (self.directory / name).exists()]
        if present:
            fsync_directory(self.directory)
            self._unconfirmed.difference_update(present)

    def _append(self, line: bytes) -> int:
        """Append a line; returns the open descriptor (the caller syncs if it must, and
        closes it). Opened for each line (cheap beside the fsyncs): no descriptor is held
        between writes, so a log removed by hand comes back, and the volume can be
        remounted."""
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if self._torn:  # end the partial line left behind, so this one stays whole
                line = b"\n" + line
            before = os.fstat(fd).st_size
            try:
                write_all(fd, line)
            except OSError:
                # Cut short (a full volume): remove the partial line, or the next append
                # would be glued onto it and make one invalid line of both.
                try:
                    os.ftruncate(fd, before)
                except OSError:
                    self._torn = True
                raise
            self._torn = False
        except BaseException:
            os.close(fd)
            raise
        self._size += len(line)
        return fd

    def _compact(self) -> None:
        """Rewrite this host's log with what is still live, atomically."""
        live = [to_json({"g": uuid.uuid4().hex}) + b"\n"]
        for name, (born, spans) in list(self._own.items()):
            kept = [s for s in spans if s[0] in self._written]
            unconfirmed = name in self._unconfirmed
            if not kept or (unconfirmed and not (self.directory / name).exists()):
                del self._own[name]  # forgotten, or its file never appeared
                continue
            live.append(to_json({"t": born, "f": name, "p": kept}) + b"\n")
            if not unconfirmed:  # one in place but not yet synced stays unconfirmed
                live.append(to_json({"d": name}) + b"\n")
        for name, (born, spans) in self._recording.items():  # being renamed by a writer now
            live.append(to_json({"t": born, "f": name, "p": spans}) + b"\n")
        data = b"".join(live)
        temporary = self.folder / f".{self._path.name}.tmp"
        temporary.unlink(missing_ok=True)  # left by a compaction that died
        write_durably(temporary, data)
        os.rename(temporary, self._path)
        fsync_directory(self.folder)
        self._opened = True
        self._size = len(data)
        # Compact again once the log has doubled: never on every write.
        self._compact_at = max(COMPACT_BYTES, 2 * len(data))


def _generation(first_line: bytes) -> object:
    try:
        item = json.loads(first_line)
    except ValueError:
        return None
    return item.get("g") if isinstance(item, dict) else None


def _missing(first: int, end: int, done: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [first, end) not covered by the `done` ranges."""
    gaps = []
    cursor = first
    for a, b in sorted(done):
        if b <= cursor:
            continue
        if a >= end:
            break
        if a > cursor:
            gaps.append((cursor, a))
        cursor = max(cursor, b)
        if cursor >= end:
            break
    if cursor < end:
        gaps.append((cursor, end))
    return gaps
