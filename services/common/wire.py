"""What de-duplication needs on the wire: the parts of a message.

A message the API publishes is the concatenation of one or more requests' parts (a part: a
request's entries of one shard). The header `x-adp-parts` lists them in order, each as
`<count>` or `<count>@<key id>`:

- a part of a request sent with an `Idempotency-Key` carries a key id derived from the key,
  the whole request and the part's bytes, so a client's retry of the same request yields
  the same id even though the retry lands in another message;
- a part without one is known by `<message_id>/<position>`: stable across redeliveries of
  the same message.

The consumer records, per part id, which entries are already in batch files (the ledger)
and writes only the others. A message without the header (the Go original's, or one
published by hand) is one part named by its `message_id` and a digest of its body; without
a `message_id` it cannot be de-duplicated. A header that is there but does not parse
(or does not add up to the body's entries) sends the message to the poison path.

Freshness: the header `x-adp-accepted-ms` holds when the message's entries were accepted —
the API's wall clock, in integer milliseconds since the Unix epoch, taken when a request
hands its validated entries to the publisher (so it includes the publish and the confirm).
A message holding several requests' parts carries its oldest one's. The AMQP `timestamp`
property would do but has one-second resolution. The consumer measures accepted-to-durable
latency from it; a message without it (the Go original's, one published by hand) or with
a value that is not a positive integer is not measured.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

PARTS_HEADER = "x-adp-parts"
ENTRIES_HEADER = "x-adp-entries"  # entries in the message, for a reader that counts
ACCEPTED_HEADER = "x-adp-accepted-ms"
IDEMPOTENCY_KEY_MAX_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Part:
    """Entries [start, end) of a message, known as `id` (None: not identifiable)."""

    id: str | None
    start: int
    end: int
    keyed: bool = False


def request_key(key: bytes, body: bytes) -> bytes:
    """What the part ids of a request with an Idempotency-Key derive from: the key and the
    whole request (its entries as the API echoes them). A retry of the same request gets
    the same ids; another body under a reused key — even one sharing a shard's entries with
    the first — gets others, so a client's mistake never drops data."""
    material = len(key).to_bytes(2, "big") + key + body
    return hashlib.blake2b(material, digest_size=32, person=b"adp-request").digest()


def key_id(request: bytes, part: bytes) -> str:
    """The id of one shard's part of a keyed request (`request` from `request_key`)."""
    return "k" + hashlib.blake2b(request + part, digest_size=16, person=b"adp-part").hexdigest()


def part_spec(count: int, keyed_id: str | None) -> str:
    return str(count) if keyed_id is None else f"{count}@{keyed_id}"


class InvalidParts(ValueError):
    """The parts header is present but does not parse: the message goes to the poison
    path with this reason (it cannot be named for de-duplication)."""


# A count is 1-9 ASCII digits (no message holds a billion entries); `str.isdigit` would
# also take "²", which `int` refuses.
_COUNT = re.compile(r"[0-9]{1,9}")
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
HEADER_MAX_LENGTH = 65536


def parse_parts(header: object, message_id: str | None, total: int, body: bytes) -> list[Part]:
    """The parts of a received message of `total` entries (its `body` as received).
    Without the header (the Go original's messages, or one published by hand), the message
    is one part, named by its `message_id` and a digest of its body: a reused
    `message_id` with another body is another part, so its entries cannot be taken for
    the first message's. Raises InvalidParts when the header is there but malformed."""
    if header is None or header in ("", b""):
        if not message_id:
            return [Part(None, 0, total)]  # not identifiable
        digest = hashlib.blake2b(body, digest_size=12, person=b"adp-body").hexdigest()
        return [Part(f"{message_id}#{digest}", 0, total)]
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    if not isinstance(header, str):
        raise InvalidParts(f"{PARTS_HEADER} header is a {type(header).__name__}, not text")
    if len(header) > HEADER_MAX_LENGTH:
        raise InvalidParts(f"{PARTS_HEADER} header longer than {HEADER_MAX_LENGTH} characters")
    parts: list[Part] = []
    start = 0
    for position, spec in enumerate(header.split(",")):
        count_text, at, keyed = spec.partition("@")
        if not _COUNT.fullmatch(count_text) or (at and not _KEY_ID.fullmatch(keyed)):
            raise InvalidParts(f"{PARTS_HEADER} header: part {position} {spec[:40]!r} malformed")
        end = start + int(count_text)
        if keyed:
            parts.append(Part(keyed, start, end, keyed=True))
        else:
            parts.append(Part(f"{message_id}/{position}" if message_id else None, start, end))
        start = end
    if start != total:
        raise InvalidParts(f"{PARTS_HEADER} header counts {start} entries, the body {total}")
    return parts


def accepted_ms(now: float) -> int:
    """The `x-adp-accepted-ms` value for `now` (seconds since the epoch, `time.time()`)."""
    return int(now * 1000)


def parse_accepted(header: object) -> float | None:
    """When a received message's entries were accepted, in seconds since the epoch; None
    when the header is missing or not a positive integer (digits as text or bytes too, for
    a message published by hand)."""
    if isinstance(header, bytes | str):
        text = header.decode("ascii", "replace") if isinstance(header, bytes) else header
        # Bounded: int() of thousands of digits raises (and no epoch needs 17).
        digits = text.isascii() and text.isdigit() and len(text) <= 16
        header = int(text) if digits else None
    if isinstance(header, int) and not isinstance(header, bool) and header > 0:
        return header / 1000
    return None
