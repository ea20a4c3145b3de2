#!/usr/bin/env bash
# Installs tspo_jax into .venv and runs the embedded default: a TSPO training of a small Qwen2 policy
# on the shipped multi-hop search task (warm start, then RL against MiniLM + ScaNN), then the
# TSPO-vs-GRPO comparison over 3 seeds from the same warm start. Everything lands in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check -r requirements.txt
pip install -q --disable-pip-version-check --no-deps -e .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m tspo_jax.train --config=configs/demo.py --workdir=runs/demo "$@"
python -m tspo_jax.compare --config=configs/demo.py --workdir=runs/compare --warmstart_from=runs/demo/warmstart \
  --methods=tspo,grpo --seeds=0,1,2 --config.total_steps="${COMPARE_STEPS:-10}" --config.eval.every="${COMPARE_STEPS:-10}"
echo "trained model, metrics and plot: runs/demo; comparison: runs/compare/comparison.{md,png}"
