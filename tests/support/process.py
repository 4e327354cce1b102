"""Real `async-data-processor` processes for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from pathlib import Path
from types import TracebackType

import httpx
from aio_pika.abc import AbstractConnection

from services.common.topology import Topology
from tests.support.polling import eventually
from tests.support.queues import drained

# Small batches, a short wait for a partial one and a drain bound the e2e timings assume.
E2E_BATCHES = {
    "BATCH_SIZE": "5",
    "BATCH_MAX_WAIT_SECONDS": "0.3",
    "SHUTDOWN_TIMEOUT_SECONDS": "10",
    "HOST_NAME": "e2e",
}


def broker_env(topo: Topology, rabbitmq_url: str) -> dict[str, str]:
    """What the API and the consumer both need: the broker and the topology."""
    return {
        "RABBITMQ_URL": rabbitmq_url,
        "QUEUE_PREFIX": topo.prefix,
        "SHARDS_COUNT": str(topo.shards_count),
    }


def api_env(topo: Topology, port: int, rabbitmq_url: str) -> dict[str, str]:
    """`server` on loopback at `port`."""
    return {**broker_env(topo, rabbitmq_url), "PORT": str(port), "HOST": "127.0.0.1"}


def consumer_env(
    topo: Topology, out: Path, port: int, rabbitmq_url: str, **settings: str
) -> dict[str, str]:
    """`message-consumer` writing under `out`, metrics on loopback at `port`; `settings`
    are more variables (e.g. `**E2E_BATCHES`)."""
    return {
        **broker_env(topo, rabbitmq_url),
        "DATA_OUTPUT_DIR": str(out),
        "METRICS_PORT": str(port),
        "METRICS_HOST": "127.0.0.1",
        **settings,
    }


def console_script() -> str:
    """The installed `async-data-processor` script of this interpreter's environment."""
    beside = Path(sys.executable).parent / "async-data-processor"
    found = str(beside) if beside.exists() else shutil.which("async-data-processor")
    assert found, "async-data-processor is not installed (run `make install`)"
    return found


class ServiceProcess:
    """`async-data-processor <command>` with extra environment; output to `log_path`.
    Killed on exit from the context if the test has not stopped it."""

    def __init__(self, command: str, env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [console_script(), self.command], env=self.env, stdout=log, stderr=log
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: signal.Signals = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    async def wait_ready(self, base_url: str, timeout: float = 20) -> None:
        async def probe() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.log}")
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(f"{base_url}/readyz")).status_code == 200

        await eventually(probe, timeout=timeout, interval=0.1, what=f"{self.command} ready")


Count = Callable[[], int | Awaitable[int]]


async def _counted(count: Count) -> int:
    found = count()
    return await found if isawaitable(found) else found


async def kill_9_rounds(
    env: dict[str, str], port: int, logs: Path, count: Count, timeout: float, rounds: int = 2
) -> None:
    """`rounds` consumers in turn, each killed -9 once `count()` (entries written) has
    grown by 300 since it started; logs `k<round>.log` under `logs`."""
    for round_ in range(rounds):
        with ServiceProcess("message-consumer", env, logs / f"k{round_}.log") as proc:
            await proc.wait_ready(f"http://127.0.0.1:{port}")
            target = await _counted(count) + 300

            async def progressed(target: int = target) -> bool:
                return await _counted(count) >= target

            await eventually(progressed, timeout=timeout, what="progress")
            proc.signal(signal.SIGKILL)
            proc.wait(10)


async def until_drained(
    proc: ServiceProcess,
    port: int,
    amqp: AbstractConnection,
    topo: Topology,
    count: Count,
    total: int,
    timeout: float,
) -> None:
    """Once ready, wait for `total` entries written (`count()`) and the queues empty,
    then SIGTERM the consumer (the test checks how it exits)."""
    await proc.wait_ready(f"http://127.0.0.1:{port}")

    async def everything() -> bool:
        return await _counted(count) >= total

    await eventually(everything, timeout=timeout, what="all entries")
    await eventually(lambda: drained(amqp, topo), timeout=10, what="queues drained")
    proc.signal(signal.SIGTERM)
