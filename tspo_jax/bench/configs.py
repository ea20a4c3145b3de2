"""Benchmark configurations and the two models (ours and transformers') each one compares.

  tiny          the embedded demo's policy shape (4 layers, 128 wide, 1,011-token vocabulary):
                overhead-dominated, the CI smoke test runs a shrunken copy of it
  0.5b-random   Qwen2.5-0.5B's shape with random weights and an untied LM head, i.e. exactly the
                shape of our offline Qwen2.5-Coder-0.5B-Instruct checkpoint
  0.5b-real     that checkpoint (~/.cache/tspo_jax/qwen2.5-coder-0.5b-instruct), when it has been
                built with `python -m tspo_jax.model.build_offline_checkpoint`

The PyTorch model always gets our weights through `export_hf_checkpoint` (or, for the real
checkpoint, both sides load the same directory). On a GPU both sides run in bfloat16.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import jax

from tspo_jax.model import params as params_lib
from tspo_jax.model import qwen2

DEFAULT_CHECKPOINT = os.path.expanduser("~/.cache/tspo_jax/qwen2.5-coder-0.5b-instruct")


class BenchmarkError(RuntimeError):
    """The benchmark cannot run as asked, or a contender did not do the same work."""


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    new_tokens: int
    modes: tuple[str, ...] = ("greedy", "sampled")
    # (batch, prompt_len, mode) points also timed with transformers' static cache + torch.compile
    # (each new shape compiles for minutes on a CPU, so only a few by default).
    compile_points: tuple[tuple[int, int, str], ...] = ()
    extra_points: tuple[tuple[int, int, str], ...] = ()  # measured besides the grid

    def points(self) -> list[tuple[int, int, str]]:
        """(batch, prompt_len, mode) in run order: the grid, then the extra points."""
        grid = [(b, t, m) for t in self.prompt_lens for b in self.batches for m in self.modes]
        return grid + [p for p in self.extra_points if p not in grid]


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
    rows: int  # episodes per batch
    turn_tokens: int  # policy tokens of each scripted turn (filler thought + the search call)
    max_response_length: int  # per-turn limit: Search-R1 generates this many tokens every turn
    max_obs_length: int = 500
    max_turns: int = 4
    docs_per_search: int = 3
    doc_tokens: int = 170  # length of a bench corpus passage: 3 docs ~ a 500-token observation
    reps: int | None = None  # default: the config's
    # The long-tailed shape: turn lengths sampled (geometric, mean `mean_turn`, cut at
    # max_response_length) by a scripted model; 0 rows: not measured.
    long_tail_rows: int = 0
    mean_turn: float = 150.0
    long_tail_reps: int | None = None  # default: reps


@dataclasses.dataclass(frozen=True)
class UpdateSpec:
    rows: int  # episodes in the fixed batch
    width: int  # padded length; rows hold between width/2 and width valid tokens
    reps: int | None = None  # default: the config's


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    name: str
    about: str
    decode: DecodeSpec
    update: UpdateSpec
    episodes: EpisodeSpec | None
    reps: int
    arch: dict | None = None  # Qwen2Config fields (vocab_size from the tokenizer when absent)
    preset: str | None = None
    checkpoint: str | None = None
    tokenizer: str = "demo"  # "demo", "qwen2.5", or a directory
    measures: tuple[str, ...] = ("decode", "episodes", "update")  # what this config measures by default

    def replace(self, **kw) -> "BenchConfig":
        return dataclasses.replace(self, **kw)


TINY_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)

CONFIGS: dict[str, BenchConfig] = {
    "tiny": BenchConfig(
        name="tiny",
        about="the demo policy's shape (4 x 128, vocab 1,011), random weights",
        arch=TINY_ARCH,
        tokenizer="demo",
        decode=DecodeSpec(
            batches=(1, 8, 32),
            prompt_lens=(128, 512),
            new_tokens=256,
            modes=("greedy",),
            compile_points=((8, 128, "greedy"),),
            extra_points=((1, 128, "sampled"), (8, 128, "sampled"), (32, 128, "sampled")),
        ),
        episodes=EpisodeSpec(rows=8, turn_tokens=60, max_response_length=500, long_tail_rows=16, long_tail_reps=1),
        update=UpdateSpec(rows=8, width=1024),
        reps=3,
    ),
    "0.5b-random": BenchConfig(
        name="0.5b-random",
        about="Qwen2.5-0.5B shape (24 x 896, vocab 151,936, untied head as our offline checkpoint), random weights",
        preset="qwen2.5-0.5b",
        arch=dict(tie_word_embeddings=False),
        tokenizer="qwen2.5",
        decode=DecodeSpec(
            batches=(1, 8, 32),
            prompt_lens=(128,),
            new_tokens=64,
            modes=("greedy",),
            # transformers' static cache + torch.compile gained nothing on the tiny config and
            # compiles for minutes at this size on a CPU: ask for it with --torch_compile=all.
            extra_points=((8, 128, "sampled"),),
        ),
        # Not measured by default: 8 episodes of ~2,700 tokens (the rollout pads a batch to 8 rows)
        # are ~20 TFLOP per method and repetition, hours on 2 CPU cores. Ask with --measure=episodes.
        episodes=EpisodeSpec(rows=8, turn_tokens=40, max_response_length=128, reps=1),
        # Two fp32 AdamW training states of 0.5B (~10 GB each) do not fit a 23 GB machine side by
        # side: the step is timed in blocks there, and the batch kept small.
        update=UpdateSpec(rows=2, width=256, reps=2),
        reps=3,
        measures=("decode", "update"),
    ),
    "0.5b-real": BenchConfig(
        name="0.5b-real",
        about="the real Qwen2.5-Coder-0.5B-Instruct weights from the offline checkpoint",
        checkpoint=DEFAULT_CHECKPOINT,
        tokenizer=DEFAULT_CHECKPOINT,
        # Same shapes as 0.5b-random, so the same costs: one batch size, to check real weights
        # decode alike on both sides (greedy agreement) at the same speed.
        decode=DecodeSpec(batches=(8,), prompt_lens=(128,), new_tokens=64, modes=("greedy",)),
        # Episodes need scripted weights (measured on 0.5b-random); the update step's cost does
        # not depend on the weights' values.
        episodes=None,
        update=UpdateSpec(rows=2, width=256),
        reps=3,
        measures=("decode",),
    ),
}


def smoke(bc: BenchConfig) -> BenchConfig:
    """A shrunken copy for the CI smoke test: every code path, seconds of work."""
    return bc.replace(
        name=bc.name + "-smoke",
        decode=DecodeSpec(batches=(2,), prompt_lens=(16,), new_tokens=8, modes=("greedy", "sampled")),
        episodes=bc.episodes and EpisodeSpec(rows=2, turn_tokens=12, max_response_length=24, max_obs_length=64,
                                             max_turns=1, docs_per_search=2, doc_tokens=24, long_tail_rows=4, mean_turn=8.0),
        update=UpdateSpec(rows=8, width=64),
        reps=1,
    )


def bench_dtype() -> str:
    """bfloat16 on accelerators, float32 on a CPU."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def torch_device() -> str:
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def load_bench_tokenizer(spec: str):
    from tspo_jax import tokenizer as tok_lib

    if spec == "demo":
        from tspo_jax.demo_task import demo_paths

        return tok_lib.load_tokenizer(demo_paths()["tokenizer"])
    if spec == "qwen2.5":
        return tok_lib.qwen25_tokenizer()
    if not os.path.isdir(spec):
        raise BenchmarkError(f"tokenizer {spec!r} is neither 'demo', 'qwen2.5' nor a directory")
    return tok_lib.load_tokenizer(spec)


