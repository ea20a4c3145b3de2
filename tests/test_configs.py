"""The Search-R1-scale configs and the offline real-checkpoint config.

Every config is loaded the way `python -m tspo_jax.train --config=FILE:ARG` loads it (ml_collections
config_flags), must have exactly configs/demo.py's keys and value types, and must pass
validate_config once its paths point at files that exist. The hyperparameters are checked against
Search-R1's train_grpo.sh / TSPO.md, written out here as the reference.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from tspo_jax import config_checks, data, update
from tspo_jax import sharding as shd
from tspo_jax.config_checks import ConfigError, validate_config
from tspo_jax.demo_task import demo_paths
from tspo_jax.model import qwen2
from tspo_jax.model.build_offline_checkpoint import default_checkpoint_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SCALE_CONFIGS = ("qwen2_5_3b_tspo.py", "qwen2_5_7b_tspo.py", "qwen2_5_3b_grpo.py")
# mesh argument -> (mesh shape, devices it is meant for)
MESHES = {
    "gpu8": ((1, 8, 1), 8),
    "gpu8_tp2": ((1, 4, 2), 8),
    "tpu_v4_32": ((1, 16, 1), 16),
    "tpu_v5e_64": ((1, 16, 4), 64),
    "fsdp_any": ((1, -1, 1), 8),
}
# 7B's 4 KV heads split over tensor=4 on a v4-32 slice (configs/qwen2_5_7b_tspo.py says why).
CONFIG_MESHES = {name: MESHES for name in SCALE_CONFIGS} | {
    "qwen2_5_7b_tspo.py": MESHES | {"tpu_v4_32": ((1, 4, 4), 16)}}
# (file, argument after ':'); None = no argument, as `--config=FILE`.
CASES = [(f, a) for f in SCALE_CONFIGS for a in (None, *MESHES)] + [("qwen2_5_0_5b_offline.py", None)]
ENV_VARS = ("TSPO_MODEL_DIR", "TSPO_DATA_DIR", "TSPO_RETRIEVER_URL")


def load(name: str, arg: str | None = None, overrides: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """As train.py does: --config=FILE[:ARG] plus --config.KEY=VALUE overrides."""
    spec = str(CONFIGS / name) + (f":{arg}" if arg is not None else "")
    argv = ["train", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    # sys_argv: config_flags finds the --config.KEY overrides there before parsing.
    config_flags.DEFINE_config_file(
        "config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv
    )
    fv(argv)
    return fv.config


def module(name: str):
    spec = importlib.util.spec_from_file_location(f"test_cfg_{name[:-3]}", CONFIGS / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def key_types(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type]:
    out = {}
    for k in c.keys():
        if isinstance(c[k], ml_collections.ConfigDict):
            out.update(key_types(c[k], f"{prefix}{k}."))
        else:
            out[prefix + k] = c.get_type(k)
    return out


def flat_values(c: ml_collections.ConfigDict) -> dict:
    out = {}
    for k, v in c.to_dict().items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flat_values(ml_collections.ConfigDict(v)).items()})
        else:
            out[k] = v
    return out


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A checkpoint directory with a config.json and a data directory with Search-R1-style
    train/test parquet files (the demo questions)."""
    root = tmp_path_factory.mktemp("stand_ins")
    ckpt = root / "Qwen2.5-3B"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(qwen2.preset("qwen2.5-3b").to_hf_config()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = root / "nq_hotpotqa_train"
    data_dir.mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in demo_paths()[split].read_text().splitlines()]
        pq.write_table(pa.Table.from_pylist(rows), data_dir / f"{split}.parquet")
    return ckpt, data_dir


def _devices_for(c) -> int:
    """The devices a config is validated for: its mesh's, or for a -1 axis as many as its batches
    split over (8 at most, as the tests' fake devices)."""
    shape = tuple(c.mesh.shape)
    return math.gcd(8, c.micro_batch, c.warmstart.batch_size) if -1 in shape else math.prod(shape)


# --- loading and key tree -------------------------------------------------------------------------
@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_same_keys_and_types_as_demo(name, arg):
    c = load(name, arg)
    assert key_types(c) == key_types(load("demo.py"))


@pytest.mark.parametrize("name", SCALE_CONFIGS)
def test_mesh_argument_picks_the_mesh(name):
    meshes = CONFIG_MESHES[name]
    assert module(name).MESHES.keys() == meshes.keys(), "update MESHES in this test with the config"
    assert tuple(load(name).mesh.shape) == meshes["gpu8"][0]  # the default
    for arg, (shape, _) in meshes.items():
        assert tuple(load(name, arg).mesh.shape) == shape
    with pytest.raises(ValueError, match=r"unknown mesh 'tpu_v9'.*fsdp_any.*gpu8"):
        module(name).get_config("tpu_v9")


