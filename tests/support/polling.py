"""Wait for a condition with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Call `probe` until it returns a truthy value (returned) or `timeout` seconds pass
    (AssertionError naming `what` and the last value or error)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = await probe()
        except Exception as exc:  # noqa: BLE001 - the probe's failure is the "not yet"
            last = exc
        else:
            if result:
                return result
            last = result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


def holds(condition: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """A synchronous condition as a probe for `eventually`."""

    async def probe() -> T:
        return condition()

    return probe
