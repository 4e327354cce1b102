"""The ledger's log: which entries are already in batch files, on disk and in memory.

A log per consumer process in the output volume, `.ledger/<host>.log`, JSON Lines:

- `{"g": generation}` — the first line, new at each compaction (readers notice the rewrite);
- `{"t": time, "f": file, "p": [[part, first, end], ...]}` — appended and fsynced *before*
  the batch file is renamed into place (so a file under its final name is always recorded).
  A group commit appends the records of all its files in one write and one fdatasync.
  `file` is the path relative to the output root (`date=2019-10-12/<name>.jsonl.zst`
  under an OUTPUT_PATH_TEMPLATE), so the volume can be mounted anywhere;
- `{"d": file}` — appended after the rename and a successful directory sync (not synced
  itself): the record is confirmed. A record without it (the process died between the two,
  or the directory sync failed) counts only if the file exists, and only once a directory
  sync has succeeded since;
- `{"a": file}` — the recorded file was not renamed after all (its batch was abandoned, or
  its write failed): readers forget the record at once;
- `{"s": [part, ...]}` — parts whose message is settled (acked, and the ack known to have
  reached the broker): they cannot come back, so every reader forgets them.

Lines are added by whole-line appends; one cut short (a full volume) is truncated away, so
the next stays valid. Readers skip a torn last line and lines of a shape they do not know.

All of it is reached from threads (the sink's writers, the ledger's lookups), under one
lock that is held for memory updates and appends, never across an fsync. What is kept:
unsettled parts and parts with an Idempotency-Key for the retention, at most `max_parts`
(oldest forgotten first, counted through `on_forget`). The own log is compacted to that
when it has doubled.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic_core import to_json

from services.common.schema import Entry
from services.consumer.batch import Batch, Span
from services.consumer.files import fsync_directory, write_all, write_durably

log = logging.getLogger(__name__)

LEDGER_DIR = ".ledger"
COMPACT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Retention:
    """What a log keeps: parts for `seconds` (LEDGER_RETENTION_SECONDS), at most
    `max_parts` (LEDGER_MAX_PARTS: beyond, the oldest are forgotten, counted through
    `on_forget(count)`)."""

    seconds: float = 3600.0
    max_parts: int = 250_000
    on_forget: Callable[[int], None] = lambda count: None


DEFAULT_RETENTION = Retention()


class LedgerLog:
    def __init__(
        self,
        directory: Path,
        host: str,
        retention: Retention = DEFAULT_RETENTION,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.folder = directory / LEDGER_DIR
        self._path = self.folder / f"{host}.log"
        self._retention = retention.seconds
        self._max_parts = retention.max_parts
        self._clock = clock
        self._on_forget = retention.on_forget  # parts forgotten for room
        self._lock = threading.Lock()
        self._opened = False
        self._size = 0
        self._compact_at = COMPACT_BYTES
        self._torn = False  # a failed append left a partial line it could not remove
        # part id -> {(first, end, file)} written (a dict as an ordered set: one huge part
        # may have thousands); insertion order is age order.
        self._written: dict[str, dict[tuple[int, int, str], None]] = {}
        self._born: dict[str, float] = {}
        # Recorded files not known to be in place (with their spans, to undo an abort).
        self._unconfirmed: dict[str, list[Span]] = {}
        self._own: dict[str, tuple[float, list[Span]]] = {}  # this log's records, by file
        self._recording: dict[str, tuple[float, list[Span]]] = {}  # recorded, not renamed
        self._others: dict[str, tuple[object, int]] = {}  # other log -> (generation, read)

    def open(self) -> None:
        """Load every log in the directory (this host's included: what it recorded before a
        restart), then rewrite this host's, compacted."""
        with self._lock:
            self._open()

    # --- a group commit's steps (writer threads) ------------------------------------------

    def record(self, files: list[tuple[str, list[Span]]], *, sync: bool = True) -> None:
        """Before the renames: make the records of these files durable (one append, one
        fdatasync; without `sync`, the caller syncs the file system itself)."""
        now = self._clock()
        lines = b"".join(
            to_json({"t": now, "f": name, "p": spans}) + b"\n" for name, spans in files
        )
        with self._lock:
            if not self._opened:  # the volume was unusable at start-up
                self._open()
            for name, spans in files:
                self._recording[name] = (now, spans)
            try:
                finish = self._write_records(lines)
            except BaseException:
                for name, _ in files:
                    self._recording.pop(name, None)
                raise
        finish(sync)  # outside the lock: the lookups go on meanwhile

    def settled(
        self,
        confirmed: list[tuple[str, list[Span]]],
        unsynced: list[tuple[str, list[Span]]],
        aborted: list[str],
    ) -> None:
        """After the renames and the directory sync (or its failure): `confirmed` files are
        in place and durable; `unsynced` are in place but their directory sync failed (a
        lookup trusts them only after a sync of its own succeeds); `aborted` were recorded
        but not renamed. One append, not synced. Never raises: the records stand."""
        with self._lock:
            now = self._clock()
            for name, spans in (*confirmed, *unsynced):
                self._recording.pop(name, None)
                self._own[name] = (now, spans)
                self._add(name, spans, now)
            for name, spans in unsynced:
                self._unconfirmed[name] = spans
            for name in aborted:
                self._recording.pop(name, None)
            self._trim_to_limits(now)
            lines = [to_json({"d": name}) + b"\n" for name, _ in confirmed]
            lines += [to_json({"a": name}) + b"\n" for name in aborted]
            if not lines:
                return
            try:
                self._write_notes(b"".join(lines))
                if self._size > self._compact_at:
                    self._compact()
            except OSError as exc:
                log.warning("ledger: could not append or compact (%s); the records stand", exc)

    # --- lookups and settling (the ledger's threads) ----------------------------------------

    def lookup(self, batch: Batch) -> tuple[list[Entry], list[Span]]:
        """The batch's entries not yet in a file, and their spans, looked up for the
        deliveries that may have been written (the others' cannot have been: a reused
        `message_id` of someone else's must not make them vanish). Reads what other
        processes appended first. Raises OSError if the logs cannot be read."""
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
                if delivery.needs_lookup:
                    done += [
                        (a, b)
                        for a, b, f in self._written.get(part.id, ())
                        if f not in self._unconfirmed
                    ]
                for a, b in _missing(first, end, done):
                    entries.extend(batch.entries[offset + a - first : offset + b - first])
                    spans.append((part.id, a, b))
                    mine.append((a, b))
        return entries, spans

    def settle(self, ids: list[str]) -> None:
        """These parts' messages are settled: forget them, here and in readers."""
        with self._lock:
            self._forget(ids)
            try:
                self._write_notes(to_json({"s": ids}) + b"\n", now=True)
            except OSError as exc:
                log.warning("ledger: could not note settled parts (%s)", exc)

    def keep_alive(self) -> None:
        """Touch this process's log if it is getting old: other readers remove a log left
        untouched for the retention (a gone replica's), and a live one idle that long must
        not be taken for gone — or a record it appends as they remove it would be lost."""
        try:
            if self._path.stat().st_mtime < self._clock() - self._retention / 4:
                os.utime(self._path)
        except OSError as exc:
            log.debug("ledger: could not touch the log (%s)", exc)

    # --- inspection ---------------------------------------------------------------------------

    @property
    def parts(self) -> int:
        return len(self._written)

    # --- internals (under the lock) -----------------------------------------------------------

    def _open(self) -> None:
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.directory)  # the new folder's own entry is durable too
        self._read_others()
        self._confirm()
        self._compact()

    def _add(self, name: str, spans: Iterable[Span], born: float) -> None:
        for part, first, end in spans:
            # Set semantics: a log read again after a compaction adds nothing twice.
            self._written.setdefault(part, {})[(first, end, name)] = None
            self._born.setdefault(part, born)

    def _forget(self, ids: Iterable[str]) -> None:
        # Each file's own spans are filtered once for all the parts forgotten together: a
        # file may hold many ranges of one part (a template interleaves a message's entries
        # over directories), and filtering it once per range was quadratic.
        gone: set[str] = set()
        files: dict[str, None] = {}
        for part in ids:
            gone.add(part)
            self._born.pop(part, None)
            for _, _, name in self._written.pop(part, ()):
                files[name] = None
        for name in files:
            own = self._own.get(name)
            if own is None:
                continue
            spans = [span for span in own[1] if span[0] not in gone]
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
            self._on_forget(excess)

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
            self._unconfirmed[name] = spans
            if own:
                self._own[name] = (born, spans)
        elif "d" in item:
            self._unconfirmed.pop(str(item["d"]), None)
        elif "a" in item:
            self._drop(str(item["a"]))
        elif "s" in item:
            self._forget(str(part) for part in item["s"])

    def _confirm(self) -> None:
        """Records without their confirmation whose file is in place count once its
        directory is synced (the rename may not have been, when their writer died), and
        the directories above it up to the output root (it may have made them)."""
        present = self._present(list(self._unconfirmed))
        for name in present:
            del self._unconfirmed[name]

    # --- storage (a subclass may keep the log elsewhere: `object_ledger`) ----------------

    def _present(self, names: list[str]) -> list[str]:
        """Those of the recorded files that are in place, made durable."""
        present = [name for name in names if (self.directory / name).exists()]
        if present:
            folders = {folder for name in present for folder in _folders(name)}
            for folder in sorted(folders, key=lambda f: (-f.count("/"), f)):
                fsync_directory(self.directory / folder if folder else self.directory)
        return present

    def _write_records(self, lines: bytes) -> Callable[[bool], None]:
        """Under the lock: append records; returns what makes them durable (called with
        `sync`, outside the lock)."""
        fd = self._append(lines)

        def finish(sync: bool) -> None:
            try:
                if sync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)

        return finish

    def _write_notes(self, lines: bytes, *, now: bool = False) -> None:
        """Under the lock: append lines that need not be durable (confirmations, aborts,
        settled parts); `now`: not to be held back by a store that batches them."""
        os.close(self._append(lines))

    def _drop(self, name: str) -> None:
        """A record another process wrote, then aborted: its file will not appear."""
        for part, first, end in self._unconfirmed.pop(name, ()):
            ranges = self._written.get(part)
            if ranges is not None:
                ranges.pop((first, end, name), None)

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
            if not kept or (unconfirmed and not self._present_now(name)):
                del self._own[name]  # forgotten, or its file never appeared
                continue
            live.append(to_json({"t": born, "f": name, "p": kept}) + b"\n")
            if not unconfirmed:  # one in place but not yet synced stays unconfirmed
                live.append(to_json({"d": name}) + b"\n")
        for name, (born, spans) in self._recording.items():  # being renamed by a writer now
            live.append(to_json({"t": born, "f": name, "p": spans}) + b"\n")
        data = b"".join(live)
        self._replace(data)
        self._opened = True
        self._size = len(data)
        # Compact again once the log has doubled: never on every write.
        self._compact_at = max(COMPACT_BYTES, 2 * len(data))

    def _present_now(self, name: str) -> bool:
        return (self.directory / name).exists()

    def _replace(self, data: bytes) -> None:
        """This host's log is now `data`, atomically."""
        temporary = self.folder / f".{self._path.name}.tmp"
        temporary.unlink(missing_ok=True)  # left by a compaction that died
        write_durably(temporary, data)
        os.rename(temporary, self._path)
        fsync_directory(self.folder)


def _folders(name: str) -> list[str]:
    """The directories of a file named relative to the output root, from its own up to
    the root (""): "a/b/f" -> ["a/b", "a", ""]."""
    folders = []
    while name:
        name = name.rpartition("/")[0]
        folders.append(name)
    return folders


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