# --- validate_config ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_passes_validate_config_with_stand_ins(name, arg, stand_ins, monkeypatch):
    ckpt, data_dir = stand_ins
    if name in SCALE_CONFIGS:
        monkeypatch.setenv("TSPO_MODEL_DIR", str(ckpt))
        monkeypatch.setenv("TSPO_DATA_DIR", str(data_dir))
        monkeypatch.setenv("TSPO_RETRIEVER_URL", "http://10.0.0.7:8123")
        c = load(name, arg)
        assert c.model.checkpoint == str(ckpt)
        assert c.data.train == str(data_dir / "train.parquet")
        assert c.data.test == str(data_dir / "test.parquet")
        assert c.retriever.spec == "http://10.0.0.7:8123"
        assert len(data.load_qa(c.data.train)) == 262  # the parquet path is read as Search-R1 data
    else:
        c = load(name, arg)
        if not Path(c.model.checkpoint).is_dir():  # CI without the built checkpoint
            c.model.checkpoint = str(ckpt)
    # validate_config compares the mesh with jax.device_count(); pretend to be the target slice.
    n = _devices_for(c)
    monkeypatch.setattr(config_checks.jax, "device_count", lambda *a, **k: n)
    validate_config(c)


@pytest.mark.parametrize("name", SCALE_CONFIGS)
def test_command_line_overrides_replace_the_env_paths(name, stand_ins):
    ckpt, data_dir = stand_ins
    c = load(
        name,
        "gpu8",
        (
            f"--config.model.checkpoint={ckpt}",
            f"--config.data.train={data_dir}/train.parquet",
            f"--config.data.test={data_dir}/test.parquet",
        ),
    )
    validate_config(c)


@pytest.mark.parametrize("name", SCALE_CONFIGS)
def test_unset_checkpoint_gets_a_clear_error(name, stand_ins):
    _, data_dir = stand_ins
    c = load(
        name,
        "gpu8",
        (f"--config.data.train={data_dir}/train.parquet", f"--config.data.test={data_dir}/test.parquet"),
    )
    assert c.model.checkpoint, '"" would silently train a randomly initialised model'
    with pytest.raises(
        ConfigError, match=r"model\.checkpoint=.*TSPO_MODEL_DIR.*--config\.model\.checkpoint="
    ):
        validate_config(c)


def test_missing_data_gets_a_clear_error(stand_ins, tmp_path, monkeypatch):
    ckpt, _ = stand_ins
    monkeypatch.setenv("TSPO_MODEL_DIR", str(ckpt))
    monkeypatch.setenv("TSPO_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data\.train=.*nowhere/train\.parquet.* does not exist"):
        validate_config(load("qwen2_5_3b_tspo.py"))


@pytest.mark.parametrize("section,key,match", [
    ("rollout", "topk", "rollout.topk was renamed rollout.docs_per_search"),
    ("reward", "num_turns", "reward.num_turns is gone"),
])
def test_renamed_and_removed_keys_are_named(section, key, match):
    c = load("demo.py")
    c.unlock()
    c[section][key] = 3
    with pytest.raises(ConfigError, match=match):
        validate_config(c)


def test_unused_arch_and_corpus_are_reported(stand_ins, monkeypatch, caplog):
    ckpt, data_dir = stand_ins  # a Qwen2.5-3B config.json
    monkeypatch.setenv("TSPO_MODEL_DIR", str(ckpt))
    monkeypatch.setenv("TSPO_DATA_DIR", str(data_dir))
    c = load("qwen2_5_3b_tspo.py", overrides=("--config.model.arch.num_layers=2",
                                              "--config.retriever.corpus=/some/corpus.jsonl"))
    with caplog.at_level("WARNING", logger="tspo_jax.config_checks"):
        validate_config(c)
    text = caplog.text
    assert "model.arch is unused" in text and "'num_layers': (2, 36)" in text
    assert "retriever.corpus, index_dir and mode are unused" in text


def test_wrong_slice_for_the_mesh_is_refused(stand_ins, monkeypatch):
    ckpt, data_dir = stand_ins
    monkeypatch.setenv("TSPO_MODEL_DIR", str(ckpt))
    monkeypatch.setenv("TSPO_DATA_DIR", str(data_dir))
    with pytest.raises(ConfigError, match=r"needs 64 devices but 8 are visible"):
        validate_config(load("qwen2_5_3b_tspo.py", "tpu_v5e_64"))


