"""The images, built and run: scripts/ci-images.sh builds Dockerfile.api and
Dockerfile.consumer with buildah (on a local stand-in for python:3.11-slim-bookworm) and runs
them with podman as the chart runs them (read-only root filesystem, /tmp a tmpfs, the
image's non-root user, no capabilities), against the real RabbitMQ in a vhost of its own.

It checks /healthz, POST /message -> 201, the consumer's files in a bind-mounted directory
owned by uid 10001, both /metrics, `podman healthcheck run`, SIGTERM -> exit 0 within 25 s
with every posted entry written, and the API image under 200 MB, the consumer's (with the
operator and the object-store client) under 235 MB. A missing tool (debootstrap,
buildah, podman: installed from Debian when absent) or broker is a failure, never a skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "ci-images.sh"


@pytest.mark.e2e
@pytest.mark.rabbitmq
@pytest.mark.timeout(900)
def test_images_build_and_run_as_the_chart_runs_them() -> None:
    assert SCRIPT.is_file(), f"{SCRIPT} is missing"
    # The script prints one line per check; pytest shows them when it fails.
    subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, check=True, timeout=840)
