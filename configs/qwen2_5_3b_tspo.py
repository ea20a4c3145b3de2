"""TSPO on Qwen2.5-3B with Search-R1's recipe (NQ + HotpotQA train, wiki-18 over a retrieval server).

  export TSPO_MODEL_DIR=/path/to/Qwen2.5-3B           # an HF checkpoint directory (config.json + safetensors)
  export TSPO_DATA_DIR=/path/to/nq_hotpotqa_train     # Search-R1's train.parquet and test.parquet
  bash launch/retriever_server.sh --index=/path/to/e5_index --port=8000 --background
  python -m tspo_jax.train --config=configs/qwen2_5_3b_tspo.py:gpu8 --workdir=runs/qwen2_5_3b_tspo

The text after ':' picks the device mesh (see MESHES; default gpu8). Environment variables fill the
paths when the config is loaded; --config.model.checkpoint=DIR etc. override them. An unset
TSPO_MODEL_DIR leaves a placeholder that validate_config rejects, naming the variable.

This file also holds the recipe the other Search-R1-scale configs start from (search_r1_config).
"""

from __future__ import annotations

import os

import ml_collections

from tspo_jax import advantages, losses, rewards
from tspo_jax.model import qwen2

# Device meshes, (data, fsdp, tensor). Parameters are sharded over fsdp x tensor, batches over
# data x fsdp (tspo_jax/sharding.py), so micro_batch must be a multiple of data * fsdp.
# - gpu8: one node of 8 GPUs, pure FSDP. The fp32 state of 3B (params, 2 Adam moments, gradient
#   accumulator, frozen reference: 5 x 12.3 GB) is 7.7 GB per GPU.
# - gpu8_tp2: 8 GPUs as 4-way FSDP x 2-way tensor parallel. Decoding all-gathers fsdp-sharded
#   weights every token; tensor sharding instead keeps half of each matmul local. Try it when
#   generation dominates the step time.
# - tpu_v4_32: a v4-32 slice = 16 chips on 4 hosts (one JAX device per chip, megacore).
# - tpu_v5e_64: a v5litepod-64 slice = 64 chips on 16 hosts of 4 chips. Tensor 4 = the chips of
#   one host; 16 GB of HBM per chip is why the state is spread 64 ways.
# - fsdp_any: FSDP over however many devices there are (a smaller node, a CPU smoke test).
# The rollout's bf16 KV cache is the other big item: 36 KB per token for 3B (36 layers x 2 KV heads
# x 128 x K,V), so 2,560 rows x 4,608 positions take 435 GB, 54 GB per GPU on gpu8 when split
# over the batch axes (launch/gpu_node.sh raises XLA's memory fraction to 0.92 for it).
MESHES = {
    "gpu8": (1, 8, 1),
    "gpu8_tp2": (1, 4, 2),
    "tpu_v4_32": (1, 16, 1),
    "tpu_v5e_64": (1, 16, 4),
    "fsdp_any": (1, -1, 1),
}
DEFAULT_MESH = "gpu8"
# micro_batch on the TPU meshes: 16 = one row per batch device (data x fsdp = 16 on both).
TPU_MICRO_BATCH = {"tpu_v4_32": 16, "tpu_v5e_64": 16}
# Rollout memory per TPU mesh (python -m tspo_jax.plan, docs/POD_PLAN.md). On tpu_v5e_64, 3B's 2 KV
# heads cannot split over tensor=4, so every chip of a tensor group holds its rows' whole cache:
# 512 slots (5 waves of the 2,560 rows) instead of 640 keep the cache at 5.1 GiB of a 15.75 GiB chip.
# Refills and appends go 64 rows per call: a 128-row refill of 2,048-token prompts peaks at 94%.
TPU_ROLLOUT = {"tpu_v4_32": dict(slots=640, fill_rows=64), "tpu_v5e_64": dict(slots=512, fill_rows=64)}

# Environment variables the Search-R1-scale configs read when loaded.
MODEL_DIR_ENV = "TSPO_MODEL_DIR"
DATA_DIR_ENV = "TSPO_DATA_DIR"
RETRIEVER_URL_ENV = "TSPO_RETRIEVER_URL"
DEFAULT_DATA_DIR = "~/data/nq_hotpotqa_train"  # where Search-R1's data scripts write it
DEFAULT_RETRIEVER_URL = "http://127.0.0.1:8000"  # launch/retriever_server.sh's default port


def mesh_shape(arg: str, meshes: dict | None = None) -> tuple[int, int, int]:
    meshes = MESHES if meshes is None else meshes
    name = arg or DEFAULT_MESH
    if name not in meshes:
        raise ValueError(
            f"unknown mesh {name!r} after ':' in --config; choose one of {sorted(meshes)}, "
            f"e.g. --config=configs/qwen2_5_3b_tspo.py:{DEFAULT_MESH}"
        )
    return meshes[name]


