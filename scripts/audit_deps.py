"""Known vulnerabilities in the service's runtime dependencies, from PyPI's own data.

    python scripts/audit_deps.py [--extra operator]

pip-audit cannot run on these machines: PyPI's per-release JSON API answers with empty
bodies and OSV is unreachable, so it audits nothing. PyPI's per-project JSON API does
answer, and lists the known vulnerabilities (PYSEC/GHSA/CVE ids) of the project's *latest*
release. So: every distribution the installed `async-data-processor` needs at run time
(its requirements, recursively, with the given extras) that is at its latest release is
audited, and any known vulnerability fails the run (exit 1); one that is behind its latest
release cannot be audited from this data and is listed as such (not a failure: pip
installs the newest allowed release, so being behind means a pin or a constraint to look
at). Network trouble is a failure, never a silent pass. `make audit` runs the real
pip-audit where PyPI's full API or OSV is reachable.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
import sys
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from packaging.requirements import Requirement

PROJECT = "async-data-processor"
Fetch = Callable[[str], dict[str, Any]]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(project: str, extras: Iterable[str]) -> dict[str, str]:
    """name -> installed version of every distribution `project` needs at run time."""
    found: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(project, frozenset(extras))]
    while pending:
        name, wanted = pending.pop()
        dist = metadata.distribution(name)
        key = canonical(dist.metadata["Name"])
        if key in found and not wanted:
            continue
        found[key] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            active = marker is None or any(
                marker.evaluate({"extra": extra}) for extra in (wanted or {""})
            )
            if active:
                pending.append((requirement.name, frozenset(requirement.extras)))
    found.pop(canonical(project), None)
    return found


def pypi(name: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as answer:
        document: dict[str, Any] = json.load(answer)
    return document


@dataclass
class Report:
    audited: dict[str, str] = field(default_factory=dict)
    behind: dict[str, tuple[str, str]] = field(default_factory=dict)  # installed, latest
    vulnerable: dict[str, list[str]] = field(default_factory=dict)


def audit(dists: dict[str, str], fetch: Fetch = pypi) -> Report:
    report = Report()
    with ThreadPoolExecutor(8) as pool:
        documents = dict(zip(dists, pool.map(fetch, dists), strict=True))
    for name, installed in sorted(dists.items()):
        document = documents[name]
        latest = document["info"]["version"]
        if latest != installed:
            report.behind[name] = (installed, latest)
            continue
        report.audited[name] = installed
        known = [
            f"{v.get('id')} (fixed in {', '.join(v.get('fixed_in') or []) or 'no release'})"
            for v in document.get("vulnerabilities") or []
            if not v.get("withdrawn")
        ]
        if known:
            report.vulnerable[name] = known
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--extra", action="append", default=[])
    args = parser.parse_args()
    dists = runtime_closure(PROJECT, args.extra)
    try:
        report = audit(dists)
    except OSError as exc:
        print(f"audit: PyPI unreachable ({exc}): nothing audited", file=sys.stderr)
        return 2
    for name, (installed, latest) in report.behind.items():
        print(f"audit: {name} {installed} is behind {latest}: not auditable from PyPI's data")
    for name, known in report.vulnerable.items():
        print(f"audit: {name} {report.audited[name]}: {'; '.join(known)}")
    print(
        f"audit: {len(report.audited)} of {len(dists)} runtime distributions audited, "
        f"{len(report.vulnerable)} with known vulnerabilities, {len(report.behind)} not auditable"
    )
    return 1 if report.vulnerable else 0


if __name__ == "__main__":
    sys.exit(main())
