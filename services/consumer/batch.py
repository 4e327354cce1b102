"""Deliveries, batches and the batcher that fills a shard's shared batches.

A delivery (one AMQP message) holds one or more entries; a batch holds at most BATCH_SIZE
entries, from one or more deliveries, so a delivery's entries may span batches. Each
delivery counts its entries not yet durably written; when the count reaches zero it is
complete and can be acked (`acker.Acker`).

The batcher keeps one open batch per output directory (`layout`: one in all for the flat
layout), and seals each when it is full (BATCH_SIZE entries, or BATCH_MAX_BYTES of JSON
Lines), or `max_wait` seconds after its first entry (on its own timer, not only when the
next entry comes), and hands sealed batches to the pool's queue.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from aio_pika.abc import AbstractIncomingMessage
from aiormq.abc import AbstractChannel as RawChannel

from services.common.schema import Entry
from services.common.wire import PARTS_HEADER, Part, parse_parts


@dataclass(eq=False, slots=True)
class Delivery:
    """One AMQP message and how many of its entries are not yet in a written file.

    `parts` name its entries for the ledger; `check` says whether they may already be
    written (a redelivery, or a client's retry with an Idempotency-Key), so the ledger must
    be consulted before writing them."""

    message: AbstractIncomingMessage
    pending: int
    complete: bool = False
    parts: tuple[Part, ...] = ()
    needs_lookup: bool = False  # redelivered, keyed or retried: ask the ledger first
    # The channel it came on, taken at arrival: aio-pika's `message.channel` raises once
    # the channel is closed, which is exactly when it matters here.
    channel: RawChannel | None = None
    # Where each part starts, in order (parts are contiguous): a batch finds the parts its
    # slice of the delivery overlaps by bisection, not by walking them all (a message the
    # API grouped can hold thousands of parts, spread over hundreds of batches).
    starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.starts:
            self.starts = [part.start for part in self.parts]

    def overlapping(self, start: int, end: int) -> Iterator[Part]:
        """The parts holding entries in [start, end), in order."""
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        parts = self.parts
        while i < len(parts) and parts[i].start < end:
            yield parts[i]
            i += 1

    @classmethod
    def of(cls, message: AbstractIncomingMessage, count: int) -> Delivery:
        """A delivery of `count` valid entries, named for the ledger. Raises
        `InvalidParts` for a malformed parts header (a poison message)."""
        header = message.headers.get(PARTS_HEADER)
        parts = parse_parts(header, message.message_id, count, message.body)
        needs_lookup = bool(message.redelivered) or any(part.keyed for part in parts)
        return cls(
            message, count, parts=tuple(parts), needs_lookup=needs_lookup, channel=message.channel
        )

    @property
    def stale(self) -> bool:
        """Its channel is gone: it can no longer be acked, and the broker redelivers it, so
        writing its entries now would only write them twice."""
        return self.channel is not None and bool(self.channel.is_closed)

    def mark_written(self, count: int) -> bool:
        """`count` more entries are durable; True when this completes the delivery."""
        self.pending -= count
        if self.pending == 0 and not self.complete:
            self.complete = True
            return True
        return False


Span = tuple[str, int, int]
"""What a file holds of one part, for the ledger: (part id, first, end), indices in the
part's own numbering."""


class Source(NamedTuple):
    """A delivery's share of a batch."""

    delivery: Delivery
    settles: int  # how many of its entries this batch settles
    start: int  # index of the first of them in the delivery


class _Fate:
    """Whether a batch's write may still make its file. A worker that times out abandons
    the batch while its write may still run in a thread: the write commits (renames) only
    if the batch was not abandoned, and the abandon succeeds only if it did not commit.
    The lock makes the two exclusive. Shared by the views of one attempt (`only`,
    `without_stale`), so the worker's abandon reaches the write the sink makes of it."""

    __slots__ = ("lock", "state")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = "open"  # open -> committed | abandoned

    def settle(self, state: str, unless: str) -> bool:
        """Move to `state` (again, if it is there already); False if it is at `unless`."""
        with self.lock:
            if self.state == unless:
                return False
            self.state = state
            return True


@dataclass(eq=False, slots=True)
class Batch:
    """Entries bound for one file, and the deliveries they came from (with how many)."""

    shard: int
    entries: list[Entry] = field(default_factory=list)
    # Normally `entries` is the concatenation of the sources' slices; a batch the ledger
    # trimmed (`only`) writes fewer entries but still settles them all.
    sources: list[Source] = field(default_factory=list)
    attempts: int = 0
    spans: list[Span] = field(default_factory=list)  # what the file holds, in file order
    _fate: _Fate = field(default_factory=_Fate)
    # The directory its file goes in, relative to the output root ("" for the flat layout):
    # every entry of the batch belongs there (`layout.PathTemplate`).
    directory: str = ""

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, delivery: Delivery, entries: list[Entry], start: int = 0) -> None:
        self.entries.extend(entries)
        self.sources.append(Source(delivery, len(entries), start))

    def commit(self) -> bool:
        """Called by the writer just before the rename: False if it was abandoned."""
        return self._fate.settle("committed", unless="abandoned")

    def abandon(self) -> bool:
        """Called when its worker timed out: False if the write already committed."""
        return self._fate.settle("abandoned", unless="committed")

    @property
    def abandoned(self) -> bool:
        return self._fate.state == "abandoned"

    def without_stale(self) -> Batch:
        """This batch without the entries of stale deliveries (itself if there are none).
        A delivery's entries are contiguous in a batch, in the order of `sources`."""
        if not any(delivery.stale for delivery, _, _ in self.sources):
            return self
        entries: list[Entry] = []
        sources: list[Source] = []
        offset = 0
        for source in self.sources:
            if not source.delivery.stale:
                entries.extend(self.entries[offset : offset + source.settles])
                sources.append(source)
            offset += source.settles
        return Batch(
            self.shard,
            entries,
            sources,
            self.attempts,
            _fate=self._fate,
            directory=self.directory,
        )

    def ranges(self) -> Iterator[tuple[Delivery, Part, int, int, int]]:
        """For each part of each source: its delivery, the part, (first, end) in the part's
        own numbering, and where that range starts in `entries`. Only for an untrimmed
        batch."""
        offset = 0
        for delivery, count, start in self.sources:
            end = start + count
            for part in delivery.overlapping(start, end):
                first, last = max(start, part.start), min(end, part.end)
                if first < last:
                    yield (
                        delivery,
                        part,
                        first - part.start,
                        last - part.start,
                        offset + first - start,
                    )
            offset += count

    def only(self, entries: list[Entry], spans: list[Span]) -> Batch:
        """This batch writing only `entries` (the ledger found the rest already written),
        still settling every source."""
        return Batch(
            self.shard,
            entries,
            self.sources,
            self.attempts,
            spans,
            self._fate,
            directory=self.directory,
        )

    def retry(self) -> Batch:
        """The same entries as a fresh batch for the next attempt. A fresh object, because
        the abandoned write may still be running in its thread and must keep seeing
        "abandoned". An attempt may have put the file in place before it failed (the
        directory sync, say), so its deliveries are looked up in the ledger from now on."""
        for source in self.sources:
            source.delivery.needs_lookup = True
        return Batch(
            self.shard,
            self.entries,
            self.sources,
            self.attempts + 1,
            directory=self.directory,
        )


