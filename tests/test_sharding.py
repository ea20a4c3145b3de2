"""Sharded execution on 8 fake CPU devices equals single-device execution."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_reference import random_hf_model, tiny_hf_config
from tspo_jax import sharding as shd
from tspo_jax.model import params as params_lib
from tspo_jax.model import qwen2


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    hf = random_hf_model(tiny_hf_config(tie=False), seed=3)
    d = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(d)
    return d


def test_eight_fake_devices_are_there():
    assert jax.device_count() == 8, "tests/conftest.py must set --xla_force_host_platform_device_count=8"


def test_logical_rules_replicate_what_does_not_divide():
    mesh = shd.make_mesh((1, 2, 4))
    assert shd.logical_to_spec(("vocab", "embed"), (256, 64), mesh) == P("tensor", "fsdp")
    # 2 KV heads cannot be split 4 ways: replicated, and the mesh axis stays free.
    assert shd.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
    assert shd.logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P("fsdp", "tensor", None)
    with pytest.raises(ValueError, match="needs 16 devices but 8"):
        shd.make_mesh((4, 4, 1))
    assert shd.make_mesh((-1, 2, 1)).shape == {"data": 4, "fsdp": 2, "tensor": 1}


EXPECTED = {  # mesh -> (embed spec, q kernel spec, k kernel spec, mlp up spec)
    (8, 1, 1): (P(None, None), P(None, None, None), P(None, None, None), P(None, None)),
    (2, 4, 1): (P(None, "fsdp"), P("fsdp", None, None), P("fsdp", None, None), P("fsdp", None)),
    (1, 2, 4): (P("tensor", "fsdp"), P("fsdp", "tensor", None), P("fsdp", None, None), P("fsdp", "tensor")),
}


@pytest.mark.parametrize("mesh_shape", list(EXPECTED), ids=str)
def test_sharded_forward_equals_single_device(ckpt_dir, mesh_shape):
    ref_model = params_lib.load_hf_checkpoint(ckpt_dir)
    ids = np.random.RandomState(0).randint(0, 256, (8, 16)).astype(np.int32)
    valid = np.ones_like(ids, bool)
    valid[1, :5] = False  # a left-padded row
    ref = np.asarray(ref_model(jnp.asarray(ids), valid=jnp.asarray(valid))[0])

    mesh = shd.make_mesh(mesh_shape)
    model = params_lib.load_hf_checkpoint(ckpt_dir, mesh=mesh)
    embed_spec, q_spec, k_spec, up_spec = EXPECTED[mesh_shape]
    assert model.embed[...].sharding.spec == embed_spec
    assert model.layers[0].attn.q_kernel[...].sharding.spec == q_spec
    assert model.layers[1].attn.k_kernel[...].sharding.spec == k_spec
    assert model.layers[1].mlp.up_kernel[...].sharding.spec == up_spec
    assert len(model.embed[...].sharding.device_set) == 8

    graphdef, state = nnx.split(model)
    state_sh = shd.state_shardings(state, mesh)
    fwd = jax.jit(
        functools.partial(qwen2.apply, graphdef),
        in_shardings=(state_sh, shd.batch_sharding(mesh), shd.batch_sharding(mesh)),
        out_shardings=(NamedSharding(mesh, shd.batch_spec(3)), None),
    )
    ids_d, valid_d = shd.shard_batch((ids, valid), mesh)
    out, _ = fwd(state, ids_d, valid_d)
    assert out.sharding.spec == shd.batch_spec(3)
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-5)


def test_shard_model_moves_an_initialised_model(ckpt_dir):
    mesh = shd.make_mesh((2, 2, 2))
    model = qwen2.init_model(qwen2.Qwen2Config.from_hf_config(ckpt_dir), seed=1)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (4, 8)))
    before = np.asarray(model(ids)[0])
    shd.shard_model(model, mesh)
    assert model.layers[0].mlp.down_kernel[...].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_allclose(np.asarray(model(ids)[0]), before, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 2, 4)], ids=str)
def test_pinned_activations_change_the_layout_not_the_numbers(ckpt_dir, mesh_shape):
    """model.shard_activations pins every block's activations to the batch (and tensor) axes of the
    mesh in context: the logits and the gradient equal the single-device ones (float32, 1e-5), and
    the constraints are in the traced program only when it is on and a mesh is in context."""
    ids = np.random.RandomState(4).randint(0, 256, (8, 16)).astype(np.int32)
    valid = np.ones_like(ids, bool)
    valid[2, :6] = False  # a left-padded row
    valid[5, :3] = False

    def loss(model_params, graphdef, ids, valid):
        logits, _ = qwen2.apply(graphdef, model_params, ids, valid=valid)
        return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0) ** 2) / 1e4

    ref_model = params_lib.load_hf_checkpoint(ckpt_dir)
    ref_gd, ref_state = nnx.split(ref_model)
    ref_loss, ref_grad = jax.value_and_grad(loss)(ref_state, ref_gd, jnp.asarray(ids), jnp.asarray(valid))

    mesh = shd.make_mesh(mesh_shape)
    model = params_lib.load_hf_checkpoint(ckpt_dir, mesh=mesh, shard_activations=True)
    graphdef, state = nnx.split(model)
    ids_d, valid_d = shd.shard_batch((ids, valid), mesh)

    def pinned(params, ids, valid):
        with shd.activation_mesh(mesh):
            return jax.value_and_grad(loss)(params, graphdef, ids, valid)

    fn = jax.jit(pinned, in_shardings=(shd.state_shardings(state, mesh), shd.batch_sharding(mesh),
                                       shd.batch_sharding(mesh)))
    n_layers = len(model.layers)
    # Per block: q, k, v, the heads before o-proj, o-proj's output, gate, up, down; plus the embedding;
    # each once in the forward and once, transposed, in the backward.
    assert fn.lower(state, ids_d, valid_d).as_text().count("sharding_constraint") == 2 * (8 * n_layers + 1)
    got_loss, got_grad = fn(state, ids_d, valid_d)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-4)
    # Off, or on without a mesh in context: no constraint is traced.
    plain = jax.jit(lambda p, i, v: jax.value_and_grad(loss)(p, graphdef, i, v))
    assert plain.lower(state, ids_d, valid_d).as_text().count("sharding_constraint") == 0
