#!/usr/bin/env bash
# Plans every shipped Search-R1-scale config on its named slice (docs/POD_PLAN.md): one
# python -m tspo_jax.plan per config x topology, JSON + markdown into $OUT (default plans/), then
# the summary table. Full-size compiles take minutes each on a small CPU host; needs libtpu
# (pip install -r requirements-dev.txt). Extra flags go to every plan, e.g. --only=update.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-plans}
mkdir -p "$OUT"
# Mean episode lengths the step is also projected at (an assumption, not a measurement: pass your
# run's own from its metrics.jsonl: prompt tokens, response tokens per turn, turns, observation
# tokens, searches).
LENGTHS=${LENGTHS:-prompt=200,turn=150,turns=3,obs=450,searches=2}
PLANS=(
  "configs/qwen2_5_3b_tspo.py:tpu_v5e_64 v5e-64"
  "configs/qwen2_5_3b_tspo.py:tpu_v4_32 v4-32"
  "configs/qwen2_5_7b_tspo.py:tpu_v5e_64 v5e-64"
  "configs/qwen2_5_7b_tspo.py:tpu_v4_32 v4-32"
  "configs/qwen2_5_3b_grpo.py:tpu_v5e_64 v5e-64"
  "configs/qwen2_5_3b_grpo.py:tpu_v4_32 v4-32"
  "configs/qwen2_5_0_5b_offline.py host"
)
status=0
for p in "${PLANS[@]}"; do
  read -r config topology <<<"$p"
  name=$(basename "${config%%:*}" .py)_${topology}
  echo "== $config on $topology"
  JAX_PLATFORMS=cpu python -m tspo_jax.plan --config="$config" --topology="$topology" --out="$OUT/$name.json" \
    --lengths="$LENGTHS" "$@" \
    > "$OUT/$name.log" 2>&1 || { status=1; grep "DOES NOT FIT" "$OUT/$name.log" || tail -3 "$OUT/$name.log"; }
done
python -c "import json, sys; from tspo_jax.planner import report; \
print(report.summary([json.load(open(f)) for f in sys.argv[1:]]))" "$OUT"/*.json
exit $status
