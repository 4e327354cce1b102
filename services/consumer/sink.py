"""Batch files: JSON Lines (compressed as OUTPUT_COMPRESSION says), written to a temporary
name, fsynced, renamed, the directory fsynced. A file under its final name is always
complete.

File name: `<host>_<shard>-<slot>_<UTC time>_<seq>.jsonl` (or `.jsonl.gz`, `.jsonl.zst`;
host = pod name, so replicas sharing a volume never collide), in the directory
OUTPUT_PATH_TEMPLATE gives the batch under the output root (`layout`). Temporary files and
everything else the consumer keeps here start with "." (`.<name>.tmp` beside the file,
`.rejected/`, `.ledger/`).

The file sink owns the ledger, if there is one: `write` admits the batch (leaves out what
is already in files), has the group commit (`group.GroupCommit`) make its file durable
together with the other batches ready at the same time, and returns what the pool acks.
The blocking work runs on the executor the sink is given.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from pydantic_core import to_json

from services.consumer.batch import Batch
from services.consumer.encoding import SUFFIXES, Compression, encode
from services.consumer.files import fsync_directory, write_durably
from services.consumer.group import Abandoned, GroupCommit, SyncMode
from services.consumer.layout import FileNames, safe_host
from services.consumer.ledger import Ledger
from services.consumer.ledger_log import LEDGER_DIR

log = logging.getLogger(__name__)

REJECTED_DIR = ".rejected"

__all__ = ["Abandoned", "FileSink", "Sink", "safe_host"]


class Sink(Protocol):
    """Where batches go. `write` returns once the batch is durable (or raises OSError, or
    `Abandoned`): the batch whose deliveries may now be acked (with a ledger, it may write
    fewer entries than it was given, and still settle them all). It must commit through
    `batch.commit()` just before making the file visible, so a worker that timed out can
    abandon it."""

    def prepare(self) -> int:
        """Make the destination ready at start-up; returns leftovers cleaned up."""

    async def write(self, batch: Batch, worker: str) -> Batch: ...

    async def reject(self, body: bytes, reason: str, message_id: str | None) -> str: ...

    async def check(self) -> None:
        """Raise OSError unless a file can be created in the output directory now."""


class FileSink:
    def __init__(
        self,
        directory: Path,
        host: str,
        executor: Executor,
        ledger: Ledger | None = None,
        *,
        compression: Compression = "none",
        sync: SyncMode = "group",
        on_group: Callable[[int], None] = lambda batches: None,
    ) -> None:
        """`directory` is the output root; each batch's file goes in its batch's
        directory under it."""
        self.directory = directory
        self._ledger = ledger
        self._names = FileNames(host, SUFFIXES[compression])
        self._host = self._names.host
        self._executor = executor
        self._group = GroupCommit(
            directory,
            executor,
            ledger.log if ledger is not None else None,
            encode=functools.partial(encode, compression=compression),
            sync=sync,
            on_group=on_group,
        )
        # Its own thread, so a probe is not stuck behind writes hung on the same disk.
        self._check_executor = ThreadPoolExecutor(1, thread_name_prefix="adp-check")

    def prepare(self) -> int:
        """Create the directory; remove this host's temporary files left by a crash,
        wherever they are under it (their deliveries were never acked, the broker
        redelivers them). Returns how many."""
        self.directory.mkdir(parents=True, exist_ok=True)
        removed = 0
        for stale in _temporaries(self.directory, f".{self._host}_"):
            stale.unlink(missing_ok=True)
            removed += 1
        if self._ledger is not None:
            self._ledger.open()
        return removed

    async def write(self, batch: Batch, worker: str) -> Batch:
        ledger = self._ledger
        if ledger is None:
            await asyncio.shield(self._group.submit(batch, self._name(worker)))
            return batch
        return await ledger.write_once(batch, lambda b: self._group.submit(b, self._name(worker)))

    async def reject(self, body: bytes, reason: str, message_id: str | None) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._reject, body, reason, message_id)

    async def check(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self._check_executor, self._check), 5.0)

    def _name(self, worker: str) -> str:
        return self._names.name(worker)

    def _reject(self, body: bytes, reason: str, message_id: str | None) -> str:
        """Keep an unreadable message's body (nothing is thrown away), then it can be acked."""
        folder = self.directory / REJECTED_DIR
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            fsync_directory(self.directory)  # the folder's own entry is durable too
        name = f"{self._names.stem('rejected')}.json"
        document = {"reason": reason, "message_id": message_id, "body": body.decode("latin-1")}
        temporary = folder / f".{name}.tmp"
        write_durably(temporary, to_json(document))
        os.rename(temporary, folder / name)
        fsync_directory(folder)
        return name

    def _check(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)  # it may have been missing at start
        probe = self.directory / f".{self._host}_probe.tmp"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.close(fd)
        probe.unlink()


def _temporaries(root: Path, prefix: str) -> Iterator[Path]:
    """Files under `root` named `<prefix>*.tmp`, in every directory but the ledger's (it
    has its own)."""
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as items:
                for item in items:
                    if item.is_dir(follow_symlinks=False):
                        if not (folder == root and item.name == LEDGER_DIR):
                            pending.append(Path(item.path))
                    elif item.name.startswith(prefix) and item.name.endswith(".tmp"):
                        yield Path(item.path)
        except FileNotFoundError:  # removed meanwhile
            continue
