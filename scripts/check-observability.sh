#!/usr/bin/env bash
# Check the observability files with the real tools:
#   deploy/prometheus/alerts.yml                          promtool check rules
#   deploy/prometheus/alerts.test.yml                     promtool test rules (unit tests)
#   deploy/grafana/dashboards/async-data-processor.json   valid JSON, unique panel ids, every
#                                                         panel and query on ${datasource}
# One line per check; exits non-zero on the first failure. Works from anywhere (it moves to
# the repository root). Installs Debian's `prometheus` package (promtool, and the prometheus
# server tests/deploy/test_dashboard.py runs) when promtool is missing: run as root for that,
# as CI does here.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

rules=deploy/prometheus/alerts.yml
rule_tests=deploy/prometheus/alerts.test.yml
dashboard=deploy/grafana/dashboards/async-data-processor.json
python=${PYTHON:-$(command -v python3)}

need promtool=prometheus

check "promtool check rules ${rules}" promtool check rules "${rules}"
check "promtool test rules ${rule_tests}" promtool test rules "${rule_tests}"
check "dashboard ${dashboard}: valid JSON, unique panel ids, every panel and target on \${datasource}" \
  "${python}" - "${dashboard}" <<'PY'
import json
import sys

path = sys.argv[1]
try:
    with open(path, encoding="utf-8") as f:
        dashboard = json.load(f)
except (OSError, ValueError) as exc:
    sys.exit(f"{path}: {exc}")


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))  # panels inside collapsed rows


def uses_variable(ref):
    return ref == "${datasource}" or (isinstance(ref, dict) and ref.get("uid") == "${datasource}")


problems = []
seen = {}
all_panels = list(panels(dashboard.get("panels", [])))
if not all_panels:
    problems.append("no panels")
for panel in all_panels:
    name = f"panel {panel.get('id')} ({panel.get('title')!r})"
    if not isinstance(panel.get("id"), int):
        problems.append(f"{name}: no integer id")
    elif panel["id"] in seen:
        problems.append(f"{name}: id also used by {seen[panel['id']]!r}")
    else:
        seen[panel["id"]] = panel.get("title")
    if not uses_variable(panel.get("datasource")):
        problems.append(f"{name}: datasource is {panel.get('datasource')!r}, not ${{datasource}}")
    for target in panel.get("targets", []):
        if "datasource" in target and not uses_variable(target["datasource"]):
            problems.append(f"{name} target {target.get('refId')}: datasource is not ${{datasource}}")
        if not target.get("expr"):
            problems.append(f"{name} target {target.get('refId')}: no expr")
if problems:
    sys.exit("\n".join(problems))
PY

finish check-observability
