"""Every shell script passes shellcheck (scripts/kind-up.sh cannot run here: this is its
check). A missing shellcheck is installed by the script, or fails it: never a skip."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.deploy.test_chart import _render

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_shell_scripts_pass_shellcheck() -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "check-shell.sh")], check=True, timeout=280)


def _matches(selector: str, labels: dict[str, str]) -> bool:
    """A label selector of `k=v` and `k in (a,b)` terms, as kubectl reads it."""
    terms = re.findall(r"([\w./-]+)\s+in\s+\(([^)]*)\)|([\w./-]+)=([^,]+)", selector)
    assert terms, selector
    for key_in, values, key, value in terms:
        if key_in:
            if labels.get(key_in) not in {v.strip() for v in values.split(",")}:
                return False
        elif labels.get(key) != value:
            return False
    return True


def test_kind_up_waits_for_the_workload_pods_only() -> None:
    """A failed `helm test` pod left from an earlier run is never Ready: kind-up.sh must not
    wait for it, but must wait for every pod the release runs."""
    script = (ROOT / "scripts" / "kind-up.sh").read_text()
    (selector,) = re.findall(r'kubectl -n "\$namespace" wait pod[^\n]*\\\n\s*-l "([^"]+)"', script)
    selector = selector.replace("$release", "adp")
    values = ROOT / "deploy" / "helm" / "async-data-processor" / "ci" / "operator-values.yaml"
    manifests = _render("-f", str(values))
    pods = [
        item["spec"]["template"]["metadata"]["labels"]
        for item in manifests
        if item["kind"] in {"Deployment", "StatefulSet"}
    ]
    assert len(pods) == 4  # api, consumer, rabbitmq, operator
    for labels in pods:
        assert _matches(selector, labels), labels
    (test_pod,) = [item for item in manifests if item["kind"] == "Pod"]
    assert not _matches(selector, test_pod["metadata"]["labels"])
