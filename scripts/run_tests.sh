#!/usr/bin/env bash
# The test command: the linter first (ruff, configured in pyproject.toml),
# then the backend-agnostic model tests under JAX (the GPU machine's
# backend), then the whole suite under the TensorFlow backend (the
# pipeline's). Extra arguments go to both pytest runs. What the tests need
# outside the venv (headless chromium) is installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_test_deps.sh  # chromium, for the run report's browser test
echo "== ruff check"
.venv/bin/ruff check .
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONHASHSEED=0
PYTEST=(.venv/bin/python -m pytest -p no:cacheprovider -q)
echo "== pytest (KERAS_BACKEND=jax, model tests)"
KERAS_BACKEND=jax "${PYTEST[@]}" -m model "$@"
echo "== pytest (KERAS_BACKEND=tensorflow, all tests)"
KERAS_BACKEND=tensorflow "${PYTEST[@]}" "$@"
