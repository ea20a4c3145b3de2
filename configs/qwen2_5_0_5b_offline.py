"""The Search-R1 TSPO recipe on a real checkpoint that is available offline, sized for a CPU.

  python -m tspo_jax.model.build_offline_checkpoint       # once: builds Qwen2.5-Coder-0.5B-Instruct
  python -m tspo_jax.train --config=configs/qwen2_5_0_5b_offline.py --workdir=runs/qwen2_5_0_5b_offline

The same command, recipe and code path as configs/qwen2_5_3b_tspo.py (HF checkpoint, no warm
start, TSPO, lr 1e-6, KL 0.001, ...) with three changes: the model is the real 0.5B instruct
checkpoint the builder writes, the questions and corpus are the shipped demo task (indexed with
MiniLM + ScaNN on first use, as configs/demo.py), and the batch is small enough for a CPU
(4 prompts x 4 rollouts, 128-token turns, 2 search turns, fp32). At lr 1e-6 and a few steps it
shows that the pipeline runs on a real model, not that the model learns.
"""

import importlib.util
import os

import ml_collections

from tspo_jax.demo_task import demo_paths
from tspo_jax.model import qwen2
from tspo_jax.model.build_offline_checkpoint import default_checkpoint_dir

_spec = importlib.util.spec_from_file_location(
    "tspo_qwen2_5_3b_tspo_config", os.path.join(os.path.dirname(__file__), "qwen2_5_3b_tspo.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config() -> ml_collections.ConfigDict:
    c = _base.search_r1_config("qwen2.5-0.5b", "Qwen2.5-0.5B-Instruct", "fsdp_any", micro_batch=2)
    paths = demo_paths()
    c.total_steps = 20
    c.prompts_per_step = 4
    c.group_size = 4
    c.mini_batch = 16  # one optimizer step per training step
    # 2 rows per gradient micro-batch: the update's temporaries scale with it (0.5B fp32, 1,536-token
    # rows: 7.80 GiB at 8 rows, 4.15 GiB at 4), and this machine's 24 GB must also hold the process
    # itself. The documented run used 4 and peaked at 22.6 of 23.5 GiB (docs/POD_PLAN.md); the host
    # plan, which reserves what that run measured, gives 4 less than 10% headroom.
    c.micro_batch = 2
    c.recompute_old_logprobs = False  # fp32 on CPU: the sampler's logprobs are the trainer's
    c.checkpoint_every = 10
    c.mesh.shape = (-1, 1, 1)  # data parallel over whatever devices there are

    checkpoint = default_checkpoint_dir()
    c.model.checkpoint = str(checkpoint)
    # Unused while model.checkpoint is set (its config.json wins); mirrors it when it is built.
    config_json = checkpoint / "config.json"
    c.model.arch = _base.arch_of(
        qwen2.Qwen2Config.from_hf_config(str(config_json)) if config_json.exists() else "qwen2.5-0.5b"
    )
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"  # CPUs have no fast bf16 matmul
    # Rematerialised blocks: without them the first update needs 62.6 GiB of this 24 GB machine's RAM,
    # with them 17.5 GiB (python -m tspo_jax.plan --config=configs/qwen2_5_0_5b_offline.py
    # --topology=host, docs/POD_PLAN.md).
    c.model.remat = True
    c.model.attention_chunk = 64  # long blocks attend in query chunks of this many positions

    c.data.train = str(paths["train"])
    c.data.test = str(paths["test"])
    c.data.prompt_source = "template"  # the demo files hold questions, no chat messages

    # The demo retriever: the packaged all-MiniLM-L6-v2 and a ScaNN index of the demo corpus,
    # built into index_dir on first use.
    c.retriever.spec = ""
    c.retriever.corpus = str(paths["corpus"])
    c.retriever.index_dir = "~/.cache/tspo_jax/demo_index"
    c.retriever.mode = "scann"
    c.retriever.timeout_s = 30.0

    c.rollout.max_turns = 2
    c.rollout.gather_params = False  # one fsdp shard and fp32 compute: the copy would only cost 2 GB of RAM
    c.rollout.fill_rows = 0  # 16 rows: one refill call
    c.rollout.slots = 0  # one slot per row: 16 rows, on any number of devices
    c.rollout.max_response_length = 128
    c.rollout.max_obs_length = 256
    c.rollout.max_prompt_length = 256
    c.rollout.max_context_length = 0  # 0: enough for every turn at full length
    c.rollout.use_chat_template = True  # an instruct model
    c.rollout.template = "tspo"  # our wording (rollout.PROMPT_PRESETS)
    c.rollout.invalid_action_message = "tspo"

    c.eval.every = 10
    c.eval.max_examples = 16
    c.eval.batch_size = 16
    return c
