"""Scripted deliveries and the consumer's real data path (pool, acker, file sink and
ledger on a real directory) without a broker: for faults at a precise point."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage
from pydantic_core import to_json

from services.common.metrics import new_registry
from services.common.schema import Entry
from services.consumer.acker import Acker
from services.consumer.batch import Batch, Delivery
from services.consumer.history import WorkerHistory
from services.consumer.ledger import Ledger
from services.consumer.ledger_log import LedgerLog
from services.consumer.metrics import ConsumerMetrics
from services.consumer.pool import Pool
from services.consumer.sink import FileSink
from tests.support.polling import eventually


class ScriptedChannel:
    """A consumer channel: open until the test closes it."""

    def __init__(self) -> None:
        self.is_closed = False


@dataclass(eq=False)
class ScriptedMessage:
    """An AMQP message as aio-pika hands it over; acks are logged as `ack <name>`. With
    `lose_ack`, the ack fails as it does when the channel dies under it."""

    log: list[str]
    name: str
    body: bytes
    channel: ScriptedChannel = field(default_factory=ScriptedChannel)
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    lose_ack: bool = False

    async def ack(self, multiple: bool = False) -> None:
        if self.lose_ack:
            self.channel.is_closed = True
            raise ConnectionError("channel closed")
        self.log.append(f"ack {self.name}")

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.log.append(f"nack {self.name}")


def entries(tag: str, count: int) -> list[Entry]:
    return [Entry(timestamp="2019-10-12T07:20:50Z", value=f"{tag}{i}") for i in range(count)]


def message(log: list[str], name: str, values: list[Entry], **fields: Any) -> ScriptedMessage:
    return ScriptedMessage(log, name, to_json(values), **fields)


def delivery(message: ScriptedMessage, count: int) -> Delivery:
    """What the consumer makes of a received message (parts named as it names them)."""
    return Delivery.of(cast(AbstractIncomingMessage, message), count)


def batch(d: Delivery, values: list[Entry], start: int = 0) -> Batch:
    b = Batch(0)
    b.add(d, values, start)
    return b


@dataclass
class DataPath:
    pool: Pool
    history: WorkerHistory
    ledger: Ledger | None
    directory: Path

    def submit(self, d: Delivery, values: list[Entry]) -> None:
        self.pool.submit(batch(d, values))


@asynccontextmanager
async def data_path(
    directory: Path,
    *,
    exactly_once: bool = True,
    workers: int = 1,
    timeout: float = 5.0,
    host: str = "h",
) -> AsyncIterator[DataPath]:
    """The real pool, acker, file sink and ledger writing into `directory`."""
    metrics = ConsumerMetrics(new_registry(process=False))
    history = WorkerHistory()
    executor = ThreadPoolExecutor(workers + 2, thread_name_prefix="test-write")
    ledger = Ledger(LedgerLog(directory, host)) if exactly_once else None
    sink = FileSink(directory, host, executor, ledger)
    sink.prepare()
    pool = Pool(
        0,
        sink,
        Acker(metrics, ledger.acked if ledger is not None else lambda delivery: None),
        history,
        metrics,
        workers_min=workers,
        workers_max=workers,
        timeout=timeout,
    )
    pool.start()
    try:
        yield DataPath(pool, history, ledger, directory)
    finally:
        await pool.stop()
        executor.shutdown(wait=False, cancel_futures=True)


async def until(
    condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds (AssertionError naming `what` after `timeout` s)."""

    async def probe() -> bool:
        return condition()

    await eventually(probe, timeout=timeout, interval=0.01, what=what)
