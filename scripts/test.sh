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
# The real-checkpoint tests compare against transformers on the real 0.5B weights; the build is
# skipped when a complete one exists (~2 min and ~6 GB RAM the first time). TSPO_SKIP_REAL=1 skips it.
if [ "${TSPO_SKIP_REAL:-0}" != 1 ]; then
  python -m tspo_jax.model.build_offline_checkpoint >/dev/null
fi
python -m pytest -q -n "${TEST_WORKERS:-2}" --durations=25 -W ignore::DeprecationWarning "$@"
