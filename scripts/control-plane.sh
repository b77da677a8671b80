#!/usr/bin/env bash
# Builds a real Kubernetes control plane for the tests, offline from Debian 12's own packages:
# kube-apiserver, kube-controller-manager and kube-scheduler 1.20.2 from the `kubernetes` source
# package (Debian ships only kubectl from it), compiled with Debian's Go 1.19; etcd 3.4 is
# Debian's `etcd-server`. No newer Kubernetes can be had on these machines (see README).
#
# Idempotent and cached: the binaries go to $KVFLEET_K8S_DIR/bin (default
# ~/.cache/kvfleet-k8s/v1.20.2/bin) and are built only when missing (about 4 minutes on 2 cores).
# The last line printed is the bin directory.
#
# Two things keep 1.20.2 from building as shipped, both fixed here as the Debian maintainers
# would: the vendored github.com/modern-go/reflect2 breaks on Go 1.18+ (replaced by Debian's
# 1.0.2), and pkg/generated/openapi is generated at build time by the upstream Makefile, which
# needs its own toolchain (run by hand here, with the same inputs).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.20.2
DEBIAN_VERSION=1.20.5+really1.20.2
TARBALL="kubernetes_${DEBIAN_VERSION}.orig.tar.gz"
TARBALL_URL="http://deb.debian.org/debian/pool/main/k/kubernetes/kubernetes_${DEBIAN_VERSION//+/%2B}.orig.tar.gz"
# From the source package's .dsc (Checksums-Sha256).
TARBALL_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
K8S_DIR="${KVFLEET_K8S_DIR:-$HOME/.cache/kvfleet-k8s/v$VERSION}"
BIN="$K8S_DIR/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

scripts/install-deps.sh --control-plane >&2

# Bumped whenever this recipe changes what it builds, so caches built by an older one are redone.
RECIPE=2

built() {
  for binary in "${BINARIES[@]}"; do
    [[ -x "$BIN/$binary" ]] || return 1
  done
  [[ "$(cat "$BIN/recipe" 2>/dev/null)" == "$RECIPE" ]] && [[ "$("$BIN/kube-apiserver" --version)" == "Kubernetes v$VERSION" ]]
}

if built; then
  echo "control-plane: Kubernetes v$VERSION already built in $BIN" >&2
  echo "$BIN"
  exit 0
fi

echo "control-plane: building Kubernetes v$VERSION (kube-apiserver, kube-controller-manager, kube-scheduler) into $BIN" >&2
mkdir -p "$K8S_DIR"
if ! echo "$TARBALL_SHA256  $K8S_DIR/$TARBALL" | sha256sum --check --status 2>/dev/null; then
  curl --fail --silent --show-error --location --retry 3 -o "$K8S_DIR/$TARBALL.part" "$TARBALL_URL"
  echo "$TARBALL_SHA256  $K8S_DIR/$TARBALL.part" | sha256sum --check --status \
    || { echo "control-plane: $TARBALL does not match its Debian checksum" >&2; exit 1; }
  mv "$K8S_DIR/$TARBALL.part" "$K8S_DIR/$TARBALL"
fi

work="$K8S_DIR/build"
rm -rf "$work"
mkdir -p "$work/gopath/src/k8s.io"
tar xzf "$K8S_DIR/$TARBALL" -C "$work"
mv "$work/kubernetes-$VERSION" "$work/gopath/src/k8s.io/kubernetes"
src="$work/gopath/src/k8s.io/kubernetes"
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"

export GOPATH="$work/gopath" GO111MODULE=off GOFLAGS= GOCACHE="$work/gocache" GOTOOLCHAIN=local
export PATH="/usr/lib/go-1.19/bin:$PATH"
cd "$src"

# pkg/generated/openapi, as build/root/Makefile.generated_files makes it: every package (but the
# code generator's and the sample API server's) with a +k8s:openapi-gen tag.
go build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
inputs=$(
  {
    grep -rl --include='*.go' '^// *+k8s:openapi-gen=' pkg cmd plugin third_party || true
    grep -Rl --include='*.go' '^// *+k8s:openapi-gen=' vendor || true
  } | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
    | xargs -n1 dirname | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -
)
"$work/openapi-gen" -i "$inputs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$work/openapi-violations.report"

# Without the version stamp /version says v0.0.0, and clients (kube-rs among them) see a
# server older than any they support.
ldflags="-s -w"
for version_pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $version_pkg.gitVersion=v$VERSION -X $version_pkg.gitMajor=1 -X $version_pkg.gitMinor=20"
  ldflags+=" -X $version_pkg.gitTreeState=clean -X $version_pkg.buildDate=2021-01-13T00:00:00Z"
done
mkdir -p "$BIN"
for binary in "${BINARIES[@]}"; do
  echo "control-plane: go build $binary" >&2
  go build -ldflags "$ldflags" -o "$BIN/$binary.part" "./cmd/$binary"
  mv "$BIN/$binary.part" "$BIN/$binary"
done
echo "$RECIPE" > "$BIN/recipe"
cd /
rm -rf "$work"
built || { echo "control-plane: the build did not produce working binaries" >&2; exit 1; }
echo "control-plane: built Kubernetes v$VERSION in $BIN" >&2
echo "$BIN"
