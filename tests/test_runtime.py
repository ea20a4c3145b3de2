"""Runtime: the abstract build matches the real one (shapes, dtypes, shardings), the optimizer
state keeps its shardings, and evaluation restores a chosen step without writing the workdir."""

import os

import jax
import numpy as np
import pytest

from tspo_jax import evaluate
from tspo_jax.config_checks import ConfigError
from tspo_jax.runtime import Runtime
from tspo_jax.train import Trainer

from test_train import index_dir, tiny_config  # noqa: F401  (index_dir is a fixture)


def _specs(tree):
    return [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree)]


def _same(a, b):
    """Same shapes and dtypes, and shardings that place every element alike (P() == P(None, None))."""
    return len(a) == len(b) and all(
        sa == sb and da == db and xa.is_equivalent_to(xb, len(sa)) for (sa, da, xa), (sb, db, xb) in zip(a, b))


@pytest.fixture(scope="module")
def trained(index_dir, tmp_path_factory):  # noqa: F811
    wd = str(tmp_path_factory.mktemp("rt") / "run")
    config = tiny_config(index_dir, **{"eval.every": 0, "total_steps": 2, "warmstart.steps": 0,
                                       "mesh.shape": (4, 2, 1), "micro_batch": 8})
    trainer = Trainer(config, wd)
    try:
        trainer.train()
        opt_state = trainer.opt_state
        real = (_specs(trainer.params), _specs(opt_state))
    finally:
        trainer.close()
    return config, wd, real


def test_abstract_build_has_the_real_shapes_and_shardings(trained):
    config, _, (real_params, real_opt) = trained
    rt = Runtime.abstract(config)
    try:
        assert rt.retriever is None and rt.checkpointer is None and not rt.train_examples
        assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rt.params))
        assert _same(_specs(rt.params), real_params)
        assert _same(_specs(rt.abstract_opt_state()), real_opt)
        # Some parameter really is split over the mesh, so the comparison above means something.
        assert any(not s.is_fully_replicated for _, _, s in real_params)
        shapes = rt.shapes
        assert shapes.rows == config.prompts_per_step * config.group_size
        assert shapes.context_len > shapes.prompt_len and shapes.vocab_size == rt.model_cfg.vocab_size
        # The updater's jitted functions lower on abstract arguments.
        batch = {k: jax.ShapeDtypeStruct((8, 64), dt) for k, dt in (("tokens", np.int32), ("valid", bool))}
        lowered = rt.updater.jitted["logprobs"].lower(rt.params, batch["tokens"], batch["valid"])
        assert "func.func" in lowered.as_text()
    finally:
        rt.close()


def test_abstract_build_needs_no_data_files(index_dir):  # noqa: F811
    config = tiny_config(index_dir, **{"data.train": "/no/such/train.jsonl", "data.test": "/no/such/test.jsonl"})
    with pytest.raises(ConfigError, match="does not exist"):
        Runtime.build(config, "/tmp/unused")
    rt = Runtime.abstract(config)
    assert rt.tokenizer is not None and rt.runner is not None


def test_evaluate_a_given_step_leaves_the_workdir_alone(trained):
    config, wd, _ = trained
    run_config = os.path.join(wd, "run_config.json")
    before = (open(run_config).read(), os.path.getmtime(run_config))
    rt1, r1 = evaluate.evaluate(config, wd, step=1)
    rt2, r2 = evaluate.evaluate(config, wd)
    assert (rt1.step, rt1.source, rt2.step, rt2.source) == (1, "workdir@1", 2, "workdir@2")
    assert r1["metrics"]["em/all"] >= 0 and len(r1["rows"]) == config.eval.max_examples
    # Different steps hold different params.
    a, b = jax.tree.leaves(rt1.params), jax.tree.leaves(rt2.params)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
    assert (open(run_config).read(), os.path.getmtime(run_config)) == before
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
        evaluate.evaluate(config, wd, step=7)


def test_abstract_plans_a_7b_shape_with_no_checkpoint_here(index_dir):  # noqa: F811
    from tspo_jax.model import qwen2

    ref = qwen2.preset("qwen2.5-7b")
    config = tiny_config(index_dir, **{"mesh.shape": (1, 8, 1), "model.checkpoint": "/not/on/this/machine"})
    config.unlock()
    for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        config.model.arch[k] = getattr(ref, k)
    config.model.arch.tie_word_embeddings = False
    rt = Runtime.abstract(config)
    leaves = jax.tree.leaves(rt.params)
    assert sum(np.prod(x.shape) for x in leaves) == ref.num_params()
    opt = jax.tree.leaves(rt.abstract_opt_state())
    # Adam's mu and nu: twice the params, split over fsdp like them; the step counts are replicated.
    assert sum(np.prod(x.shape) for x in opt if x.ndim) == 2 * ref.num_params()
    assert all(x.sharding.is_fully_replicated for x in opt if not x.ndim)
    big = [x for x in opt if x.size > 1e6]
    assert big and all(not x.sharding.is_fully_replicated for x in big)
