"""Batch objects: the sink of OUTPUT_URL=s3://bucket/prefix. Each batch is one object,
written by one PUT (complete or absent: no temporary names, nothing to clean up), with the
same key as the file sink's path under the output root (`layout`: OUTPUT_PATH_TEMPLATE's
directory and `<host>_<shard>-<slot>_<UTC time>_<seq><suffix>`) and the same bytes
(`encoding`: OUTPUT_COMPRESSION), under the prefix. Rejected messages go to `.rejected/`,
the ledger's log to `.ledger/<host>/` (`object_ledger`).

Group commit (as `group` does for files): the batches that came while the previous groups
were in flight form the next group (at most `MAX_GROUPS` at once); a group encodes its
batches on the executor, PUTs the records of all of them in one ledger object, then PUTs
every batch object at once (many PUTs in flight), then hands the ledger the confirmations
(written with the next group's records). A batch's future resolves only after its own
PUT succeeded: then its deliveries may be acked. A failed PUT fails that batch alone
(`object_store.StoreError`, an OSError: the pool retries it with capped backoff).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from pydantic_core import to_json

from services.common.schema import Entry
from services.consumer.batch import Batch, Span
from services.consumer.encoding import SUFFIXES, Compression, encode
from services.consumer.group import MAX_GROUPS, Abandoned, Groups, Outcome
from services.consumer.layout import FileNames
from services.consumer.ledger import Ledger
from services.consumer.object_store import ObjectStore
from services.consumer.sink import REJECTED_DIR

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 5.0


@dataclass(eq=False)
class _Job:
    batch: Batch
    key: str
    spans: list[Span]
    done: asyncio.Future[None]


class ObjectSink:
    def __init__(
        self,
        store: ObjectStore,
        host: str,
        executor: Executor,
        ledger: Ledger | None = None,
        *,
        compression: Compression = "none",
        max_groups: int = MAX_GROUPS,
        on_group: Callable[[int], None] = lambda batches: None,
    ) -> None:
        self.store = store
        self._ledger = ledger
        self._names = FileNames(host, SUFFIXES[compression])
        self._executor = executor
        self._encode: Callable[[list[Entry]], bytes] = functools.partial(
            encode, compression=compression
        )
        self._groups: Groups[_Job] = Groups(self._commit, max_groups, on_group=on_group)

    def prepare(self) -> int:
        """Check the bucket (`BucketMissing` if it is not there; StoreError if the store
        cannot be reached now: not ready, retried), load the ledger. Nothing to clean up:
        an object is complete or absent."""
        self.store.check_bucket()
        if self._ledger is not None:
            self._ledger.open()
        return 0

    async def write(self, batch: Batch, worker: str) -> Batch:
        ledger = self._ledger
        if ledger is None:
            await asyncio.shield(self._submit(batch, worker))
            return batch
        return await ledger.write_once(batch, lambda b: self._submit(b, worker))

    async def reject(self, body: bytes, reason: str, message_id: str | None) -> str:
        name = f"{self._names.stem('rejected')}.json"
        document = {"reason": reason, "message_id": message_id, "body": body.decode("latin-1")}
        await self.store.put_async(f"{REJECTED_DIR}/{name}", to_json(document))
        return name

    async def check(self) -> None:
        """Raise OSError unless an object can be written (and removed) now."""
        probe = f".probe/{self._names.host}"
        await asyncio.wait_for(self.store.put_async(probe, b""), CHECK_TIMEOUT)
        await asyncio.wait_for(self.store.delete_async(probe), CHECK_TIMEOUT)

    # --- group commit ----------------------------------------------------------------------

    def _submit(self, batch: Batch, worker: str) -> asyncio.Future[None]:
        name = self._names.name(worker)
        key = f"{batch.directory}/{name}" if batch.directory else name
        job = _Job(batch, key, batch.spans, asyncio.get_running_loop().create_future())
        self._groups.add(job)
        return job.done

    async def _commit(self, jobs: list[_Job]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        bodies = await asyncio.gather(
            *(loop.run_in_executor(self._executor, self._encode, job.batch.entries) for job in jobs)
        )
        ledger = self._ledger.log if self._ledger is not None else None
        live = [job for job in jobs if not job.batch.abandoned]
        if ledger is not None and live:
            records = [(job.key, job.spans) for job in live]
            try:  # one PUT for the records of the whole group, before any batch object
                await loop.run_in_executor(self._executor, ledger.record, records)
            except OSError as exc:
                return [exc] * len(jobs)
        recorded = set(live) if ledger is not None else set(jobs)

        async def put(job: _Job, body: bytes) -> Outcome:
            if job not in recorded or not job.batch.commit():
                return Abandoned(job.key)
            try:
                await self.store.put_async(job.key, body)
            except OSError as exc:
                return exc
            return None

        outcomes = list(
            await asyncio.gather(*(put(j, b) for j, b in zip(jobs, bodies, strict=True)))
        )
        if ledger is not None:
            confirmed = [(j.key, j.spans) for j, o in zip(jobs, outcomes, strict=True) if o is None]
            # Only batches abandoned before their PUT are surely absent; a failed PUT may
            # have happened (a timeout): its record stays unconfirmed, a lookup checks it.
            aborted = [
                j.key for j, o in zip(jobs, outcomes, strict=True)
                if j in recorded and isinstance(o, Abandoned)
            ]  # fmt: skip
            unsure = [
                (j.key, j.spans) for j, o in zip(jobs, outcomes, strict=True)
                if o is not None and not isinstance(o, Abandoned)
            ]  # fmt: skip
            await loop.run_in_executor(self._executor, ledger.settled, confirmed, unsure, aborted)
        return outcomes
