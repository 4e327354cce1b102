from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

import pytest

from services.common.schema import Entry, InvalidEntries
from services.consumer.layout import (
    FileNames,
    InvalidTemplate,
    PathTemplate,
    civil_from_days,
    utc_fields,
)

HIVE = "date={year}-{month}-{day}/hour={hour}/shard={shard}"


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("date={date}", "unknown field {date}"),
        ("{minute}/{hour}", "unknown field {minute}"),
        ("/data/{year}", "relative"),
        ("../{year}", "climb out"),
        ("a/../{year}", "climb out"),
        (".hidden/{year}", "starting with '.'"),
        ("{year}/.x", "starting with '.'"),
        ("a//{year}", "empty part"),
        ("{year}/", "empty part"),
        ("{year:04d}", "takes no format"),
        ("{year!r}", "takes no format"),
        ("{year", "not a valid template"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_bad_templates_are_refused_saying_why(template: str, words: str) -> None:
    with pytest.raises(InvalidTemplate, match=re.escape(words)):
        PathTemplate(template)


@pytest.mark.parametrize(
    ("timestamp", "shard", "directory"),
    [
        ("2019-10-12T07:20:50.52Z", 0, "date=2019-10-12/hour=07/shard=0"),
        # An offset that changes the UTC date, both ways.
        ("2019-10-13T01:30:00+02:00", 3, "date=2019-10-12/hour=23/shard=3"),
        ("2019-10-12T22:30:00.123456789-05:00", 1, "date=2019-10-13/hour=03/shard=1"),
        ("2019-12-31T23:59:59-00:30", 2, "date=2020-01-01/hour=00/shard=2"),
        ("2020-02-29t12:00:00z", 4, "date=2020-02-29/hour=12/shard=4"),
        # Past what datetime holds, once in UTC: still a directory.
        ("0001-01-01T00:30:00+01:00", 0, "date=0000-12-31/hour=23/shard=0"),
        ("9999-12-31T23:30:00-01:00", 0, "date=10000-01-01/hour=00/shard=0"),
    ],
)
def test_directories_come_from_the_utc_instant(timestamp: str, shard: int, directory: str) -> None:
    template = PathTemplate(HIVE)
    assert template.directory(timestamp, shard) == directory
    router = template.router(shard)
    assert router is not None
    assert router.directories([Entry(timestamp=timestamp)]) == [directory]


def test_the_router_caches_by_minute_and_offset_only() -> None:
    router = PathTemplate("{day}/{hour}").router(0)
    assert router is not None
    stamps = [
        "2019-10-12T23:59:59.9+05:30",  # 18:29 UTC
        "2019-10-12T23:59:01+05:30",  # the same minute and offset: the same directory
        "2019-10-12T23:59:01+00:00",
        "2019-10-12T23:59:01Z",
    ]
    assert router.directories([Entry(timestamp=t) for t in stamps]) == [
        "12/18", "12/18", "12/23", "12/23",
    ]  # fmt: skip


def test_an_entry_naming_no_instant_is_named_in_the_error() -> None:
    router = PathTemplate("{day}").router(0)
    assert router is not None
    items = [Entry(timestamp="2019-10-12T07:20:50Z"), Entry(timestamp="2019-02-30T07:20:50Z")]
    with pytest.raises(InvalidEntries) as raised:
        router.directories(items)
    [error] = raised.value.errors
    assert (error.index, error.field) == (1, "timestamp")


def test_the_flat_layout_has_no_router() -> None:
    assert PathTemplate("").flat
    assert PathTemplate("").router(0) is None


def test_civil_dates_agree_with_datetime() -> None:
    epoch = date(1970, 1, 1)
    for days in range(-719162, 2932897, 997):  # 0001-01-01 .. 9999-12-31
        day = epoch + timedelta(days=days)
        assert civil_from_days(days) == (day.year, day.month, day.day), days


def test_utc_fields_agree_with_datetime_around_a_date_change() -> None:
    for minutes in range(-26 * 60, 26 * 60, 17):
        sign = "+" if minutes >= 0 else "-"
        offset = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        if abs(minutes) >= 24 * 60:
            continue
        stamp = f"2019-10-12T00:10:00{offset}"
        moment = datetime.fromisoformat(stamp).astimezone(UTC)
        assert utc_fields(stamp) == (moment.year, moment.month, moment.day, moment.hour)


def test_file_names_carry_host_worker_time_sequence_and_suffix() -> None:
    names = FileNames("pod_a/1", ".jsonl.zst")
    first, second = names.name("3-1"), names.name("3-1")
    assert re.fullmatch(r"pod-a-1_3-1_\d{8}T\d{12}Z_00000001\.jsonl\.zst", first)
    assert second.endswith("_00000002.jsonl.zst")