Seal = Callable[[Batch], None]
Route = Callable[[list[Entry]], list[str]]

# Open batches per shard at most (one per directory that has entries waiting). Past it, the
# oldest is sealed to make room: late or scattered timestamps make smaller files, never
# unbounded memory or timers. The flat layout has one.
MAX_OPEN_BATCHES = 64


@dataclass(eq=False, slots=True)
class _Open:
    batch: Batch
    timer: asyncio.TimerHandle
    size: int = 0  # bytes of its entries' JSON Lines, uncompressed (if bounded)


class Batcher:
    """Fills one shard's shared batches: one open batch per directory its entries belong
    to (one in all for the flat layout), each sealed when it holds `batch_size` entries,
    when the next entry would take its JSON Lines past `max_bytes` (0: no bound; an entry
    larger on its own makes a batch alone), or `max_wait` seconds after its first entry,
    on its own timer. `seal` receives each sealed batch; the pool's workers share them.

    `route(entries)` gives each entry's directory (`layout.Router.directories`; None: the
    flat layout). `size(entry)` is an entry's line length (`encoding.line_size`)."""

    def __init__(
        self,
        shard: int,
        batch_size: int,
        max_wait: float,
        seal: Seal,
        *,
        max_bytes: int = 0,
        route: Route | None = None,
        size: Callable[[Entry], int] | None = None,
        max_open: int = MAX_OPEN_BATCHES,
    ) -> None:
        if max_bytes and size is None:
            raise ValueError("a byte bound needs the entries' sizes")
        self._shard = shard
        self._size = batch_size
        self._max_wait = max_wait
        self._seal = seal
        self._max_bytes = max_bytes
        self._route = route
        self._entry_size = size
        self._max_open = max_open
        self._open: dict[str, _Open] = {}  # insertion order: oldest first
        self.peak_open = 0  # most batches open at once so far

    @property
    def buffered(self) -> int:
        return sum(len(item.batch) for item in self._open.values())

    @property
    def open_batches(self) -> int:
        return len(self._open)

    def directories(self, entries: list[Entry]) -> list[str] | None:
        """Each entry's directory (None: all in the flat layout's one). Raises
        `InvalidEntries` for a timestamp that names no instant: the delivery is poison."""
        return None if self._route is None else self._route(entries)

    def add(
        self, delivery: Delivery, entries: list[Entry], directories: list[str] | None = None
    ) -> None:
        """Add a delivery's entries (`directories`: from `directories(entries)`), sealing
        as many batches as they fill. A delivery's entries bound for one directory in a
        row go to a batch as one source."""
        sizes = [self._entry_size(e) for e in entries] if self._entry_size else None
        start, count = 0, len(entries)
        while start < count:
            directory = "" if directories is None else directories[start]
            item = self._open.get(directory) or self._start(directory)
            batch = item.batch
            end = min(count, start + self._size - len(batch))
            if directories is not None:
                end = _run_end(directories, start, end)
            over = False
            if sizes is not None:
                end, item.size, over = _fit(sizes, start, end, item.size, self._max_bytes)
            if end > start:
                batch.add(delivery, entries[start:end], start)
                start = end
            if over or len(batch) >= self._size:
                self._flush(directory)

    def flush(self) -> None:
        """Seal every open batch now."""
        for directory in list(self._open):
            self._flush(directory)

    def _start(self, directory: str) -> _Open:
        while len(self._open) >= self._max_open:
            self._flush(next(iter(self._open)))  # the oldest
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._max_wait, self._flush, directory)
        item = _Open(Batch(self._shard, directory=directory), timer)
        self._open[directory] = item
        self.peak_open = max(self.peak_open, len(self._open))
        return item

    def _flush(self, directory: str) -> None:
        item = self._open.pop(directory, None)
        if item is None:
            return
        item.timer.cancel()
        if item.batch.entries:
            self._seal(item.batch)


def _run_end(directories: list[str], start: int, end: int) -> int:
    """The end of the run of entries from `start` (before `end`) bound for one directory."""
    directory = directories[start]
    stop = start + 1
    while stop < end and directories[stop] == directory:
        stop += 1
    return stop


def _fit(sizes: list[int], start: int, end: int, used: int, limit: int) -> tuple[int, int, bool]:
    """How many of the entries [start, end) fit a batch holding `used` bytes under
    `limit`: (their end, the bytes then, whether the batch is to be sealed — the next entry
    would pass the bound, or it is at the bound). The first entry of an empty batch always
    fits, however large."""
    stop = start
    while stop < end:
        size = sizes[stop]
        if used and used + size > limit:
            return stop, used, True
        used += size
        stop += 1
    return stop, used, used >= limit
