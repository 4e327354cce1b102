"""The consumer's settings (environment variables; `message-consumer --help` lists flags)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.common.settings import ServiceSettings
from services.consumer.encoding import Compression
from services.consumer.layout import PathTemplate, check_template


class ConsumerSettings(ServiceSettings):
    data_output_dir: Path = Field(
        Path("./data_dump"), description="Directory the batch files are written to."
    )
    output_url: str = Field(
        "",
        max_length=1100,
        pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?)?$",
        description="Object storage for the batch files instead of DATA_OUTPUT_DIR: "
        "s3://bucket/prefix (each batch one object under the prefix, same names, layout and "
        "compression; the ledger under prefix/.ledger/). Empty = files in DATA_OUTPUT_DIR. "
        "Credentials and region from the standard AWS_* variables.",
    )
    s3_endpoint_url: str = Field(
        "",
        max_length=1000,
        pattern=r"^(https?://.+)?$",
        description="Endpoint of an S3-compatible store (e.g. http://seaweedfs:8333); empty = "
        "AWS S3 in AWS_REGION. Only with OUTPUT_URL.",
    )
    workers_min: int = Field(
        3, ge=1, le=64, description="Workers per shard pool at start and at rest."
    )
    workers_max: int = Field(4, ge=1, le=64, description="Most workers per shard pool at any time.")
    batch_size: int = Field(
        5, ge=1, le=100_000, description="Entries per batch file (a file never holds more)."
    )
    batch_max_bytes: int = Field(
        0,
        ge=0,
        le=1 << 30,
        description="Bytes of JSON Lines (uncompressed) a batch file holds at most: a batch is "
        "sealed before an entry would take it past this; an entry larger on its own is "
        "written alone (0 = no bound).",
    )
    batch_max_wait_seconds: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="Seconds after its first entry that a partial batch is written anyway.",
    )
    output_path_template: str = Field(
        "",
        max_length=1000,
        description="Directory of each batch file under DATA_OUTPUT_DIR, from the fields "
        "{shard}, {year}, {month}, {day}, {hour} of each entry's timestamp in UTC, e.g. "
        "date={year}-{month}-{day}/hour={hour}/shard={shard} (Hive style); empty = every "
        "file directly in DATA_OUTPUT_DIR. Relative, no '..', no part starting with '.'.",
    )
    output_compression: Compression = Field(
        "none",
        description="Compression of each batch file: none (.jsonl), gzip (.jsonl.gz) or zstd "
        "(.jsonl.zst); each file is one complete stream.",
    )
    worker_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a worker may spend on one batch; past it the worker is stopped, its "
            "batch handed to a fresh worker, nothing acked."
        ),
    )
    prefetch_count: int = Field(
        0,
        ge=0,
        le=65535,
        description=(
            "Unacknowledged messages per shard held at once (bounds memory); "
            "0 = 2 x BATCH_SIZE x WORKERS_MAX, within 32..10000. Memory is bounded by "
            "this times the largest message (the API's are at most "
            "PUBLISH_MAX_MESSAGE_BYTES)."
        ),
    )
    scale_up_backlog: int = Field(
        100,
        ge=1,
        description="Ready messages in a shard queue at or above which its pool grows, one "
        "worker per reading, up to WORKERS_MAX.",
    )
    scale_down_backlog: int = Field(
        10,
        ge=0,
        description="Ready messages at or below which the backlog counts as shallow.",
    )
    scale_down_cooldown_seconds: float = Field(
        15.0,
        ge=0,
        le=3600,
        description="Seconds the backlog must stay shallow before the pool shrinks by one.",
    )
    scale_interval_seconds: float = Field(
        1.0, gt=0, le=60, description="Seconds between queue-depth readings."
    )
    metrics_host: str = Field("0.0.0.0", description="Address of the consumer's HTTP server.")
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="Port of /metrics, /healthz, /readyz and /workers (0 = any free port).",
    )
    history_log_interval_seconds: float = Field(
        60.0, ge=0, description="Seconds between worker-history tables in the log (0 = never)."
    )
    history_limit: int = Field(
        1000, ge=10, description="Stopped worker generations kept in /workers (oldest dropped)."
    )
    exactly_once: bool = Field(
        True,
        description="Keep a ledger of the entries already written (in DATA_OUTPUT_DIR/.ledger/"
        "), so a redelivered message or a client's retry with the same Idempotency-Key is "
        "not written twice. Off: at-least-once, no ledger records or lookups.",
    )
    sync_mode: Literal["group", "file"] = Field(
        "group",
        description="How batch files are made durable. group: each group commit syncs the file "
        "system of DATA_OUTPUT_DIR once (syncfs, Linux 5.8+; one disk flush for all its files "
        "and their ledger records); give the consumer a volume of its own. file: an fsync per "
        "file, for a volume shared with other writers (a whole-file-system sync would flush "
        "theirs too).",
    )
    ledger_retention_seconds: float = Field(
        3600.0,
        gt=0,
        le=7 * 86400,
        description="How long the ledger remembers entries sent with an Idempotency-Key "
        "(a retry later than this is written again), and unsettled ones.",
    )
    ledger_max_parts: int = Field(
        250_000,
        ge=1000,
        le=100_000_000,
        description="Most request parts the ledger remembers (up to about 750 bytes of memory "
        "each); past it the oldest are forgotten (counted in "
        "adp_consumer_ledger_forgotten_total).",
    )
    host_name: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        description="Name in every batch file, so replicas sharing a volume never collide "
        "(default: the host name, which is the pod name on Kubernetes).",
    )

    @field_validator("output_path_template")
    @classmethod
    def _template(cls, value: str) -> str:
        check_template(value)  # InvalidTemplate is a ValueError: reported as the field's
        return value

    @model_validator(mode="after")
    def _bounds(self) -> ConsumerSettings:
        if self.workers_min > self.workers_max:
            raise ValueError("WORKERS_MIN must not exceed WORKERS_MAX")
        if self.scale_down_backlog >= self.scale_up_backlog:
            raise ValueError("SCALE_DOWN_BACKLOG must be below SCALE_UP_BACKLOG")
        return self

    @property
    def prefetch(self) -> int:
        # Acks follow the write, so filling one batch of one-entry messages needs
        # BATCH_SIZE unacked deliveries: room for two batches per worker keeps all busy.
        return self.prefetch_count or min(10_000, max(32, 2 * self.batch_size * self.workers_max))

    @property
    def path_template(self) -> PathTemplate:
        return PathTemplate(self.output_path_template)
