#!/usr/bin/env bash
# Install the system (Debian) packages the test suite needs; safe to run again.
#
# Chromium, for the headless browser tests (tests/test_report.py,
# tests/test_locust_ui.py), and iproute2 and util-linux (`ip`, `nsenter`) for the
# node namespaces of `--nodes` (tests/test_netns.py, tests/test_nodes.py). Needs
# root (CI and developer machines run as root).
# `apt-get update` runs once, only when something is missing.
set -euo pipefail

packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v ip >/dev/null 2>&1 || packages+=(iproute2)
command -v nsenter >/dev/null 2>&1 || packages+=(util-linux)

if [ "${#packages[@]}" -eq 0 ]; then
    echo "install-system-deps: nothing to install"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps: need root to install: ${packages[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${packages[@]}"
echo "install-system-deps: installed ${packages[*]}"
