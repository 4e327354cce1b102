"""The ledger: no entry is written twice. It is the file sink's (`sink.FileSink`); the pool
never sees it.

Entries are known by part (`services.common.wire`): a part id and an index in the part.
What is already in files is in the log it is given (`ledger_log.LedgerLog`, on disk in
the output volume, shared by the replicas writing there; `object_ledger.ObjectLedgerLog`,
in the bucket). This module keeps what lives on the event
loop: the claims of the writes in progress, and the settling of acked messages.

Writing a batch (`admit` → group commit → `release`): its ranges are claimed first, so
another copy of the same entries in this process waits for this write's outcome instead of
racing it. Entries of a delivery that may already be written (a redelivery, a part with an
Idempotency-Key, a batch retried after a failed attempt) are looked up — in this process's
records and in every other process's log in the same directory — and those already in a
file are left out. Deliveries are still settled for every entry. Lookups and settling run
on the ledger's own threads: the event loop never waits for the log's lock, and closing
the loop does not wait for a thread hung on the volume.

Only deliveries that may have been written are looked up: one flagged `redelivered` by the
broker, one with an Idempotency-Key, a batch's retry. The flag is the broker's hint; a
redelivery it does not flag is not looked up (README, Limits).

Limits (README, Guarantees): another replica's write of the same entries that is still in
progress (recorded, not yet renamed) is not waited for; a retry arriving after the
retention, or after its part was forgotten for room, is written again; a broker that
forgets acks it had applied (a crash, a quorum leader change) redelivers settled messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiormq.abc import AbstractChannel as RawChannel

from services.common.broker import CONNECTIVITY_ERRORS
from services.consumer.batch import Batch, Delivery, Span
from services.consumer.ledger_log import LedgerLog

log = logging.getLogger(__name__)

LOOKUP_THREADS = 4
# How often acked deliveries are confirmed applied (a barrier) and forgotten.
SETTLE_SECONDS = 2.0


class Ledger:
    def __init__(
        self,
        log: LedgerLog,
        *,
        on_skip: Callable[[int, int], None] = lambda shard, count: None,
    ) -> None:
        """`log`: what is written (the file log in the output directory, or
        `object_ledger.ObjectLedgerLog` in the bucket). `on_skip(shard, count)`: entries
        left out as already written (duplicates avoided)."""
        self.log = log
        self._on_skip = on_skip
        self._io = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="adp-ledger")
        # part id -> ranges being written now, with the write's outcome.
        self._writing: dict[str, list[tuple[int, int, asyncio.Future[None]]]] = {}
        self._claims: dict[Batch, tuple[asyncio.Future[None], list[str]]] = {}
        # Acked deliveries' parts waiting for a barrier on their channel.
        self._acked: dict[RawChannel, list[str]] = {}
        self.skipped = 0  # entries found already written (duplicates avoided)

    def open(self) -> None:
        self.log.open()

    @property
    def parts(self) -> int:
        return self.log.parts

    # --- claims ----------------------------------------------------------------------------

    async def admit(self, batch: Batch) -> Batch:
        """The batch to write: without entries already in a file, with the spans the file
        will hold. Its ranges stay claimed until `release` (also if this raises OSError:
        then it releases them itself)."""
        check = any(source.delivery.needs_lookup for source in batch.sources)
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
                entries, spans = await loop.run_in_executor(self._io, self.log.lookup, batch)
                skipped = len(batch.entries) - len(entries)
                if skipped:
                    self.skipped += skipped
                    self._on_skip(batch.shard, skipped)
                    log.info("shard %d: %d entries already written, left out", batch.shard, skipped)
                admitted = batch.only(entries, spans)
            else:
                admitted = batch.only(batch.entries, _spans(batch))
        except BaseException:
            self._unclaim(future, claimed)
            raise
        self._claims[admitted] = (future, claimed)
        return admitted

    async def write_once(
        self, batch: Batch, submit: Callable[[Batch], asyncio.Future[None]]
    ) -> Batch:
        """Write `batch` through a sink's `submit` (a future done when the batch is durable)
        without what is already written, and return what to settle. Its claims are held for
        the write's whole life: if the worker stops waiting and the batch could not be
        abandoned (the write is committing), they stay until the write is over, so no copy
        is admitted before its record is known."""
        admitted = await self.admit(batch)
        if not admitted.entries:  # all already written: settle, write nothing
            self.release(admitted)
            return admitted
        done = submit(admitted)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            if admitted.abandon():
                self.release(admitted)
            else:
                done.add_done_callback(lambda _: self.release(admitted))
            raise
        finally:
            if done.done():
                self.release(admitted)
        return admitted

    def release(self, batch: Batch) -> None:
        """The write of an admitted batch ended (written or not)."""
        claim = self._claims.pop(batch, None)
        if claim is not None:
            self._unclaim(*claim)

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
        channel that fails the barrier settles nothing: its messages may come back. Also
        keeps this process's log from looking abandoned to other replicas."""
        pending, self._acked = self._acked, {}
        settled: list[str] = []
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self.log.keep_alive)
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
            await loop.run_in_executor(self._io, self.log.settle, settled)
        return len(settled)

    async def settle_every(
        self, barrier: Callable[[RawChannel], object], seconds: float = SETTLE_SECONDS
    ) -> None:
        """`settle` every `seconds`, until cancelled."""
        while True:
            await asyncio.sleep(seconds)
            await self.settle(barrier)

    async def settle_last(self, barrier: Callable[[RawChannel], object], timeout: float) -> None:
        """At shutdown, after the drain: the last acks' barrier, so the log left behind
        holds only what may come back. Bounded by `timeout` (a stalled broker must not hold
        the process); a barrier that fails or times out leaves its parts recorded."""
        with contextlib.suppress(TimeoutError, *CONNECTIVITY_ERRORS):
            async with asyncio.timeout(timeout):
                await self.settle(barrier)

    # --- internals ----------------------------------------------------------------------------

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


def _spans(batch: Batch) -> list[Span]:
    return [(p.id, a, b) for _, p, a, b, _ in batch.ranges() if p.id is not None]
