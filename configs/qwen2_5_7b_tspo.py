"""TSPO on Qwen2.5-7B with Search-R1's recipe: configs/qwen2_5_3b_tspo.py with the 7B model.

  export TSPO_MODEL_DIR=/path/to/Qwen2.5-7B TSPO_DATA_DIR=/path/to/nq_hotpotqa_train
  python -m tspo_jax.train --config=configs/qwen2_5_7b_tspo.py:tpu_v5e_64 --workdir=runs/qwen2_5_7b_tspo

Meshes as in configs/qwen2_5_3b_tspo.py, except tpu_v4_32 = (1, 4, 4) (see MESHES). The fp32 training state (5 x 30.5 GB: params,
Adam moments, gradient accumulator, reference) is 19 GB per GPU on gpu8 and 2.4 GB per chip on
tpu_v5e_64. The rollout's bf16 KV cache is 57 KB per token (28 layers x 4 KV heads x 128 x K,V),
so 2,560 rows x 4,608 positions need 676 GB in all: more than 8 x 80 GB GPUs hold next to the
model. On one 8-GPU node, lower prompts_per_step (e.g. --config.prompts_per_step=256) or use a
pod slice.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "tspo_qwen2_5_3b_tspo_config", os.path.join(os.path.dirname(__file__), "qwen2_5_3b_tspo.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

# 3B's meshes, except on a v4-32 slice. 7B's 4 KV heads split over tensor=4, so there each chip
# holds a quarter of its rows' KV cache, and the bf16 decode copy of the params (15.2 GB) a quarter
# too. Pure fsdp (1, 16, 1) as 3B uses would put that whole copy (15.2 GB) and 10.5 GB of cache on
# every 30.75 GiB v4 chip beside 7.6 GB of fp32 training state.
MESHES = {**_base.MESHES, "tpu_v4_32": (1, 4, 4)}
# One row per batch device per micro-batch on v5e (16 GB chips), two on v4 (4 batch devices).
TPU_MICRO_BATCH = {"tpu_v4_32": 8, "tpu_v5e_64": 16}
# 320 slots on v4-32: 640 would be 10.5 GiB of cache per chip (only 4 batch devices split the rows).
TPU_ROLLOUT = {"tpu_v4_32": dict(slots=320, fill_rows=32), "tpu_v5e_64": dict(slots=640, fill_rows=64)}


def get_config(arg: str = _base.DEFAULT_MESH):
    # micro_batch 32: 7B's 28 heads make the [rows, heads, T, T] attention scores of a 4,608-token
    # micro-batch twice 3B's, so half the rows per slice (4 per GPU on gpu8).
    c = _base.search_r1_config("qwen2.5-7b", "Qwen2.5-7B", arg, micro_batch=32, meshes=MESHES,
                               tpu_micro_batch=TPU_MICRO_BATCH, tpu_rollout=TPU_ROLLOUT)
    return c
