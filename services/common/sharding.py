"""Sharding by timestamp: shard = floor(unix seconds of the timestamp) mod SHARDS_COUNT.

As the Go original did, so both can feed the same queues. Integer arithmetic on the exact
instant (no float rounding): dates before 1970 floor towards the past, so their shard is
still in 0..SHARDS_COUNT-1.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.common.schema import Entry, EntryError, InvalidEntries

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)


def unix_seconds(timestamp: str) -> int:
    """Floor of the Unix time of an RFC 3339 timestamp (shape already checked by the schema).

    Raises ValueError for strings of the right shape that name no instant (2019-02-30,
    year 0, second 60, offset +24:00). Aware datetimes subtract as timedeltas, so an offset
    that pushes the instant past year 1 or 9999 in UTC is still exact.
    """
    if timestamp[-1] == "z":  # fromisoformat takes "Z" only in upper case
        timestamp = timestamp[:-1] + "Z"
    return (datetime.fromisoformat(timestamp) - _EPOCH) // _SECOND


def group_by_shard(entries: list[Entry], shards_count: int) -> dict[int, list[Entry]]:
    """Entries grouped by shard, each group in request order. Raises `InvalidEntries`
    naming every entry whose timestamp is not a real instant.

    The hot loop of the API (once per entry): `unix_seconds` is inlined, names are local.
    """
    groups: dict[int, list[Entry]] = {}
    fromisoformat, epoch, second = datetime.fromisoformat, _EPOCH, _SECOND
    try:
        for entry in entries:
            timestamp = entry["timestamp"]
            if timestamp[-1] == "z":
                timestamp = timestamp[:-1] + "Z"
            shard = (fromisoformat(timestamp) - epoch) // second % shards_count
            if shard in groups:
                groups[shard].append(entry)
            else:
                groups[shard] = [entry]
    except ValueError:
        raise InvalidEntries(_instant_errors(entries)) from None
    return groups


def _instant_errors(entries: list[Entry]) -> list[EntryError]:
    errors = []
    for index, entry in enumerate(entries):
        try:
            unix_seconds(entry["timestamp"])
        except ValueError as exc:
            errors.append(EntryError(f"not a real instant: {exc}", index, "timestamp"))
    return errors
