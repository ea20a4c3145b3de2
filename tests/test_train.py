"""The main job end to end on the demo task: training, evaluation, resume, SIGTERM, config errors."""

import importlib.util
import json
import os
import signal

import numpy as np
import pytest

from tspo_jax import config_checks
from tspo_jax.metrics import read_metrics
from tspo_jax.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name="demo.py"):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo_index") / "index")


def tiny_config(index_dir, **kw):
    c = load_config()
    c.total_steps = 3
    c.prompts_per_step = 2
    c.group_size = 4
    c.mini_batch = 8
    c.micro_batch = 8  # 8 fake devices: the batch is split over all of them
    c.checkpoint_every = 1
    c.progress_bar = False
    c.model.arch.hidden_size = 32
    c.model.arch.intermediate_size = 64
    c.model.arch.num_layers = 1
    c.model.arch.num_heads = 2
    c.model.arch.num_kv_heads = 1
    c.retriever.index_dir = index_dir
    c.retriever.mode = "exact"
    c.rollout.max_turns = 1
    c.rollout.max_response_length = 12
    c.rollout.max_obs_length = 48
    c.warmstart.steps = 2
    c.warmstart.batch_size = 8
    c.eval.every = 3
    c.eval.max_examples = 4
    c.eval.batch_size = 4
    return set_keys(c, kw)


def set_keys(c, overrides: dict):
    """c with each dotted key ("rollout.slots") set, as --config.KEY=VALUE does."""
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def run(config, workdir):
    trainer = Trainer(config, workdir)
    try:
        last = trainer.train()
        return trainer, last
    finally:
        trainer.close()


def test_training_run_writes_metrics_checkpoints_plot_and_eval(index_dir, tmp_path):
    wd = str(tmp_path / "run")
    trainer, last = run(tiny_config(index_dir), wd)
    rows = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # step 0 is the evaluation of the warm start
    for key in (
        "critic/score/mean",
        "adv/homogenized_group_frac",
        "actor/pg_loss",
        "actor/grad_norm",
        "timing_s/gen",
        "timing_s/update_actor",
        "perf/throughput",
        "adv/folr_rescued_frac",
        "critic/score/demo_2hop",
    ):
        assert key in rows[1], key
    assert "val/em/all" in rows[0] and "val/em/all" in rows[3]
    assert os.path.exists(os.path.join(wd, "training.png"))
    assert os.path.exists(os.path.join(wd, "eval", "step_3.md"))
    assert sorted(os.listdir(os.path.join(wd, "checkpoints")))[-1] == "3"
    assert os.listdir(os.path.join(wd, "tensorboard"))
    table = open(os.path.join(wd, "eval", "step_3.md")).read()
    assert "| demo_" in table and "**all**" in table
    assert all(np.isfinite(r["actor/grad_norm"]) and r["actor/grad_norm"] >= 0 for r in rows[1:])
    saved = json.load(open(os.path.join(wd, "run_config.json")))
    assert saved["rollout"]["template"] == trainer.config.rollout.template
    assert saved["total_steps"] == 3


