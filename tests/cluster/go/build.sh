#!/usr/bin/env bash
# Builds the tier-3 test cluster's binaries from their upstream Go modules into
#   ${KUBETUNE_BIN_CACHE:-~/.cache/kubetune/bin}/<k8s-version>/
# Idempotent: a binary that is already there is skipped, so only a machine's first run pays
# (the Go module and build caches live in Go's default locations). Prints each build's time.
#   build.sh            build what is missing
#   build.sh --update   regenerate go.mod/go.sum from versions.env first (needs the proxy)
#   build.sh --print-dir  print the binary directory and exit
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
bin_dir="${KUBETUNE_BIN_CACHE:-$HOME/.cache/kubetune/bin}/${K8S_VERSION}"

case "${1:-}" in
  --print-dir) echo "$bin_dir"; exit 0 ;;
  --update) "$here/gomod.sh" ;;
  "") ;;
  *) echo "usage: $0 [--update|--print-dir]" >&2; exit 2 ;;
esac

# The go.mod files are generated from versions.env; refuse to build a stale pin.
grep -q "k8s.io/kubernetes v${K8S_VERSION}\$" "$here/kubernetes/go.mod" \
  && grep -q "go.etcd.io/etcd/server/v3 v${ETCD_VERSION}\$" "$here/etcd/go.mod" \
  && grep -q "sigs.k8s.io/kwok v${KWOK_VERSION}\$" "$here/kwok/go.mod" \
  && grep -q "helm.sh/helm/v${HELM_VERSION%%.*} v${HELM_VERSION}\$" "$here/helm/go.mod" \
  && grep -q "github.com/coredns/coredns v${COREDNS_VERSION}\$" "$here/coredns/go.mod" \
  || { echo "go.mod files do not match versions.env: run $0 --update" >&2; exit 1; }

command -v go >/dev/null || { echo "go is not installed (apt-get install golang or /usr/local/go)" >&2; exit 1; }
mkdir -p "$bin_dir"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -mod=readonly"
total_start=$SECONDS
built=0

build() {  # module-dir output-name main-package [extra ldflags]
  local dir="$1" name="$2" pkg="$3" extra="${4:-}"
  if [[ -x "$bin_dir/$name" ]]; then
    echo "skip   $name (cached in $bin_dir)"
    return
  fi
  local start=$SECONDS
  echo "build  $name from $pkg ..."
  # Build to a temporary name and rename, so an interrupted build never leaves a broken binary.
  (cd "$here/$dir" && go build -trimpath -ldflags="-s -w $extra" -o "$bin_dir/.$name.tmp" "$pkg")
  mv "$bin_dir/.$name.tmp" "$bin_dir/$name"
  built=$((built + 1))
  echo "built  $name in $((SECONDS - start)) s"
}

# kube's version stamp, so `kubectl version` and /version report the pinned release.
kv="k8s.io/component-base/version"
kube_ld="-X $kv.gitVersion=v${K8S_VERSION} -X $kv.gitMajor=1 -X $kv.gitMinor=$(cut -d. -f2 <<<"$K8S_VERSION")"
kube_ld+=" -X $kv.gitTreeState=clean"

build etcd etcd go.etcd.io/etcd/server/v3
build kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kube_ld"
build kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$kube_ld"
build kubernetes kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$kube_ld"
build kubernetes kubectl k8s.io/kubernetes/cmd/kubectl "$kube_ld"
# The real node: kubelet and kube-proxy from the same release as the control plane.
build kubernetes kubelet k8s.io/kubernetes/cmd/kubelet "$kube_ld"
build kubernetes kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$kube_ld"
build coredns coredns github.com/coredns/coredns
build pause pause .
build kwok kwok sigs.k8s.io/kwok/cmd/kwok
# As helm's own Makefile: the Kubernetes version that `helm template` and `helm lint` assume
# offline is the minor of the client-go it is built with (else v1.20, below every chart's
# kubeVersion).
helm_kube_minor="$(cd "$here/helm" && go list -m -f '{{.Version}}' k8s.io/client-go | cut -d. -f2)"
helm_ld="-X helm.sh/helm/v3/internal/version.version=v${HELM_VERSION}"
for pkg in pkg/lint/rules pkg/chartutil; do
  helm_ld+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$helm_kube_minor"
done
build helm helm helm.sh/helm/v3/cmd/helm "$helm_ld"
# kwok ships no stages inside its binary (kwokctl passes them); take the "fast" node and pod
# stages, and node heartbeats through Leases, from the pinned kwok module's own kustomize files.
if [[ ! -s "$bin_dir/kwok-stages.yaml" ]]; then
  kwok_src="$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  stage="$kwok_src/kustomize/stage"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    echo "---"
    cat "$stage/$f"
  done >"$bin_dir/.kwok-stages.yaml.tmp"
  mv "$bin_dir/.kwok-stages.yaml.tmp" "$bin_dir/kwok-stages.yaml"
  echo "wrote  kwok-stages.yaml from $stage"
fi
echo "done: $built built in $((SECONDS - total_start)) s; binaries in $bin_dir"
