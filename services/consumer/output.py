"""The consumer's output, built from the settings: the sink the batches are written to
(files in DATA_OUTPUT_DIR, or the object store at OUTPUT_URL), the ledger behind it
(EXACTLY_ONCE), and each shard's batcher (which sends an entry's batch to the directory the
output layout gives it).

The object-store modules are imported only for OUTPUT_URL: obstore comes with the `s3`
extra (the consumer image's), so the consumer runs without it when writing files.
"""

from __future__ import annotations

from concurrent.futures import Executor
from typing import TYPE_CHECKING, NamedTuple

from services.consumer.batch import Batcher
from services.consumer.encoding import line_size
from services.consumer.ledger import Ledger
from services.consumer.ledger_log import LedgerLog, Retention
from services.consumer.metrics import ConsumerMetrics
from services.consumer.pool import Pool
from services.consumer.settings import ConsumerSettings
from services.consumer.sink import FileSink, Sink, safe_host

if TYPE_CHECKING:
    from services.consumer.object_store import ObjectStore


class Output(NamedTuple):
    sink: Sink
    ledger: Ledger | None  # the sink's; None without EXACTLY_ONCE
    destination: str  # OUTPUT_URL or the directory, for logs and readiness


def build_output(
    settings: ConsumerSettings, metrics: ConsumerMetrics, executor: Executor
) -> Output:
    """`executor`: the writer threads the sink's writes and group commits run on."""
    store = _store(settings, metrics) if settings.output_url else None
    ledger = _ledger(settings, metrics, store) if settings.exactly_once else None
    if store is not None:
        from services.consumer.object_sink import ObjectSink

        sink: Sink = ObjectSink(
            store,
            settings.host_name,
            executor,
            ledger,
            compression=settings.output_compression,
            on_group=metrics.group_batches.observe,
        )
    else:
        sink = FileSink(
            settings.data_output_dir,
            settings.host_name,
            executor,
            ledger,
            compression=settings.output_compression,
            sync=settings.sync_mode,
            on_group=metrics.group_batches.observe,
        )
    return Output(sink, ledger, settings.output_url or str(settings.data_output_dir))


def new_batcher(settings: ConsumerSettings, pool: Pool) -> Batcher:
    """The shard's batcher, sealing batches into `pool`."""
    router = settings.path_template.router(pool.shard)
    return Batcher(
        pool.shard,
        settings.batch_size,
        settings.batch_max_wait_seconds,
        pool.submit,
        max_bytes=settings.batch_max_bytes,
        route=router.directories if router is not None else None,
        size=line_size if settings.batch_max_bytes else None,
    )


def _store(settings: ConsumerSettings, metrics: ConsumerMetrics) -> ObjectStore:
    from services.consumer.object_store import ObjectLocation, ObjectStore

    errors = metrics.store_errors
    return ObjectStore(
        ObjectLocation.parse(settings.output_url),
        endpoint=settings.s3_endpoint_url or None,
        on_error=lambda operation: errors.labels(operation).inc(),
        on_put=metrics.put_seconds.observe,
    )


def _ledger(
    settings: ConsumerSettings, metrics: ConsumerMetrics, store: ObjectStore | None
) -> Ledger:
    """The ledger; its log in the bucket with the object store, else in the directory."""
    duplicates = metrics.duplicates
    host = safe_host(settings.host_name)
    retention = Retention(
        settings.ledger_retention_seconds,
        settings.ledger_max_parts,
        on_forget=metrics.ledger_forgotten.inc,
    )
    log: LedgerLog
    if store is not None:
        from services.consumer.object_ledger import ObjectLedgerLog

        log = ObjectLedgerLog(store, host, retention)
    else:
        log = LedgerLog(settings.data_output_dir, host, retention)
    ledger = Ledger(log, on_skip=lambda shard, count: duplicates.labels(str(shard)).inc(count))
    metrics.ledger_parts.set_function(lambda: ledger.parts)
    return ledger
