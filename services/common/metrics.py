"""Prometheus helpers. No global registry: each process (and each test) makes its own and
hands it to the metric sets it builds (small classes taking a registry)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)

# Seconds; from sub-millisecond confirms and fsyncs to the 5 s publish timeout and beyond.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Entries per message or per batch file.
SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000)


def new_registry(*, process: bool = True) -> CollectorRegistry:
    """A fresh registry; with `process`, it also carries the process collectors (RSS, CPU,
    open fds, GC), which read this process's own state and can be shared safely."""
    registry = CollectorRegistry(auto_describe=True)
    if process:
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, with its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
