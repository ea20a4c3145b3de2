#!/usr/bin/env bash
# Installs tspo_jax into .venv and runs the embedded default: a TSPO training of a small Qwen2 policy
# on the shipped multi-hop search task (a weak-searcher warm start, then 40 RL steps against
# MiniLM + ScaNN), then a short version of the pre-registered comparison (README): TSPO vs GRPO,
# 2 RL seeds of COMPARE_STEPS steps from the same warm start. Everything lands in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check -r requirements.txt
pip install -q --disable-pip-version-check --no-deps -e .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m tspo_jax.train --config=configs/demo.py --workdir=runs/demo "$@"
STEPS="${COMPARE_STEPS:-10}"
python -m tspo_jax.compare --config=configs/demo.py --workdir=runs/compare --warmstart_from=runs/demo/warmstart \
  --warmstart_seeds=0 --methods=tspo,grpo --seeds=0,1 --config.total_steps="$STEPS" --config.eval.every="$STEPS"
echo "trained model, metrics and plot: runs/demo; comparison: runs/compare/comparison.{md,png}"
