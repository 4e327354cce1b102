"""The parts header: what de-duplication names entries by."""

from __future__ import annotations

import pytest

from services.common.wire import (
    InvalidParts,
    Part,
    accepted_ms,
    key_id,
    parse_accepted,
    parse_parts,
    part_spec,
    request_key,
)


def test_a_retry_of_the_same_request_gets_the_same_id_another_body_another() -> None:
    a = b'[{"timestamp":"2019-10-12T07:20:50.52Z","value":"a"}]'
    b = b'[{"timestamp":"2019-10-12T07:20:51.52Z","value":"b"}]'
    both = a[:-1] + b"," + b[1:]
    first = request_key(b"k-1", both)
    assert key_id(first, a) == key_id(request_key(b"k-1", both), a)  # the retry
    assert key_id(first, a) != key_id(first, b)  # the request's other shard
    assert key_id(first, a) != key_id(request_key(b"k-2", both), a)  # another key
    # The same key reused for another request that shares shard 0's part: not a retry.
    assert key_id(first, a) != key_id(request_key(b"k-1", a), a)
    long_key = b"x" * 255
    assert request_key(long_key, a) != request_key(long_key[:-1] + b"y", a)
    assert key_id(first, a).startswith("k")


def test_parts_are_read_in_order_keyed_or_named_by_message_and_position() -> None:
    header = f"{part_spec(2, None)},{part_spec(3, 'kabc')},{part_spec(1, None)}"
    assert parse_parts(header, "m1", 6, b"[]") == [
        Part("m1/0", 0, 2),
        Part("kabc", 2, 5, keyed=True),
        Part("m1/2", 5, 6),
    ]
    assert parse_parts(header.encode(), "m1", 6, b"[]")[1].keyed  # bytes, as a broker may give


@pytest.mark.parametrize("header", [None, "", b""])
def test_without_the_header_a_message_is_one_part_named_by_its_id_and_body(
    header: object,
) -> None:
    [part] = parse_parts(header, "m1", 6, b"[1]")
    assert (part.start, part.end, part.keyed) == (0, 6, False)
    assert part.id is not None
    assert part.id.startswith("m1#")
    assert parse_parts(header, "m1", 6, b"[1]") == [part]  # a redelivery: the same name
    assert parse_parts(header, "m1", 6, b"[2]")[0].id != part.id  # a reused id, another body
    assert parse_parts(header, None, 6, b"[1]") == [Part(None, 0, 6)]  # not identifiable


@pytest.mark.parametrize(
    "header",
    ["x", "2,3", "2,,3", "-1,7", "\u00b2", "6@", "6@k/../x", "9" * 5000, 5, ["2", "3"]],
)
def test_a_malformed_header_is_refused_with_its_reason(header: object) -> None:
    """Strictly ASCII digits of bounded length ("²".isdigit() is true, int("²") raises),
    adding up to the body's entries: anything else is a poison message."""
    with pytest.raises(InvalidParts, match="x-adp-parts"):
        parse_parts(header, "m1", 6, b"[]")


def test_acceptance_is_stamped_in_milliseconds_and_read_back_in_seconds() -> None:
    stamp = accepted_ms(1_700_000_000.1234)
    assert stamp == 1_700_000_000_123
    assert parse_accepted(stamp) == pytest.approx(1_700_000_000.123)
    # Digits as text, as a hand-published message may carry them.
    assert parse_accepted(b"1700000000123") == parse_accepted("1700000000123") == 1_700_000_000.123


@pytest.mark.parametrize(
    "header", [None, "", "soon", "-5", "1.5", 0, -1, True, 1.5, "١٢٣", [1], "9" * 5000]
)
def test_a_missing_or_malformed_acceptance_is_not_measured(header: object) -> None:
    assert parse_accepted(header) is None