# --- the recipe -----------------------------------------------------------------------------------
# Search-R1 train_grpo.sh and TSPO.md, the reference.
SEARCH_R1 = {
    "total_steps": 1005,
    "prompts_per_step": 512,
    "group_size": 5,
    "mini_batch": 256,
    "ppo_epochs": 1,
    "optim.lr": 1e-6,
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.285,
    "optim.warmup_steps": None,
    "optim.weight_decay": 0.01,
    "optim.b1": 0.9,
    "optim.b2": 0.999,
    "optim.grad_clip": 1.0,
    "loss.kl_type": "low_var_kl",
    "loss.kl_coef": 0.001,
    "loss.entropy_coef": 0.001,
    "loss.clip_eps_low": 0.2,
    "loss.clip_eps_high": 0.2,
    "loss.agg": "token-mean",
    "rollout.temperature": 1.0,
    "rollout.top_p": 1.0,
    "rollout.top_k": 0,
    "rollout.greedy": False,
    "rollout.max_turns": 4,
    "rollout.max_response_length": 500,
    "rollout.max_obs_length": 500,
    "rollout.docs_per_search": 3,
    "rollout.max_prompt_length": 2048,
    "rollout.max_context_length": 4096 + 512,
    "reward.em_score": 1.0,
    "reward.folr.alpha": 0.5,
    "reward.folr.scope": "information",
    "warmstart.steps": 0,
    "model.remat": True,
    "model.dtype": "bfloat16",
    "model.param_dtype": "float32",
    "model.tokenizer": "",
    "checkpoint_every": 100,
    "eval.every": 50,
    "eval.batch_size": 256,
    "retriever.spec": "http://127.0.0.1:8000",
    "retriever.corpus": "",
}


@pytest.mark.parametrize(
    "name,advantage",
    [("qwen2_5_3b_tspo.py", "tspo"), ("qwen2_5_7b_tspo.py", "tspo"), ("qwen2_5_3b_grpo.py", "grpo")],
)
def test_search_r1_hyperparameters(name, advantage):
    got = flat_values(load(name))
    assert {k: got[k] for k in SEARCH_R1} == SEARCH_R1
    assert got["advantage.name"] == advantage


