"""What de-duplication needs on the wire: the parts of a message.

A message the API publishes is the concatenation of one or more requests' parts (a part: a
request's entries of one shard). The header `x-adp-parts` lists them in order, each as
`<count>` or `<count>@<key id>`:

- a part of a request sent with an `Idempotency-Key` carries a key id derived from the key
  and the part's bytes, so a client's retry of the same request yields the same id even
  though the retry lands in another message;
- a part without one is known by `<message_id>/<position>`: stable across redeliveries of
  the same message.

The consumer records, per part id, which entries are already in batch files (the ledger)
and writes only the others. A message without the header (the Go original's, or one
published by hand) is one part named by its `message_id`; without a `message_id` it cannot
be de-duplicated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PARTS_HEADER = "x-adp-parts"
IDEMPOTENCY_KEY_MAX_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Part:
    """Entries [start, end) of a message, known as `id` (None: not identifiable)."""

    id: str | None
    start: int
    end: int
    keyed: bool = False


def key_id(key: bytes, part: bytes) -> str:
    """The id of a part of a request with an Idempotency-Key: the same key and the same
    entries give the same id; another body under a reused key gives another id, so a
    client's mistake never drops data."""
    digest = hashlib.blake2b(part, key=key[:64], digest_size=16, person=b"adp-part")
    if len(key) > 64:  # blake2b keys are at most 64 bytes: fold the rest into the data
        digest.update(b"\0" + key[64:])
    return "k" + digest.hexdigest()


def part_spec(count: int, keyed_id: str | None) -> str:
    return str(count) if keyed_id is None else f"{count}@{keyed_id}"


def parse_parts(header: object, message_id: str | None, total: int) -> list[Part]:
    """The parts of a received message of `total` entries. A header that is missing,
    malformed or does not add up to `total` makes the message one part."""
    if isinstance(header, bytes):
        header = header.decode("ascii", "replace")
    if isinstance(header, str) and header:
        parts: list[Part] = []
        start = 0
        for position, spec in enumerate(header.split(",")):
            count_text, _, keyed = spec.partition("@")
            if not count_text.isdigit():
                break
            end = start + int(count_text)
            if keyed:
                parts.append(Part(keyed, start, end, keyed=True))
            else:
                parts.append(Part(f"{message_id}/{position}" if message_id else None, start, end))
            start = end
        else:
            if start == total:
                return parts
    return [Part(message_id or None, 0, total)]
