"""The API's Prometheus metrics. Labels are bounded: route (a fixed set), status, shard,
failure reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.api.errors import PublishFailed
from services.common.metrics import LATENCY_BUCKETS, SIZE_BUCKETS

ROUTES = frozenset({"/message", "/health", "/healthz", "/readyz", "/metrics", "/openapi.json"})
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry, shards_count: int) -> None:
        self.requests = Counter(
            "adp_api_requests_total",
            "HTTP requests answered, by route and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "adp_api_request_duration_seconds",
            "Time from request start to the end of the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.entries_accepted = Counter(
            "adp_api_entries_accepted_total",
            "Entries answered with 201 (confirmed by the broker), by shard.",
            ["shard"],
            registry=registry,
        )
        self.messages_published = Counter(
            "adp_api_messages_published_total",
            "AMQP messages confirmed by the broker, by shard.",
            ["shard"],
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "adp_api_publish_duration_seconds",
            "Time from publishing a message to the broker's confirm.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.message_entries = Histogram(
            "adp_api_message_entries",
            "Entries per published message (grouping of concurrent requests).",
            buckets=SIZE_BUCKETS,
            registry=registry,
        )
        self.publish_failures = Counter(
            "adp_api_publish_failures_total",
            "Requests answered 503 because the broker did not take their entries, one per "
            "request, by reason (nack, returned, timeout, disconnected).",
            ["reason"],
            registry=registry,
        )
        self.broker_connected = Gauge(
            "adp_api_broker_connected",
            "1 while the API holds an open broker connection.",
            registry=registry,
        )
        # Children resolved once: .labels() on the hot path costs a dict lookup and a lock.
        self.accepted_by_shard = [self.entries_accepted.labels(str(s)) for s in range(shards_count)]
        self.published_by_shard = [
            self.messages_published.labels(str(s)) for s in range(shards_count)
        ]
        for reason in PublishFailed.REASONS:
            self.publish_failures.labels(reason)
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        # The answers POST /message can give exist at 0 from the start: a dashboard shows
        # "0", and rate() sees the first 503 (a series born at 1 hides it).
        for status in (201, 400, 401, 408, 413, 503):
            self._child("/message", "POST", status)

    def observe_request(self, path: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request; unknown paths count as route "other" and unusual
        methods as "other", so a hostile client cannot grow the label sets."""
        counter, histogram = self._child(path, method, status)
        counter.inc()
        histogram.observe(seconds)

    def _child(self, path: str, method: str, status: int) -> tuple[Counter, Histogram]:
        route = path if path in ROUTES else "other"
        key = (route, method if method in METHODS else "other", status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(key[0], key[1], str(status)),
                self.request_seconds.labels(route),
            )
        return children
