#!/usr/bin/env bash
# Installs tspo_jax with its test dependencies into .venv and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check -r requirements-dev.txt
pip install -q --disable-pip-version-check --no-deps -e .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -n "${TEST_WORKERS:-2}" -W ignore::DeprecationWarning "$@"
