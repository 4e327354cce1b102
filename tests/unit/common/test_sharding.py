from __future__ import annotations

from datetime import datetime

import pytest

from services.common.schema import Entry, InvalidEntries
from services.common.sharding import group_by_shard, unix_seconds
from tests.support.publish import shard_of


@pytest.mark.parametrize(
    ("timestamp", "shard"),
    [
        # DESIGN.md's two examples, 5 shards
        ("2019-10-12T07:20:50.52Z", 0),
        ("2019-10-12T08:10:51.52Z", 1),
        # the same instants written with offsets
        ("2019-10-12T09:20:50.52+02:00", 0),
        ("2019-10-12T03:10:51.52-05:00", 1),
        ("2019-10-12t08:10:51.52z", 1),
        # fractional seconds floor, never round up
        ("2019-10-12T07:20:50.999999999Z", 0),
        ("2019-10-12T07:20:54.999Z", 4),
        # before 1970: floor towards the past, shard stays in range
        ("1969-12-31T23:59:59Z", 4),  # -1
        ("1969-12-31T23:59:59.5Z", 4),  # -0.5 floors to -1
        ("1969-12-31T23:59:55Z", 0),  # -5
        ("1900-01-01T00:00:00Z", 0),  # -2208988800
        ("0001-01-01T00:00:00Z", 0),  # -62135596800
        ("0001-01-01T00:00:00+01:00", 0),  # -62135600400, before year 1 in UTC
        ("9999-12-31T23:59:59-01:00", 4),  # 253402304399
    ],
)
def test_shard_is_floor_of_unix_seconds_mod_count(timestamp: str, shard: int) -> None:
    assert shard_of(timestamp, 5) == shard


@pytest.mark.parametrize(
    "timestamp",
    ["2019-10-12T07:20:50.52Z", "1969-07-20T20:17:40.25+01:30", "2038-01-19T03:14:08Z"],
)
def test_unix_seconds_matches_the_float_reference(timestamp: str) -> None:
    reference = datetime.fromisoformat(timestamp).timestamp()
    assert unix_seconds(timestamp) == int(reference // 1)


@pytest.mark.parametrize("shards", [1, 2, 7, 1000])
def test_shard_always_in_range(shards: int) -> None:
    for second in range(-50, 50):
        stamp = f"1970-01-01T00:00:{abs(second) % 60:02d}Z"
        assert 0 <= shard_of(stamp, shards) < shards


@pytest.mark.parametrize(
    "timestamp",
    [
        "2019-02-30T00:00:00Z",  # no such day
        "2019-13-01T00:00:00Z",
        "2016-12-31T23:59:60Z",  # leap seconds are not representable
        "2019-10-12T24:00:00Z",
        "2019-10-12T07:20:50+24:00",
        "0000-01-01T00:00:00Z",  # no year 0
    ],
)
def test_timestamps_naming_no_instant_are_rejected_with_index(timestamp: str) -> None:
    entries = [Entry(timestamp="2019-10-12T07:20:50Z"), Entry(timestamp=timestamp)]
    with pytest.raises(InvalidEntries) as info:
        group_by_shard(entries, 5)
    error = info.value.errors[0]
    assert (error.index, error.field) == (1, "timestamp")
    assert "not a real instant" in error.message


def test_groups_keep_request_order() -> None:
    stamps = [f"2019-10-12T07:20:{s:02d}Z" for s in (50, 51, 55, 52, 56, 50)]
    groups = group_by_shard([Entry(timestamp=t, value=str(i)) for i, t in enumerate(stamps)], 5)
    assert {shard: [e["value"] for e in group] for shard, group in groups.items()} == {
        0: ["0", "2", "5"],
        1: ["1", "4"],
        2: ["3"],
    }
