"""The GRPO baseline on Qwen2.5-3B: configs/qwen2_5_3b_tspo.py with advantage.name = "grpo".

  python -m tspo_jax.train --config=configs/qwen2_5_3b_grpo.py:gpu8 --workdir=runs/qwen2_5_3b_grpo

Everything else (data, retriever, batch sizes, optimizer, KL, FOLR settings) is identical, so the
two runs differ only in how advantages are computed. The reward config still computes FOLR turn
returns; grpo ignores them.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "tspo_qwen2_5_3b_tspo_config", os.path.join(os.path.dirname(__file__), "qwen2_5_3b_tspo.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)

MESHES = _base.MESHES


def get_config(arg: str = _base.DEFAULT_MESH):
    c = _base.get_config(arg)
    c.advantage.name = "grpo"
    return c