def model_config(bc: BenchConfig, dtype: str, vocab_size: int | None = None) -> qwen2.Qwen2Config:
    if bc.checkpoint:
        return qwen2.Qwen2Config.from_hf_config(bc.checkpoint, param_dtype=dtype, dtype=dtype)
    arch = dict(bc.arch or {})
    if bc.preset:
        return qwen2.preset(bc.preset, param_dtype=dtype, dtype=dtype, **arch)
    if "vocab_size" not in arch:
        if vocab_size is None:
            raise BenchmarkError(f"config {bc.name} needs the tokenizer's vocabulary size")
        arch["vocab_size"] = vocab_size
    return qwen2.Qwen2Config(param_dtype=dtype, dtype=dtype, **arch)


def checkpoint_available(bc: BenchConfig) -> bool:
    return bc.checkpoint is None or os.path.isfile(os.path.join(bc.checkpoint, "config.json"))


def jax_model(bc: BenchConfig, dtype: str, vocab_size: int | None = None, seed: int = 0) -> qwen2.Qwen2:
    if bc.checkpoint:
        if not checkpoint_available(bc):
            raise BenchmarkError(
                f"no checkpoint at {bc.checkpoint}; build it with "
                "`python -m tspo_jax.model.build_offline_checkpoint` or leave out config {bc.name}"
            )
        return params_lib.load_hf_checkpoint(bc.checkpoint, param_dtype=dtype, dtype=dtype)
    return random_model(model_config(bc, dtype, vocab_size), seed=seed)