def test_resume_after_kill_equals_uninterrupted_run(index_dir, tmp_path):
    full = str(tmp_path / "full")
    _, _ = run(tiny_config(index_dir, **{"eval.every": 0}), full)
    split = str(tmp_path / "split")
    _, _ = run(tiny_config(index_dir, **{"eval.every": 0, "total_steps": 2}), split)  # "killed" after step 2
    trainer, _ = run(tiny_config(index_dir, **{"eval.every": 0}), split)  # same command again: resumes
    a = read_metrics(os.path.join(full, "metrics.jsonl"))
    b = read_metrics(os.path.join(split, "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in (
        "critic/score/mean",
        "actor/pg_loss",
        "actor/grad_norm",
        "response_length/mean",
        "actor/entropy",
    ):
        np.testing.assert_allclose(b[2][key], a[2][key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_sigterm_saves_and_exits_cleanly(index_dir, tmp_path, monkeypatch):
    wd = str(tmp_path / "preempted")
    original = Trainer.step

    def step_then_preempt(self, step):
        out = original(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, handled by the trainer
        return out

    monkeypatch.setattr(Trainer, "step", step_then_preempt)
    config = tiny_config(index_dir, **{"eval.every": 0, "checkpoint_every": 100})
    run(config, wd)
    rows = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1]
    assert os.listdir(os.path.join(wd, "checkpoints")) == ["1"]  # saved although not a checkpoint step
    assert signal.getsignal(signal.SIGTERM) is not None


@pytest.mark.parametrize(
    "override,message",
    [
        ({"advantage.name": "ppo"}, "grpo"),
        ({"rollout.resume": "maybe"}, "resume must be"),
        ({"mini_batch": 7}, "multiple of micro_batch"),
        ({"data.train": "/nope.jsonl"}, "does not exist"),
        ({"model.checkpoint": "/no/such/dir"}, "not a directory"),
        ({"reward.folr.scope": "everywhere"}, "scope"),
        ({"optim.schedule": "linear"}, "constant or cosine"),
        ({"mesh.shape": (3, 1, 1)}, "needs 3 devices"),
        ({"model.attention_chunk": 0}, "attention_chunk"),
        ({"rollout.slots": 4}, r"rollout\.slots=4 must be a multiple of the data x fsdp devices \(8\)"),
        ({"rollout.decode_chunk": 0}, "decode_chunk must be"),
        ({"rollout.engine": "vllm"}, "engine must be"),
    ],
)
def test_bad_config_is_a_clear_error_before_compute(index_dir, override, message):
    with pytest.raises(config_checks.ConfigError, match=message):
        config_checks.validate_config(tiny_config(index_dir, **override))


def test_unknown_config_key_on_the_command_line_is_refused(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tspo_jax.train",
            f"--config={ROOT}/configs/demo.py",
            f"--workdir={tmp_path}",
            "--config.totl_steps=3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode != 0
    assert "totl_steps" in out.stderr


def test_learning_rate_is_stepped_per_training_step_not_per_update(index_dir, tmp_path):
    """Finding 1: with mini_batch < batch every update of training step t applies schedule(t - 1)
    (Search-R1 steps its scheduler once per training step), and actor/lr logs that rate."""
    import optax

    config = tiny_config(index_dir, **{"eval.every": 0, "prompts_per_step": 4, "mini_batch": 8,
                                       "optim.warmup_steps": 3, "total_steps": 3})
    trainer = Trainer(config, str(tmp_path / "lr"))
    applied = []
    original = trainer.rt.updater.update

    def recording_update(params, opt_state, batch, lr=None):
        out = original(params, opt_state, batch, lr=lr)
        applied.append((trainer_step[0], float(optax.tree_utils.tree_get(out[1], "learning_rate"))))
        return out

    trainer.rt.updater.update = recording_update
    trainer_step = [0]
    step = trainer.step

    def counting_step(s):
        trainer_step[0] = s
        return step(s)

    trainer.step = counting_step
    try:
        trainer.train()
    finally:
        trainer.close()
    assert [s for s, _ in applied] == [1, 1, 2, 2, 3, 3]  # 16 rows / mini-batch 8: two updates per step
    expect = {s: float(np.float32(trainer.rt.schedule(s - 1))) for s in (1, 2, 3)}
    assert expect[1] == 0.0 and 0 < expect[2] < expect[3] < config.optim.lr
    for s, lr in applied:
        assert lr == expect[s], (s, lr, expect[s])
    rows = read_metrics(os.path.join(str(tmp_path / "lr"), "metrics.jsonl"))
    assert [r["actor/lr"] for r in rows] == [expect[1], expect[2], expect[3]]


def _write_nq_search_parquet(path, jsonl, limit):
    """A parquet laid out exactly as Search-R1's scripts/data_process/nq_search.py writes it: no
    `question`, `id` or `golden_answers` column here, the prompt as chat messages, the golds under
    reward_model.ground_truth.target and the row number under extra_info.index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tspo_jax import rollout

    rows = [json.loads(line) for line in open(jsonl)][:limit]
    table = {
        "data_source": [r["data_source"] for r in rows],
        "prompt": [[{"role": "user", "content": rollout.SEARCH_R1_TEMPLATE.format(question=r["question"])}]
                   for r in rows],
        "ability": ["fact-reasoning"] * len(rows),
        "reward_model": [{"style": "rule", "ground_truth": {"target": r["golden_answers"]}} for r in rows],
        "extra_info": [{"split": "train", "index": i} for i in range(len(rows))],
    }
    pq.write_table(pa.table(table), path)
    return rows


def test_search_r1_parquet_trains_and_evaluates_with_its_own_prompts(index_dir, tmp_path):
    """Finding 5: data.prompt_source="column" takes each row's `prompt` messages through the chat
    template (as verl does); a Search-R1 parquet then trains and evaluates."""
    from tspo_jax import data, rollout
    from tspo_jax.demo_task import demo_paths

    paths = demo_paths()
    train_rows = _write_nq_search_parquet(tmp_path / "train.parquet", paths["train"], 40)
    _write_nq_search_parquet(tmp_path / "test.parquet", paths["test"], 4)
    examples = data.load_qa(tmp_path / "train.parquet", prompt_source="column")
    assert [ex.question for ex in examples] == [r["question"] for r in train_rows]  # from the prompt
    assert [ex.golds for ex in examples] == [r["golden_answers"] for r in train_rows]
    assert examples[3].uid == f"{train_rows[3]['data_source']}/row-3"
    with pytest.raises(ValueError, match="prompt"):
        data.load_qa(paths["train"], prompt_source="column")  # no prompt column: a clear error

    config = tiny_config(index_dir, **{
        "data.train": str(tmp_path / "train.parquet"), "data.test": str(tmp_path / "test.parquet"),
        "data.prompt_source": "column", "rollout.invalid_action_message": "search_r1",
        "rollout.max_prompt_length": 512, "total_steps": 2, "eval.every": 2})
    config_checks.validate_config(config)
    trainer = Trainer(config, str(tmp_path / "run"))
    prompts = []
    run_episodes = trainer.rt.runner.run

    def recording_run(state, questions, *a, **k):
        episodes = run_episodes(state, questions, *a, **k)
        prompts.extend((q, e.tokens[: e.prompt_len]) for q, e in zip(questions, episodes[:: k.get("n", 1)]))
        return episodes

    trainer.rt.runner.run = recording_run
    try:
        last = trainer.train()
    finally:
        trainer.close()
    tok = trainer.rt.tokenizer
    assert tok.has_chat_template and prompts
    for messages, ids in prompts:
        assert messages[0]["content"].startswith("Answer the given question. You must conduct reasoning")
        assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert trainer.rt.runner.cfg.invalid_action_message == rollout.SEARCH_R1_INVALID_ACTION_MESSAGE
    assert "val/em/all" in last and np.isfinite(last["critic/score/mean"])
    table = open(os.path.join(str(tmp_path / "run"), "eval", "step_2.md")).read()
    assert "**all** | 4 |" in table
