"""Process-wide tuning applied once by each long-running command, after start-up."""

from __future__ import annotations

import gc

# Allocations of tracked objects between young-generation collections (CPython's default
# is 700). The hot paths allocate many short-lived containers that reference counting
# frees; collecting every 700 of them cost the API ~20% of its throughput under load
# (bench/api_load.py). Cycles still get collected, just less often.
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Move everything allocated so far (modules, schemas, the app) out of the collector's
    view, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
