#!/usr/bin/env bash
# Creates (or reuses) the project environment at .venv/ from the lock file.
# Idempotent: a stamp holding the hash of the lock file and pyproject.toml
# makes a second call a no-op until either changes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.deepseek-tfx-stamp"
want="$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

find_python() {
  local candidates=()
  [[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)/versions/3.10.13/bin/python")
  fi
  candidates+=("$HOME/.pyenv/versions/3.10.13/bin/python" python3.10)
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))'; then
      echo "$py"; return 0
    fi
  done
  echo "bootstrap: Python 3.10 not found (TFX 1.16 needs it); set PYTHON=/path/to/python3.10" >&2
  return 1
}

PY="$(find_python)"
echo "bootstrap: creating $VENV with $PY (one-off, a few minutes)" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip==24.2" "setuptools==75.1.0" "wheel==0.44.0"
# The lock is the full resolved set, so no resolver run is needed (--no-deps).
"$VENV/bin/python" -m pip install -q --no-deps -r requirements/lock.txt
# A PEP 660 editable install (pyproject.toml), built by the setuptools pinned
# above: no build isolation, so no download.
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
echo "bootstrap: $VENV ready" >&2
