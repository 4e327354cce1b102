#!/usr/bin/env bash
# Try the chart on a local kind cluster (needs docker, kind, kubectl; helm comes from
# scripts/helm.sh): create the cluster, build and load both images, install the chart, wait
# until everything is ready, then port-forward the API to localhost:8080 (Ctrl+C stops it;
# the cluster stays: `kind delete cluster --name async-data-processor` removes it).
set -euo pipefail

cd "$(dirname "$0")/.."
cluster=async-data-processor
release=adp
namespace=adp
tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' deploy/helm/async-data-processor/Chart.yaml)
helm=$(scripts/helm.sh)

if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --config deploy/kind/kind-config.yaml --wait 120s
fi
kubectl config use-context "kind-$cluster"

for component in api consumer; do
  docker build -f "Dockerfile.$component" -t "async-data-processor-$component:$tag" .
  kind load docker-image --name "$cluster" "async-data-processor-$component:$tag"
done

"$helm" upgrade --install "$release" deploy/helm/async-data-processor \
  --namespace "$namespace" --create-namespace --wait --timeout 5m
kubectl -n "$namespace" rollout status "statefulset/$release-async-data-processor-rabbitmq" --timeout 180s
kubectl -n "$namespace" rollout status "deployment/$release-async-data-processor-api" --timeout 120s
kubectl -n "$namespace" rollout status "statefulset/$release-async-data-processor-consumer" --timeout 120s
# The release's workload pods only: not a `helm test` pod (component "test") left failed by
# an earlier run, which would never be Ready.
kubectl -n "$namespace" wait pod --for=condition=Ready \
  -l "app.kubernetes.io/instance=$release,app.kubernetes.io/component in (api,consumer,rabbitmq,operator)" \
  --timeout 120s
"$helm" test "$release" --namespace "$namespace"

echo "API on http://localhost:8080 (Ctrl+C to stop), e.g.:"
echo "  curl -si localhost:8080/message -d '[{\"timestamp\": \"2019-10-12T07:20:50.52Z\", \"value\": \"A\"}]'"
exec kubectl -n "$namespace" port-forward "service/$release-async-data-processor-api" 8080:8080