def checkpoint_from_env(hf_name: str) -> str:
    """The checkpoint directory from $TSPO_MODEL_DIR, else a placeholder that names the fix.

    Never "" here: "" means "train a fresh random model", which must not happen by accident."""
    value = os.environ.get(MODEL_DIR_ENV, "").strip()
    if value:
        return os.path.abspath(os.path.expanduser(value))
    return (
        f"${MODEL_DIR_ENV} (unset: export {MODEL_DIR_ENV}=/path/to/{hf_name} or pass "
        f"--config.model.checkpoint=/path/to/{hf_name})"
    )


def arch_of(preset: str | qwen2.Qwen2Config) -> ml_collections.ConfigDict:
    """model.arch: only used when model.checkpoint is "" (a fresh model); kept equal to the
    released shapes so that a from-scratch run builds the same network."""
    p = qwen2.preset(preset) if isinstance(preset, str) else preset
    return ml_collections.ConfigDict(
        dict(
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_layers=p.num_layers,
            num_heads=p.num_heads,
            num_kv_heads=p.num_kv_heads,
            rope_theta=p.rope_theta,
            tie_word_embeddings=p.tie_word_embeddings,
            max_position_embeddings=p.max_position_embeddings,
        )
    )


def search_r1_config(preset: str, hf_name: str, mesh_arg: str, micro_batch: int, meshes: dict | None = None,
                     tpu_micro_batch: dict | None = None, tpu_rollout: dict | None = None) -> ml_collections.ConfigDict:
    """Search-R1's GRPO recipe (train_grpo.sh) with the TSPO advantage, same keys as configs/demo.py.
    `meshes`, `tpu_micro_batch`, `tpu_rollout`: a model's own mesh table and per-mesh settings
    (default: this file's, for 3B)."""
    meshes = MESHES if meshes is None else meshes
    tpu_micro_batch = TPU_MICRO_BATCH if tpu_micro_batch is None else tpu_micro_batch
    tpu_rollout = TPU_ROLLOUT if tpu_rollout is None else tpu_rollout
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1005  # Search-R1: trainer.total_training_steps=1005
    c.prompts_per_step = 512  # data.train_batch_size
    c.group_size = 5  # n rollouts per prompt (rollout.n_agent)
    c.mini_batch = 256  # trajectories per optimizer step: 2560 / 256 = 10 updates per step
    # Rows per gradient-accumulation slice: memory only. Every loss aggregation divides by the
    # mini-batch's counts (verl's agg_loss), so the update is the same for any value (up to float
    # rounding; tests/test_update.py checks micro_batch m, m/2, m/4).
    c.micro_batch = micro_batch
    # On the TPU slices, one row per chip per gradient-accumulation slice: the update's activations
    # at a 4,608-token context are what fills HBM (docs/POD_PLAN.md, python -m tspo_jax.plan).
    if mesh_arg in tpu_micro_batch:
        c.micro_batch = tpu_micro_batch[mesh_arg]
    # Rows per slice of the reference / old-logprob forward over the whole step (memory only);
    # None: micro_batch.
    c.logprob_micro_batch = ml_collections.config_dict.placeholder(int)
    c.ppo_epochs = 1
    # The sampler (KV-cache decode) and the trainer (full forward) round differently in bf16, so
    # the PPO ratio's denominator is recomputed by the trainer's forward, as verl does.
    c.recompute_old_logprobs = True
    c.checkpoint_every = 100  # trainer.save_freq
    c.keep_checkpoints = 2  # each holds fp32 params + Adam moments (37 GB for 3B)
    c.checkpoint_async = "auto"  # save in the background: "auto" = on accelerators, not on CPU
    c.restore_fallback = True  # an unreadable latest checkpoint: resume from the newest intact one
    c.max_nonfinite_steps = 3  # consecutive steps with skipped non-finite updates before save + stop
    c.progress_bar = True
    c.mesh = ml_collections.ConfigDict({"shape": mesh_shape(mesh_arg, meshes)})

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = checkpoint_from_env(hf_name)
    c.model.tokenizer = ""  # the checkpoint's own tokenizer
    c.model.arch = arch_of(preset)
    c.model.init_seed = 0
    # fp32 parameters, bf16 compute. optax.adamw creates its moments with the parameters' dtype, so
    # bf16 parameters would mean bf16 Adam state *and* bf16 updates: at lr 1e-6 an update is far
    # below half a bf16 ulp of a typical weight (0.02 * 2**-8 = 8e-5) and rounds away (tests/
    # test_configs.py shows it). fp32 master weights keep the updates and fp32 moments; every
    # matmul, the KV cache and the activations still run in bf16.
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = True  # Search-R1: enable_gradient_checkpointing=true
    c.model.shard_activations = False
    # Long blocks attend in query chunks (at most 16 per block): 64 positions suit CPU; on GPU/TPU
    # larger chunks keep the matmuls big (not measured here).
    c.model.attention_chunk = 256

    data_dir = os.path.expanduser(os.environ.get(DATA_DIR_ENV, "").strip() or DEFAULT_DATA_DIR)
    c.data = ml_collections.ConfigDict(
        {"train": os.path.join(data_dir, "train.parquet"), "test": os.path.join(data_dir, "test.parquet"),
         # Search-R1's parquet rows carry the exact prompt (its instruction + the question) as chat
         # messages: use them, through the chat template, as verl does.
         "prompt_source": "column"}
    )

    c.retriever = ml_collections.ConfigDict()
    # A Search-R1 /retrieve server (launch/retriever_server.sh) holding the e5 index of wiki-18.
    c.retriever.spec = os.environ.get(RETRIEVER_URL_ENV, "").strip() or DEFAULT_RETRIEVER_URL
    c.retriever.corpus = ""  # the server holds the corpus
    c.retriever.index_dir = ""
    c.retriever.mode = "scann"
    c.retriever.timeout_s = 300.0  # one request carries up to 2,560 queries
    c.retriever.retries = 2
    c.retriever.max_outage_s = 600.0  # wait out a retrieval server outage this long (backoff + jitter)

    c.rollout = ml_collections.ConfigDict(
        dict(
            max_turns=4,
            max_response_length=500,
            max_obs_length=500,
            max_prompt_length=2048,  # Search-R1: data.max_start_length=2048
            # Search-R1 caps the rolling context at data.max_prompt_length=4096 before each 500-token
            # turn; 4096 + 500 rounded up to a multiple of 64 is the same budget for our KV cache.
            max_context_length=4608,
            docs_per_search=3,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            greedy=False,  # evaluation is greedy (train.py)
            resume="cache",
            engine="slots",
            # 640 decode slots hold 640 x 4,608 positions of KV (109 GB for 3B, 168 GB for 7B in
            # bf16; 1/8 of that per GPU on gpu8) instead of all 2,560 rows (435 GB / 676 GB); a
            # multiple of the batch devices of every mesh above. `python -m tspo_jax.plan` checks it.
            slots=640,
            decode_chunk=64,  # most decode steps per compiled call before the host looks again
            # Prompts (up to 2,048 tokens) and observations go into the slots at most 128 rows per
            # call (64 on the TPU meshes, TPU_ROLLOUT): a refill of all 640 slots at once needed
            # 36.6 GiB per v5e chip (python -m tspo_jax.plan, docs/POD_PLAN.md).
            fill_rows=128,
            # Decode from a bf16 copy of the params gathered over fsdp, made once per rollout: with
            # fsdp-sharded fp32 params every decode step all-gathers them (python -m tspo_jax.plan).
            gather_params=True,
            on_retriever_error="raise",  # a dead retriever stops the run; rerun resumes
            # Search-R1's instruction (nq_search.py's 'base' prefix); used for question-only files
            # (--config.data.prompt_source=template) and by generate/compare on this workdir.
            template="search_r1",
            # Search-R1's verl applies the tokenizer's chat template; Qwen2.5 base tokenizers have one too.
            use_chat_template=True,
            # Search-R1's message after an invalid action ("My previous action is invalid. ...").
            invalid_action_message="search_r1",
        )
    )

    for key, value in tpu_rollout.get(mesh_arg, {}).items():
        c.rollout[key] = value

    c.warmstart = ml_collections.ConfigDict(dict(steps=0, lr=1e-5, batch_size=16, seed=0, from_dir="",
                                                 demonstrations=""))

    c.reward = rewards.default_config()  # EM, FOLR alpha 0.5 (TSPO.md)
    c.advantage = advantages.default_config()  # name = "tspo"
    c.loss = losses.default_config()  # PPO clip 0.2, low_var_kl
    c.loss.kl_coef = 0.001  # actor.kl_loss_coef, kl_loss_type=low_var_kl
    # Search-R1's scripts leave verl's entropy_coeff at its default, 0.001: we keep it.
    c.loss.entropy_coef = 0.001
    c.loss.logprob_chunk = 256

    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-6,
            schedule="constant",
            # int(0.285 * 1005) = 286 warm-up *training steps*: the rate is set once per step
            # and shared by its 10 updates, as Search-R1's scheduler steps once per step.
            warmup_ratio=0.285,
            weight_decay=0.01,
            b1=0.9,
            b2=0.999,
            grad_clip=1.0,
        )
    )
    c.optim.warmup_steps = ml_collections.config_dict.placeholder(int)  # None: from warmup_ratio

    # trainer.test_freq=50, val_batch_size=256. The in-training evaluation reads the first
    # max_examples rows of data.test; full seven-dataset EM is tspo_jax.evaluate's job.
    c.eval = ml_collections.ConfigDict(dict(every=50, max_examples=2048, batch_size=256))
    return c


# Meshes whose full-size plan was compiled with model.shard_activations=True and fits: on 3B's
# tpu_v5e_64 the update's collectives fall from 403 GB to 14 GB per micro-batch (docs/POD_PLAN.md).
# The other meshes have not been planned with it.
PINNED_MESHES = ("tpu_v5e_64",)


def get_config(arg: str = DEFAULT_MESH) -> ml_collections.ConfigDict:
    # micro_batch 64 = Search-R1's ppo_micro_batch_size; 8 rows per GPU on gpu8.
    c = search_r1_config("qwen2.5-3b", "Qwen2.5-3B", arg, micro_batch=64)
    c.model.shard_activations = arg in PINNED_MESHES
    return c
