#!/usr/bin/env bash
# What the tests need outside the Python environment: Debian's chromium
# (headless, renders the run report in tests/e2e/test_run_page.py).
# Idempotent; needs root (or sudo) and apt on the first call only.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[[ "$(id -u)" == 0 ]] || SUDO="sudo"
echo "install_test_deps: installing chromium (apt, one-off)" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null
