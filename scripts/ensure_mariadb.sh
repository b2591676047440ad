#!/usr/bin/env bash
# Installs MariaDB's server binaries (Debian's mariadb-server) when missing:
# the ML Metadata on MySQL tests start a throwaway server from them
# (tests/support/mariadb_server.py) on a temporary data directory; nothing here
# starts or configures the system service.
set -euo pipefail
if command -v mariadbd >/dev/null 2>&1 && command -v mariadb-install-db >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_mariadb: mariadbd not found and no apt-get; install MariaDB (>= 10.6) yourself" >&2
  exit 1
fi
SUDO=""
[[ "$(id -u)" != 0 ]] && SUDO="sudo"
echo "ensure_mariadb: installing mariadb-server (apt-get)" >&2
$SUDO apt-get update -q >/dev/null
# policy-rc.d 101: the package's scripts must not start the system service.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee $policy >/dev/null && $SUDO chmod +x $policy
  trap '$SUDO rm -f '"$policy" EXIT
fi
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends mariadb-server >/dev/null
command -v mariadbd >/dev/null