def random_model(cfg: qwen2.Qwen2Config, seed: int = 0) -> qwen2.Qwen2:
    """init_model's distribution (normal(0, 0.02), norm scales 1) drawn with NumPy: no per-op
    compilation, several times faster to build on a CPU than the eager JAX initialisers."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    model = qwen2.abstract_model(cfg)
    state = nnx.state(model)
    rng = np.random.default_rng(seed)
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        shape = var.get_value().shape
        if len(shape) == 1 and var.get_value().dtype == cfg.jnp_param_dtype and _is_norm(var):
            value = np.ones(shape, np.float32)
        else:
            value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        var.set_value(jnp.asarray(value, cfg.jnp_param_dtype))
    nnx.update(model, state)
    return model


def _is_norm(var) -> bool:
    return tuple(getattr(var, "logical_axes", ()) or ()) == (qwen2.EMBED,)


def torch_model(source, dtype: str):
    """transformers' Qwen2ForCausalLM with the same weights: `source` is our model (exported
    through export_hf_checkpoint to a scratch directory) or an HF checkpoint directory."""
    import torch
    import transformers

    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    scratch = None
    if isinstance(source, qwen2.Qwen2):
        scratch = tempfile.mkdtemp(prefix="tspo_bench_hf_")
        params_lib.export_hf_checkpoint(source, scratch, dtype=dtype)
        path = scratch
    else:
        path = str(source)
    try:
        model = transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=tdt, attn_implementation="sdpa")
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    model = model.to(torch_device()).eval()
    # Both sides decode exactly the tokens asked for: no EOS stop (random weights may emit it).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


_DEFAULT_THREADS: list[int] = []


def default_threads() -> int:
    """PyTorch's own thread count, as first seen (a calibration may have changed it since)."""
    import torch

    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(torch.get_num_threads())
    return _DEFAULT_THREADS[0]


def calibrate_torch_threads(model, train: bool = False, reps: int = 2) -> dict:
    """Picks PyTorch's faster intra-op thread count, its default or 1, for this model and job here.

    On a CPU shared with other jobs, PyTorch's OpenMP threads meet at a barrier after every op, so
    one descheduled thread stalls them all: we measured a 0.5B decode step at 2.5 s with 2 threads
    and 0.39 s with 1 on this machine under load. The baseline gets whichever is faster on a short
    probe of the job (a prefill block and decode steps; or a forward and backward pass), best of
    `reps`, so a loaded machine does not flatter us."""
    import time

    import torch

    if model.device.type != "cpu":
        return {"threads": None, "note": "not on a CPU"}
    default = default_threads()
    ids = torch.ones((1, 64 if train else 32), dtype=torch.long)

    def probe():
        if train:
            model(ids).logits.float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
            return
        with torch.inference_mode():
            cache = model(ids, use_cache=True).past_key_values
            for _ in range(4):
                cache = model(ids[:, -1:], past_key_values=cache, use_cache=True).past_key_values

    timings = {}
    for n in sorted({default, 1}, reverse=True):
        torch.set_num_threads(n)
        probe()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - t0)
        timings[n] = best
    chosen = min(timings, key=timings.get)
    torch.set_num_threads(chosen)
    return {"threads": chosen, "default": default, "probe": "train" if train else "decode",
            "probe_s": {str(k): v for k, v in timings.items()}}
