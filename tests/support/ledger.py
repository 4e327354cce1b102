"""What a ledger log holds as written, asked the way the ledger asks it: by a lookup."""

from __future__ import annotations

from typing import cast

from aio_pika.abc import AbstractIncomingMessage

from services.common.schema import Entry
from services.common.wire import Part
from services.consumer.batch import Batch, Delivery
from services.consumer.ledger_log import LedgerLog, _missing

PROBE_SIZE = 64  # entries of the probing part: more than any part the tests write


def written(log: LedgerLog, part: str, size: int = PROBE_SIZE) -> list[tuple[int, int]]:
    """The ranges of `part` (in its own numbering, within [0, `size`)) known to be in a
    file: what the lookup of a redelivery covering the whole part leaves out. Like every
    lookup, it reads first what other processes appended and confirms records whose file
    is in place."""
    message = cast(AbstractIncomingMessage, object())
    redelivery = Delivery(message, size, parts=(Part(part, 0, size),), needs_lookup=True)
    batch = Batch(0)
    batch.add(redelivery, [Entry(timestamp="2019-10-12T07:20:50Z", value="") for _ in range(size)])
    _, to_write = log.lookup(batch)
    return _missing(0, size, [(first, end) for _, first, end in to_write])
