#!/usr/bin/env bash
# The test command: in the engine's environment (.venv-engine: Python 3.12,
# current JAX), the backend-agnostic model tests under JAX and the engine's
# own tests; then the linter (ruff, configured in pyproject.toml; it lives in
# the TFX venv, built meanwhile) and the rest of the suite in the TFX
# environment (.venv) under the TensorFlow backend, which runs the model
# tests a second time on TF and Keras 3.12.
# Extra arguments go to both pytest runs; a run whose selection is empty
# (pytest's exit 5, e.g. `-k trainer` in the engine run) is not a failure.
# Each run spreads its test files over one pytest-xdist worker per core
# (`--dist loadfile`: a file's tests and module fixtures stay in one worker;
# most tests are single-threaded Python, so two cores take ~half the time).
# TEST_WORKERS=0 runs them in-process, one after another.
# What the tests need outside the venvs (headless chromium) is installed first.
# The venvs come from scripts/bootstrap.sh (a no-op when they are up to date);
# on a fresh clone the TFX venv is built while the engine's tests run: its pip
# is one process, and the tests leave a core idle part of the time.
set -euo pipefail
cd "$(dirname "$0")/.."
# The ML Metadata on MySQL tests start a throwaway MariaDB from these binaries.
scripts/ensure_mariadb.sh
scripts/install_test_deps.sh  # chromium, for the run report's browser test
scripts/bootstrap.sh engine
scripts/bootstrap.sh tfx & tfx_venv=$!
trap 'kill "$tfx_venv" 2>/dev/null || true' EXIT  # a failed engine run stops the build too
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0
WORKERS=(-n "${TEST_WORKERS:-$(nproc)}" --dist loadfile)
[[ "${TEST_WORKERS:-}" == 0 ]] && WORKERS=()
ENGINE_TESTS=(tests/unit/model tests/integration/test_engine.py tests/integration/test_expert_parallel.py)

pytest_in() {  # pytest_in PYTHON ARGS...
  local python="$1" rc=0
  shift
  "$python" -m pytest -p no:cacheprovider -q --durations=25 "${WORKERS[@]}" "$@" || rc=$?
  [[ $rc -eq 0 || $rc -eq 5 ]] || exit "$rc"
}

echo "== pytest in .venv-engine (KERAS_BACKEND=jax: model tests, engine tests)"
PYTHONPATH="$PWD" KERAS_BACKEND=jax pytest_in .venv-engine/bin/python "${ENGINE_TESTS[@]}" "$@"
wait "$tfx_venv" || { echo "scripts/bootstrap.sh tfx failed (its messages are above)" >&2; exit 1; }
trap - EXIT
echo "== ruff check"
.venv/bin/ruff check .
echo "== pytest in .venv (KERAS_BACKEND=tensorflow: all other tests, model tests again)"
KERAS_BACKEND=tensorflow pytest_in .venv/bin/python --ignore=tests/integration/test_engine.py \
  --ignore=tests/integration/test_expert_parallel.py "$@"
