#!/usr/bin/env bash
# Creates (or reuses) the project's two environments from their lock files:
#   .venv/         Python 3.10, TFX 1.16 / TF 2.16 (requirements/lock.txt): the
#                  pipeline, its components, the export and serving;
#   .venv-engine/  Python 3.12, current JAX + Keras (requirements/engine-lock.txt):
#                  the training engine's child process (training.launch finds it).
# Idempotent: each venv has a stamp holding the hash of what built it, so a
# second call is a no-op until a lock (or pyproject.toml) changes.
set -euo pipefail
cd "$(dirname "$0")/.."

# find_python MAJOR.MINOR PYENV_VERSION VARIABLE WHY
find_python() {
  local want="$1" pyenv_version="$2" override="$3" why="$4" candidates=()
  [[ -n "${!override:-}" ]] && candidates+=("${!override}")
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)/versions/$pyenv_version/bin/python")
  fi
  candidates+=("$HOME/.pyenv/versions/$pyenv_version/bin/python" "python$want")
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 \
        && "$py" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] != '$want')"; then
      echo "$py"; return 0
    fi
  done
  echo "bootstrap: Python $want not found ($why); set $override=/path/to/python$want" >&2
  return 1
}

# make_venv DIR PYTHON LOCK
make_venv() {
  local venv="$1" py="$2" lock="$3"
  echo "bootstrap: creating $venv with $py (one-off, a few minutes)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade "pip==24.2" "setuptools==75.1.0" "wheel==0.44.0"
  # The lock is the full resolved set, so no resolver run is needed (--no-deps).
  "$venv/bin/python" -m pip install -q --no-deps -r "$lock"
}

# --- the TFX environment
VENV=.venv
STAMP="$VENV/.deepseek-tfx-stamp"
want="$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if ! [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  PY="$(find_python 3.10 3.10.13 PYTHON "TFX 1.16 needs it")"
  make_venv "$VENV" "$PY" requirements/lock.txt
  # A PEP 660 editable install (pyproject.toml), built by the setuptools pinned
  # above: no build isolation, so no download.
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
  echo "bootstrap: $VENV ready" >&2
fi

# --- the engine's environment (no project install: training.launch puts this
# checkout on the child's PYTHONPATH, scripts/run_tests.sh does the same)
ENGINE_VENV=.venv-engine
ENGINE_STAMP="$ENGINE_VENV/.deepseek-tfx-stamp"
engine_want="$(sha256sum requirements/engine-lock.txt | cut -d' ' -f1)"
if ! [[ -x "$ENGINE_VENV/bin/python" && -f "$ENGINE_STAMP" \
        && "$(cat "$ENGINE_STAMP")" == "$engine_want" ]]; then
  PY="$(find_python 3.12 3.12.1 PYTHON_ENGINE "the engine's lock is for it")"
  make_venv "$ENGINE_VENV" "$PY" requirements/engine-lock.txt
  echo "$engine_want" > "$ENGINE_STAMP"
  echo "bootstrap: $ENGINE_VENV ready" >&2
fi
