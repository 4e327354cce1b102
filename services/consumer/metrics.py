"""The consumer's Prometheus metrics. Labels are bounded: shard, worker (`<shard>-<slot>`,
slot < WORKERS_MAX), direction, never a generation or a file name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS, SIZE_BUCKETS

STORE_OPERATIONS = ("put", "get", "head", "list", "delete")


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.processed = Counter(
            "adp_worker_processed_entries_total",
            "Entries written to batch files (and so acked), by worker.",
            ["shard", "worker"],
            registry=registry,
        )
        self.batches = Counter(
            "adp_consumer_batches_written_total",
            "Batch files written, by shard.",
            ["shard"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "adp_consumer_batch_write_duration_seconds",
            "Time to write, fsync and rename one batch file.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_entries = Histogram(
            "adp_consumer_batch_entries",
            "Entries per batch file.",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.group_batches = Histogram(
            "adp_consumer_group_commit_batches",
            "Batch files made durable together by one group commit (one syncfs with "
            "SYNC_MODE=group, one ledger fdatasync with file; one fsync per directory).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.store_errors = Counter(
            "adp_consumer_object_store_errors_total",
            "Failed requests to the object store (OUTPUT_URL), by operation (put, get, head, "
            "list, delete): unreachable, 5xx, SlowDown, denied. Each failed batch is retried "
            "with capped backoff, nothing acked meanwhile.",
            ["operation"],
            registry=registry,
        )
        for operation in STORE_OPERATIONS:  # series from start-up: the first error shows
            self.store_errors.labels(operation)
        self.put_seconds = Histogram(
            "adp_consumer_object_put_seconds",
            "Seconds per successful PUT to the object store (batch objects, ledger objects).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "adp_consumer_queue_depth",
            "Ready messages in the shard's queue at the last reading.",
            ["shard"],
            registry=registry,
        )
        self.workers = Gauge(
            "adp_consumer_workers",
            "Live workers in the shard's pool.",
            ["shard"],
            registry=registry,
        )
        self.scale_events = Counter(
            "adp_consumer_scale_events_total",
            "Pool size changes, by shard and direction (up, down).",
            ["shard", "direction"],
            registry=registry,
        )
        self.worker_timeouts = Counter(
            "adp_consumer_worker_timeouts_total",
            "Workers stopped for spending longer than WORKER_TIMEOUT_SECONDS on a batch.",
            ["shard"],
            registry=registry,
        )
        self.redeliveries = Counter(
            "adp_consumer_redeliveries_total",
            "Messages the broker delivered again (after a crash, a lost channel or a requeue).",
            ["shard"],
            registry=registry,
        )
        self.write_errors = Counter(
            "adp_consumer_write_errors_total",
            "Batch writes that failed (disk full, permissions); the batch is retried.",
            ["shard"],
            registry=registry,
        )
        self.rejected = Counter(
            "adp_consumer_rejected_messages_total",
            "Messages that hold no valid entries: dead-lettered (or, if that fails, kept "
            "under .rejected/), then acked.",
            ["shard"],
            registry=registry,
        )
        self.duplicates = Counter(
            "adp_consumer_duplicates_skipped_total",
            "Entries the ledger found already written (a redelivery or a client's retry), "
            "so not written again.",
            ["shard"],
            registry=registry,
        )
        self.ledger_parts = Gauge(
            "adp_consumer_ledger_parts",
            "Request parts the ledger remembers now.",
            registry=registry,
        )
        self.ledger_forgotten = Counter(
            "adp_consumer_ledger_forgotten_total",
            "Parts the ledger forgot before their retention ended, for room "
            "(LEDGER_MAX_PARTS): a retry of those would be written again.",
            registry=registry,
        )
        self.acks_lost = Counter(
            "adp_consumer_acks_lost_total",
            "Acks that failed with their channel (the broker redelivers those messages).",
            registry=registry,
        )
        # Its internal name says what it counts; the metric's name is a contract.
        self.waiting_batches = Gauge(
            "adp_consumer_pending_batches",
            "Sealed batches waiting for a worker, by shard.",
            ["shard"],
            registry=registry,
        )
        self.broker_connected = Gauge(
            "adp_consumer_broker_connected",
            "1 while the consumer holds an open broker connection.",
            registry=registry,
        )

    def create_shard_series(self, shard: int) -> None:
        """Export the shard's counters at 0 from the start, so a dashboard shows "0", not
        "No data", and `rate()` sees the first fault (a series born at 1 hides it)."""
        label = str(shard)
        for counter in (
            self.batches,
            self.worker_timeouts,
            self.redeliveries,
            self.write_errors,
            self.rejected,
            self.duplicates,
        ):
            counter.labels(label)
        for direction in ("up", "down"):
            self.scale_events.labels(label, direction)
