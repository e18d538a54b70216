#!/bin/sh
# Prepares a Debian 12 host (or image) to build and run ebpf-net-exporter and its tests:
# Debian packages, kernel headers where bcc looks for them, tracefs. Idempotent.
# Used by `make setup` and by the container image, so the tested path and the image's are one.
#   setup-host.sh           a host: runtime and test packages, /lib/modules links, tracefs
#   setup-host.sh --image   a container image (deploy/Containerfile): runtime packages only,
#                           headers merged into $IMAGE_HEADERS for BCC_KERNEL_SOURCE (the
#                           kernel it will run on is unknown at build time), no mounts
set -eu

image=false
case "${1:-}" in
    --image) image=true ;;
    "") ;;
    *) echo "usage: setup-host.sh [--image]" >&2; exit 2 ;;
esac
IMAGE_HEADERS=/usr/src/linux-headers-merged

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

arch=$(dpkg --print-architecture)
runtime="python3 python3-venv python3-pip python3-bpfcc linux-headers-$arch"
packages="$runtime
iproute2 bpftool nftables procps util-linux curl iperf3 prometheus bind9-dnsutils
dnsmasq-base nginx-light tmux openssl gcc libc6-dev libssl-dev nghttp2-client"
$image && packages="$runtime"

missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup-host: installing$missing"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

if $image; then
    # bcc compiles in one directory; Debian splits the headers into -$arch and -common halves.
    # A tree of symlinks holds both, the -$arch files first (as exporter/environment.py does).
    build=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n 1)
    rm -rf "$IMAGE_HEADERS"
    mkdir -p "$IMAGE_HEADERS"
    cp -as "$build/." "$IMAGE_HEADERS/"
    cp -asn "${build%-"$arch"}-common/." "$IMAGE_HEADERS/"
    test -f "$IMAGE_HEADERS/include/linux/kconfig.h"
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    echo "setup-host: image ready, BCC_KERNEL_SOURCE=$IMAGE_HEADERS"
    exit 0
fi

# bcc compiles against headers in /lib/modules/$(uname -r)/{build,source}. Debian ships the
# headers of its own kernel; on hosts running another kernel link the newest ones (the BPF code
# uses only stable ABI). The exporter can also do without these links (it merges the headers
# under /run itself), but bcc's own tools want them.
release=$(uname -r)
if [ ! -e "/lib/modules/$release/build" ]; then
    build=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$build" ]; then
        common="${build%-"$arch"}-common"
        as_root mkdir -p "/lib/modules/$release"
        as_root ln -sfn "$build" "/lib/modules/$release/build"
        [ -d "$common" ] && as_root ln -sfn "$common" "/lib/modules/$release/source"
        echo "setup-host: linked /lib/modules/$release to $build"
    fi
fi

# tests/deploy render deploy/ with kubectl's kustomize, which must be v4 or newer. Debian's
# kubernetes-client (1.20, kustomize v2) cannot render it; these machines have Google's
# `kubectl` package (1.32, kustomize v5.5) installed.
command -v kubectl >/dev/null 2>&1 ||
    echo "setup-host: no kubectl: tests/deploy need one with kustomize >= v4 (docs/deploy.md)"

mountpoint -q /sys/kernel/tracing || as_root mount -t tracefs nodev /sys/kernel/tracing || true
mountpoint -q /sys/kernel/debug || as_root mount -t debugfs nodev /sys/kernel/debug || true
echo "setup-host: done"
