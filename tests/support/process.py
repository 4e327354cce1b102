"""Real `async-data-processor` processes for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import httpx

from tests.support.polling import eventually


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
