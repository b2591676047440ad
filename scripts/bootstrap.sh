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
  # Bytecode is compiled after, by compileall on every core, not by pip on one
  # (a file that does not compile, e.g. a package's Python 2 test data, is
  # skipped as pip skips it).
  "$venv/bin/python" -m pip install -q --no-deps --no-compile -r "$lock"
  "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
}

# --- the TFX environment
tfx_env() {
  local venv=.venv want py
  local stamp="$venv/.deepseek-tfx-stamp"
  want="$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
  [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return 0
  py="$(find_python 3.10 3.10.13 PYTHON "TFX 1.16 needs it")"
  make_venv "$venv" "$py" requirements/lock.txt
  # A PEP 660 editable install (pyproject.toml), built by the setuptools pinned
  # above: no build isolation, so no download.
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
  echo "bootstrap: $venv ready" >&2
}

# --- the engine's environment (no project install: training.launch puts this
# checkout on the child's PYTHONPATH, scripts/run_tests.sh does the same)
engine_env() {
  local venv=.venv-engine want py
  local stamp="$venv/.deepseek-tfx-stamp"
  want="$(sha256sum requirements/engine-lock.txt | cut -d' ' -f1)"
  [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && return 0
  py="$(find_python 3.12 3.12.1 PYTHON_ENGINE "the engine's lock is for it")"
  make_venv "$venv" "$py" requirements/engine-lock.txt
  echo "$want" > "$stamp"
  echo "bootstrap: $venv ready" >&2
}

# `bootstrap.sh tfx` or `bootstrap.sh engine`: that one only (the test
# command builds the TFX venv while the engine's tests run). Without an
# argument both at once: each pip is one process, mostly one core (unpacking,
# compiling bytecode), so two cores build the pair in about the time of the
# larger. A venv gets its stamp only when its own build succeeded; either
# failing fails the bootstrap after the other has finished.
case "${1:-both}" in
  tfx) tfx_env; exit ;;
  engine) engine_env; exit ;;
  both) ;;
  *) echo "bootstrap: unknown argument '$1' (tfx, engine or none for both)" >&2; exit 2 ;;
esac
tfx_env & tfx_pid=$!
engine_env & engine_pid=$!
rc=0
wait "$tfx_pid" || rc=1
wait "$engine_pid" || rc=1
exit "$rc"
