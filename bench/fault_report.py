"""The fault suite's figures as README's table.

    python -m bench.fault_report [directory]   (default: ADP_FAULTS_RESULTS or .cache/faults)

Each scenario of tests/e2e/test_faults.py saves a JSON file of its figures there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def table(directory: Path) -> str:
    rows = [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]
    lines = [
        "| scenario | sent | accepted (201) | written | duplicated | lost | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['sent']} | {row['accepted']} | {row['written']} "
            f"| {row['duplicated']} | {row['lost']} | {row['notes']} |"
        )
    return "\n".join(lines)


def main() -> None:
    default = os.environ.get("ADP_FAULTS_RESULTS", ".cache/faults")
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else default)
    if not directory.is_dir():
        raise SystemExit(f"no figures in {directory}: run the fault suite first")
    print(table(directory))


if __name__ == "__main__":
    main()
