#!/usr/bin/env bash
# Lint, render and validate the Helm chart with the real tools; no Kubernetes cluster needed.
#   helm lint --strict             the chart, with its default values
#   helm template                  the default values and every deploy/helm/.../ci/*.yaml
#   kubernetes-validate --strict   every rendered object, against Kubernetes 1.30 and the
#                                  newest version the package ships (ServiceMonitors, custom
#                                  resources, are skipped with a warning)
# helm comes from scripts/helm.sh (fetched once into .cache/); kubernetes-validate from the
# virtualenv. Prints one line per check; exits 1 if any failed.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh
chart=deploy/helm/async-data-processor
bin=.venv/bin

if [[ ! -x $bin/kubernetes-validate ]]; then
  echo "check-chart: $bin/kubernetes-validate missing; run \`make install\`" >&2
  exit 1
fi
helm=$(scripts/helm.sh)
newest=$("$bin/python" -c 'from kubernetes_validate.utils import latest_version; print(latest_version())')
versions=(1.30.0 "$newest")

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

check "helm lint --strict $chart" "$helm" lint --strict "$chart"

# ci/default-values.yaml ({}) renders the defaults; chart-testing (ct) reads ci/ the same way.
for values in "$chart"/ci/*-values.yaml; do
  name=$(basename "$values" .yaml)
  rendered=$scratch/$name.yaml
  if check "helm template -f ${values#"$chart"/}" "$helm" template adp "$chart" \
    --namespace adp --include-crds -f "$values" --output-dir "$scratch/$name" \
    --api-versions monitoring.coreos.com/v1/ServiceMonitor; then
    find "$scratch/$name" -name '*.yaml' -print0 | sort -z | xargs -0 cat >"$rendered"
    for version in "${versions[@]}"; do
      # --quiet: only warnings (the skipped custom resources) and failures are printed.
      check "kubernetes-validate --strict -k $version ${values#"$chart"/}" \
        "$bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered"
    done
  fi
done

finish check-chart
