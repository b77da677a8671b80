#!/usr/bin/env bash
# Installs the system packages kvfleet needs, skipping those already there (idempotent).
#   install-deps.sh            build dependencies (libclang for RocksDB's bindgen; Python for
#                              the Helm chart check)
#   install-deps.sh --bench    plus the servers the benchmarks compare against (Redis, etcd)
#   install-deps.sh --control-plane
#                              plus what scripts/control-plane.sh builds the Kubernetes control
#                              plane with (Go 1.19 and Debian's reflect2) and etcd
set -euo pipefail

packages=(libclang-dev python3 python3-venv)
case "${1:-}" in
  --bench) packages+=(redis-server etcd-server etcd-client) ;;
  --control-plane) packages+=(golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev etcd-server curl openssl) ;;
esac

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
  echo "install-deps: ${packages[*]} already installed"
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts the servers it installs; the benchmarks start their own instances instead.
if [[ " ${missing[*]} " == *" redis-server "* ]]; then $sudo service redis-server stop >/dev/null 2>&1 || true; fi
if [[ " ${missing[*]} " == *" etcd-server "* ]]; then $sudo service etcd stop >/dev/null 2>&1 || true; fi
echo "install-deps: done"
