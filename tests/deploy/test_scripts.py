"""Every shell script passes shellcheck (scripts/kind-up.sh cannot run here: this is its
check). A missing shellcheck is installed by the script, or fails it: never a skip."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_shell_scripts_pass_shellcheck() -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "check-shell.sh")], check=True, timeout=280)
