"""The ledger's log kept in the bucket, for the object-store sink: exactly-once without a
local volume. The same lines as the file log (`ledger_log`), in objects instead of one
appended file, since an object cannot be appended to:

- `.ledger/<host>/<generation>-<seq>.jsonl` under OUTPUT_URL's prefix, each written by one
  PUT (complete or absent), in key order: a generation (20 digits, nanoseconds) starts at
  each compaction with an object holding everything still live, then one object per
  group commit: the group's records (`f` lines) — PUT *before* any of the group's batch
  objects — together with the confirmations and aborts of the groups before (`d`, `a`:
  they need not be durable, so they wait for the next write) ; settled parts (`s`) are
  PUT when they come (the settle task's pace, about a second);
- a record without its confirmation counts only once its object is there (a HEAD: S3 is
  strongly consistent read-after-write), so a crash between the records' PUT and the
  objects' PUTs loses nothing and writes nothing twice; a PUT that failed may still have
  happened (a timeout), so its record is neither aborted nor confirmed: a retry's lookup
  finds the object, or not;
- every replica lists `.ledger/` and reads the objects it has not read yet (other hosts'
  logs, as replicas sharing a volume read each other's files); a host's objects older than
  the retention are deleted by the others; a compaction deletes its host's older objects.

Each object counts `OBJECT_WEIGHT` bytes more toward the compaction threshold, so a host
keeps at most a few hundred objects. All of it runs on threads (blocking client calls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from services.consumer.ledger_log import DEFAULT_RETENTION, LEDGER_DIR, LedgerLog, Retention
from services.consumer.object_store import ObjectStore

log = logging.getLogger(__name__)

OBJECT_WEIGHT = 32 * 1024  # 8 MiB of compaction threshold = 256 objects


class ObjectLedgerLog(LedgerLog):
    def __init__(
        self,
        store: ObjectStore,
        host: str,
        retention: Retention = DEFAULT_RETENTION,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(Path("."), host, retention, clock=clock)
        self._store = store
        self._own_prefix = f"{LEDGER_DIR}/{host}/"
        self._generation = ""
        self._seq = 0
        self._own_keys: list[str] = []
        self._pending: list[bytes] = []  # notes waiting for the next PUT
        self._read: set[str] = set()  # other hosts' objects already applied
        self._last_put = clock()

    # --- storage -----------------------------------------------------------------------------

    def _open(self) -> None:
        self._read_others()
        self._confirm()
        self._compact()

    def _read_others(self) -> None:
        horizon = self._clock() - self._retention
        by_host: dict[str, list[tuple[str, float]]] = {}
        for key, modified in self._store.keys(LEDGER_DIR + "/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2].endswith(".jsonl"):
                by_host.setdefault(parts[1], []).append((key, modified))
        listed: set[str] = set()
        for host, objects in by_host.items():
            objects.sort()
            own = f"{LEDGER_DIR}/{host}/" == self._own_prefix
            if own and self._opened:
                continue  # our own, after start-up: the index already holds it
            if not own and max(modified for _, modified in objects) < horizon:
                # A gone replica's log, untouched for the retention: it can go.
                self._store.delete([key for key, _ in objects])
                continue
            for key, _ in objects:
                listed.add(key)
                if key in self._read:
                    continue
                data = self._store.get(key)
                if data is not None:  # (None: deleted by its compaction meanwhile)
                    self._apply(data, own=own)
                self._read.add(key)
                if own:
                    self._own_keys.append(key)
        self._read &= listed  # forget the names of objects that are gone

    def _present(self, names: list[str]) -> list[str]:
        return [name for name in names if self._store.exists(name)]

    def _present_now(self, name: str) -> bool:
        return self._store.exists(name)

    def _write_records(self, lines: bytes) -> Callable[[bool], None]:
        self._put(b"".join([*self._pending, lines]))
        self._pending = []
        return _durable  # the PUT succeeded: durable already

    def _write_notes(self, lines: bytes, *, now: bool = False) -> None:
        self._pending.append(lines)
        self._size += len(lines)
        if now:
            data = b"".join(self._pending)
            self._put(data)
            self._pending = []

    def _replace(self, data: bytes) -> None:
        """A new generation holding `data`; this host's older objects deleted."""
        old = list(self._own_keys)
        self._generation = f"{time.time_ns():020d}"
        self._seq = 0
        self._own_keys = []
        self._pending = []  # `data` holds every live line
        self._put(data)
        try:
            self._store.delete(old)
        except OSError as exc:  # they are read again harmlessly (set semantics)
            log.warning("ledger: could not delete older log objects (%s)", exc)

    def keep_alive(self) -> None:
        """As for files: other replicas delete a host's objects once its newest is older
        than the retention, so an idle live one PUTs its waiting notes (maybe none) when its
        newest is a quarter of the retention old."""
        with self._lock:
            if self._opened and self._clock() - self._last_put > self._retention / 4:
                try:
                    self._put(b"".join(self._pending))
                    self._pending = []
                except OSError as exc:
                    log.debug("ledger: could not keep the log alive (%s)", exc)

    def _put(self, data: bytes) -> None:
        key = f"{self._own_prefix}{self._generation}-{self._seq:010d}.jsonl"
        self._store.put(key, data)
        self._last_put = self._clock()
        self._seq += 1
        self._own_keys.append(key)
        self._size += OBJECT_WEIGHT


def _durable(sync: bool) -> None:
    return None
