#!/usr/bin/env bash
# Unpacks the Kubernetes control-plane kit in $1 (a directory holding kubernetes-*.tar.xz,
# SHA256SUMS and crds/) into ~/.cache/ferry/kube/<checksum>/ after verifying its checksum, and
# prints the exports that point the lab at it. Idempotent: an unpacked kit is reused.
set -euo pipefail
kit_dir=$(cd "$1" && pwd)
(cd "$kit_dir" && sha256sum --quiet -c SHA256SUMS) >&2
tarball=$(ls "$kit_dir"/kubernetes-*.tar.xz | head -n 1)
sum=$(sha256sum "$tarball" | cut -c1-16)
cache="$HOME/.cache/ferry/kube/$sum"
if [ ! -x "$cache/bin/kube-apiserver" ]; then
  rm -rf "$cache.tmp"
  mkdir -p "$cache.tmp"
  tar -xJf "$tarball" -C "$cache.tmp"
  rm -rf "$cache"
  mv "$cache.tmp" "$cache"
fi
"$cache/bin/kube-apiserver" --version >&2
echo "export FERRY_LAB_KUBE_BIN='$cache/bin'"
echo "export FERRY_LAB_SNAPSHOT_CRDS='$kit_dir/crds'"
