"""The embedded default: TSPO on the shipped multi-hop demo task, a small Qwen2 policy, on CPU.

  python -m tspo_jax.train --config=configs/demo.py --workdir=runs/demo

A 4-layer Qwen2-architecture policy (our byte-level BPE tokenizer, 1,010 tokens) is warm-started
on demonstration episodes, then trained with TSPO against the real all-MiniLM-L6-v2 encoder and
a ScaNN index of the demo corpus.
"""

import ml_collections

from tspo_jax import advantages, losses, rewards
from tspo_jax.demo_task import demo_paths


def get_config() -> ml_collections.ConfigDict:
    paths = demo_paths()
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 40
    c.prompts_per_step = 8  # questions per step
    c.group_size = 5  # rollouts per question (n)
    c.mini_batch = 40  # trajectories per optimizer step
    c.micro_batch = 8  # trajectories per gradient-accumulation slice
    # Rows per slice of the reference / old-logprob forward over a step (memory only); None: micro_batch.
    c.logprob_micro_batch = ml_collections.config_dict.placeholder(int)
    c.ppo_epochs = 1
    c.recompute_old_logprobs = False  # the sampler's logprobs are exact here (same model, fp32)
    c.checkpoint_every = 10
    c.keep_checkpoints = 2
    c.checkpoint_async = "auto"  # save in the background: "auto" = on accelerators, not on CPU
    c.restore_fallback = True  # an unreadable latest checkpoint: resume from the newest intact one
    c.max_nonfinite_steps = 3  # consecutive steps with skipped non-finite updates before save + stop
    c.progress_bar = True
    c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1)})  # (data, fsdp, tensor)

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # "" = a fresh model of shape `arch`; else an HF checkpoint directory
    c.model.tokenizer = str(paths["tokenizer"])
    c.model.arch = ml_collections.ConfigDict(dict(
        hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=2048))
    c.model.init_seed = 0
    c.model.param_dtype = "float32"
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.shard_activations = False  # one device: nothing to pin
    c.model.attention_chunk = 64  # long blocks attend in query chunks of this many positions

    # prompt_source "template": each question goes into rollout.template ("column": the rows'
    # own chat messages, as Search-R1's parquet files carry them).
    c.data = ml_collections.ConfigDict(
        {"train": str(paths["train"]), "test": str(paths["test"]), "prompt_source": "template"})

    c.retriever = ml_collections.ConfigDict()
    c.retriever.spec = ""  # a URL (Search-R1 /retrieve server) or an index dir; "" = build from corpus
    c.retriever.corpus = str(paths["corpus"])
    c.retriever.index_dir = "~/.cache/tspo_jax/demo_index"
    c.retriever.mode = "scann"
    c.retriever.timeout_s = 30.0
    c.retriever.retries = 2
    c.retriever.max_outage_s = 600.0  # wait out a retrieval server outage this long (backoff + jitter)

    c.rollout = ml_collections.ConfigDict(dict(
        max_turns=3, max_response_length=48, max_obs_length=160, max_prompt_length=256, max_context_length=0,
        docs_per_search=3, temperature=1.0, top_p=1.0, top_k=0, greedy=False, resume="cache", on_retriever_error="raise",
        # The slot engine, one slot per row (40 rows fit easily); chunks of up to 64 decode steps.
        engine="slots", slots=0, decode_chunk=64, fill_rows=0, gather_params=False,
        # A short instruction: the tiny policy learns the tags from the warm start, and every
        # prompt token costs compute in all episodes (configs for real models use the full one).
        template="Search, then answer.\nQuestion: {question}\n", use_chat_template=True,
        invalid_action_message="tspo"))  # our wording (rollout.PROMPT_PRESETS)

    # The warm start imitates a weak searcher, trained to convergence (400 steps, cosine decay),
    # so that it is a stable point: 1-hop questions (person -> city, city -> country) are shown
    # their correct episode; 2-hop questions a mix of 5 "stop after one search, answer the city",
    # 2 "search the city too, still answer the city" and 1 correct chain (demo_task.TWO_HOP_MIX).
    # Greedy decoding then answers 2-hop questions with the city (held-out EM 0.27: the 1-hop ones),
    # most 2-hop groups are all-wrong, and RL has to make the policy chain its searches.
    # Demonstrations come from the task's own scripted episodes ("module:function").
    c.warmstart = ml_collections.ConfigDict(dict(steps=400, lr=3e-3, batch_size=16, seed=0, from_dir="",
                                                 demonstrations="tspo_jax.demo_task:weak_searcher_demonstrations"))

    c.reward = rewards.default_config()
    c.advantage = advantages.default_config()  # name = "tspo"
    c.loss = losses.default_config()
    c.loss.kl_coef = 0.001
    c.loss.entropy_coef = 0.0
    c.loss.logprob_chunk = 256

    c.optim = ml_collections.ConfigDict(dict(
        # lr 1e-3 collapsed the policy within 10 steps (held-out EM 0.76 -> 0.11); 1e-4 improved it.
        lr=1e-4, schedule="constant", warmup_ratio=0.05, weight_decay=0.01,
        b1=0.9, b2=0.999, grad_clip=1.0))
    c.optim.warmup_steps = ml_collections.config_dict.placeholder(int)  # None: from warmup_ratio

    c.eval = ml_collections.ConfigDict(dict(every=10, max_examples=70, batch_size=70))
    return c
