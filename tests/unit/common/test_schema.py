from __future__ import annotations

import json

import pytest

from services.common.schema import (
    MAX_REPORTED_ERRORS,
    Entry,
    InvalidEntries,
    dump_entries,
    parse_entries,
    parse_message,
)

TS = "2019-10-12T07:20:50.52Z"


def body(*entries: object) -> bytes:
    return json.dumps(list(entries)).encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"not json", "not valid JSON"),
        (b'[{"timestamp": "2019-10-12T07:20:50Z"}] trailing', "not valid JSON"),
        (b"", "body is empty"),
        (b"   ", "body is empty"),
        (b'[{"timestamp":"2019-10-12T07:20:50Z","value":"\xff"}]', "not valid UTF-8"),
        (b"\xef\xbb\xbf[]", "not valid JSON"),  # a BOM is not JSON text
        (b'{"timestamp": "2019-10-12T07:20:50Z"}', "must be a JSON array"),
        (b"3", "must be a JSON array"),
        (b'"text"', "must be a JSON array"),
        (b"null", "must be a JSON array"),
        (b"true", "must be a JSON array"),
        (b"[]", "the array is empty"),
    ],
)
def test_body_level_errors(raw: bytes, expected: str) -> None:
    with pytest.raises(InvalidEntries) as info:
        parse_entries(raw)
    assert expected in str(info.value)
    assert info.value.errors[0].index is None


@pytest.mark.parametrize(
    ("entry", "field", "expected"),
    [
        (1, None, "must be a JSON object"),
        ("x", None, "must be a JSON object"),
        (None, None, "must be a JSON object"),
        ([TS], None, "must be a JSON object"),
        ({"value": "x"}, "timestamp", "Field required"),
        ({"timestamp": None}, "timestamp", "must be a string"),
        ({"timestamp": 1570864850}, "timestamp", "must be a string"),
        ({"timestamp": 1570864850.5}, "timestamp", "must be a string"),
        ({"timestamp": "2019-10-12T"}, "timestamp", "RFC 3339"),  # the Go original's case
        ({"timestamp": "2019-10-12"}, "timestamp", "RFC 3339"),  # a date without time
        ({"timestamp": "2019-10-12T07:20:50"}, "timestamp", "RFC 3339"),  # no offset
        ({"timestamp": "2019-10-12T07:20:50.52"}, "timestamp", "RFC 3339"),
        ({"timestamp": "2019-10-12 07:20:50Z"}, "timestamp", "RFC 3339"),
        ({"timestamp": "1570864850"}, "timestamp", "RFC 3339"),  # unix seconds as a string
        ({"timestamp": "2019-10-12T07:20:50+0200"}, "timestamp", "RFC 3339"),
        ({"timestamp": "2019-10-12T07:20:50.Z"}, "timestamp", "RFC 3339"),
        ({"timestamp": "2019-10-12T07:20:50.1234567890Z"}, "timestamp", "RFC 3339"),
        ({"timestamp": "２０１９-10-12T07:20:50Z"}, "timestamp", "RFC 3339"),  # noqa: RUF001
        ({"timestamp": ""}, "timestamp", "RFC 3339"),
        ({"timestamp": TS, "value": 5}, "value", "valid string"),
        ({"timestamp": TS, "value": True}, "value", "valid string"),
        ({"timestamp": TS, "value": {}}, "value", "valid string"),
        ({"timestamp": TS, "value": ["a"]}, "value", "valid string"),
        ({"timestamp": TS, "valeu": "typo"}, "valeu", "unknown field"),
    ],
)
def test_entry_level_errors_name_index_and_field(
    entry: object, field: str | None, expected: str
) -> None:
    raw = body({"timestamp": TS}, {"timestamp": TS, "value": "ok"}, entry)
    with pytest.raises(InvalidEntries) as info:
        parse_entries(raw)
    error = info.value.errors[0]
    assert (error.index, error.field) == (2, field)
    assert expected in error.message
    assert str(info.value).startswith("entry 2")


def test_every_invalid_entry_is_reported_up_to_a_cap() -> None:
    raw = body(*({"timestamp": "bad"} for _ in range(1000)))
    with pytest.raises(InvalidEntries) as info:
        parse_entries(raw)
    assert len(info.value.errors) == MAX_REPORTED_ERRORS
    assert info.value.total == 1000
    assert [e.index for e in info.value.errors] == list(range(MAX_REPORTED_ERRORS))


@pytest.mark.parametrize(
    "timestamp",
    [
        "2019-10-12T07:20:50.52Z",
        "2019-10-12T07:20:50Z",
        "2019-10-12t07:20:50z",  # RFC 3339 allows lower case
        "2019-10-12T09:20:50.52+02:00",
        "2019-10-12T07:20:50-00:00",
        "2019-10-12T07:20:50.123456789Z",  # nanoseconds kept verbatim
        "1969-07-20T20:17:40Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
    ],
)
def test_valid_timestamps_are_kept_verbatim(timestamp: str) -> None:
    [entry] = parse_entries(body({"timestamp": timestamp, "value": "v"}))
    assert entry == Entry(timestamp=timestamp, value="v")


@pytest.mark.parametrize("value", ["", "D", "ünïcødé ✓", "x" * 100_000, 'a\nb"c\\'])
def test_values_any_string(value: str) -> None:
    [entry] = parse_entries(body({"timestamp": TS, "value": value}))
    assert entry["value"] == value


def test_value_is_optional_and_null_means_absent() -> None:
    entries = parse_entries(body({"timestamp": TS}, {"timestamp": TS, "value": None}))
    assert entries == [{"timestamp": TS, "value": None}, {"timestamp": TS, "value": None}]


def test_dump_is_compact_json_in_order() -> None:
    entries = parse_entries(body({"timestamp": TS, "value": "A"}, {"timestamp": TS}))
    assert json.loads(dump_entries(entries)) == [
        {"timestamp": TS, "value": "A"},
        {"timestamp": TS, "value": None},
    ]


def test_message_accepts_the_go_originals_single_object() -> None:
    assert parse_message(b'{"timestamp":"2019-10-12T07:20:50Z","value":"x"}') == [
        Entry(timestamp="2019-10-12T07:20:50Z", value="x")
    ]
    assert parse_message(body({"timestamp": TS})) == [Entry(timestamp=TS, value=None)]
    with pytest.raises(InvalidEntries) as info:
        parse_message(b'{"timestamp": 5}')
    assert (info.value.errors[0].index, info.value.errors[0].field) == (0, "timestamp")