def test_learning_rate_schedule_is_search_r1s():
    c = load("qwen2_5_3b_tspo.py")
    _, schedule = update.make_optimizer(c.optim, c.total_steps)
    warmup = round(0.285 * 1005)  # 286 linear warm-up steps, then constant
    np.testing.assert_allclose(
        [float(schedule(s)) for s in (0, warmup // 2, warmup, 600, 1005)],
        [0.0, 1e-6 * (warmup // 2) / warmup, 1e-6, 1e-6, 1e-6],
        rtol=1e-6,
    )


def test_grpo_and_tspo_differ_only_in_the_advantage():
    tspo, grpo = flat_values(load("qwen2_5_3b_tspo.py")), flat_values(load("qwen2_5_3b_grpo.py"))
    assert {k for k in tspo if tspo[k] != grpo[k]} == {"advantage.name"}


def test_7b_differs_from_3b_only_in_the_model_and_micro_batch():
    a, b = flat_values(load("qwen2_5_3b_tspo.py")), flat_values(load("qwen2_5_7b_tspo.py"))
    assert {k for k in a if a[k] != b[k]} <= {"model.checkpoint", "micro_batch"} | {
        k for k in a if k.startswith("model.arch.")
    }
    assert b["micro_batch"] == 32 and "Qwen2.5-7B" in b["model.checkpoint"]


@pytest.mark.parametrize(
    "name,preset,card_params_b",
    [("qwen2_5_3b_tspo.py", "qwen2.5-3b", 3.09), ("qwen2_5_7b_tspo.py", "qwen2.5-7b", 7.61)],
)
def test_arch_is_the_released_model(name, preset, card_params_b):
    arch = load(name).model.arch.to_dict()
    ref = qwen2.preset(preset)
    assert arch == {k: getattr(ref, k) for k in arch}
    cfg = qwen2.Qwen2Config(vocab_size=ref.vocab_size, **arch)
    assert abs(cfg.num_params() / 1e9 - card_params_b) < 0.01  # "Number of Parameters" on Qwen's model cards


# --- meshes against the real model shapes ---------------------------------------------------------
def param_shapes(preset: str) -> list[tuple[tuple, tuple]]:
    """(logical axes, shape) of every parameter of the released model, without allocating it."""
    state = nnx.state(qwen2.abstract_model(qwen2.preset(preset)), nnx.Param)
    return [
        (v.logical_axes, v.get_value().shape)
        for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ]


@pytest.mark.parametrize(
    "name,preset", [("qwen2_5_3b_tspo.py", "qwen2.5-3b"), ("qwen2_5_7b_tspo.py", "qwen2.5-7b")]
)
def test_every_mesh_shards_every_large_weight_and_divides_the_batches(name, preset):
    params = param_shapes(preset)
    for arg, (shape, devices) in CONFIG_MESHES[name].items():
        c = load(name, arg)
        shape = tuple(devices // math.prod(s for s in shape if s != -1) if s == -1 else s for s in shape)
        mesh = jax.sharding.AbstractMesh(shape, shd.MESH_AXES)
        batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        assert c.micro_batch % batch_shards == 0 and c.mini_batch % c.micro_batch == 0, arg
        assert (c.prompts_per_step * c.group_size) % c.mini_batch == 0
        model_shards = mesh.shape["fsdp"] * mesh.shape["tensor"]
        for axes, dims in params:
            if math.prod(dims) < (1 << 20):
                continue  # norms, biases, 3B's 2-head K/V kernels under tensor=4
            spec = shd.logical_to_spec(axes, dims, mesh)
            used = [a for s in spec if s for a in ((s,) if isinstance(s, str) else s)]
            assert math.prod(mesh.shape[a] for a in used) == model_shards, (arg, axes, dims, spec)


# --- the dtype choice -------------------------------------------------------------------------------
def test_bf16_parameters_would_lose_the_lr_1e6_updates():
    """Why model.param_dtype is float32: optax's AdamW keeps its moments in the parameters' dtype,
    and in bf16 an update of ~lr = 1e-6 is below half an ulp of most weights."""
    c = load("qwen2_5_3b_tspo.py")
    assert c.model.param_dtype == "float32"
    optim = ml_collections.ConfigDict(c.optim.to_dict())
    optim.warmup_steps = 0  # full lr from the first step
    tx, _ = update.make_optimizer(optim, c.total_steps)
    w = 0.02 * jax.random.normal(jax.random.key(0), (4096,))  # Qwen2.5's init scale
    g = jax.random.normal(jax.random.key(1), (4096,))

    @jax.jit
    def step(params, grads):
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    changed = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        params = {"w": w.astype(dtype)}
        new, state = step(params, {"w": g.astype(dtype)})
        assert all(x.dtype == dtype for x in jax.tree.leaves(state) if x.ndim == 1)  # moments follow params
        changed[jnp.dtype(dtype).name] = float(jnp.mean(new["w"] != params["w"]))
    assert changed["float32"] == 1.0
    assert changed["bfloat16"] < 0.1


# --- the offline real-checkpoint config --------------------------------------------------------------
def test_offline_config_is_the_same_recipe_on_the_demo_task():
    off, big, demo = load("qwen2_5_0_5b_offline.py"), load("qwen2_5_3b_tspo.py"), load("demo.py")
    assert off.model.checkpoint == str(default_checkpoint_dir())
    assert off.data.to_dict() == demo.data.to_dict()
    assert off.retriever.to_dict() == demo.retriever.to_dict()
    assert (off.prompts_per_step, off.group_size, off.rollout.max_turns) == (4, 4, 2)
    assert (off.rollout.max_response_length, off.rollout.max_obs_length) == (128, 256)
    assert off.warmstart.steps == 0 and off.rollout.use_chat_template and off.model.tokenizer == ""
    assert "num_turns" not in off.reward  # the reward's turn slots follow the rollout's
    for section in ("optim", "loss", "advantage"):
        assert off[section].to_dict() == big[section].to_dict(), section
    assert off.reward.folr.to_dict() == big.reward.folr.to_dict()


def test_offline_arch_mirrors_the_built_checkpoint():
    config_json = default_checkpoint_dir() / "config.json"
    if not config_json.exists():
        pytest.skip("build it with python -m tspo_jax.model.build_offline_checkpoint")
    hf = json.loads(config_json.read_text())
    arch = load("qwen2_5_0_5b_offline.py").model.arch
    assert (
        arch.hidden_size,
        arch.intermediate_size,
        arch.num_layers,
        arch.num_heads,
        arch.num_kv_heads,
        arch.tie_word_embeddings,
    ) == (
        hf["hidden_size"],
        hf["intermediate_size"],
        hf["num_hidden_layers"],
        hf["num_attention_heads"],
        hf["num_key_value_heads"],
        hf["tie_word_embeddings"],
    )
