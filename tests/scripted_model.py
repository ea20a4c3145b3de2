"""A real Qwen2 whose weights make greedy decoding follow a script.

The embeddings are random unit-scale vectors and the output projection maps token t's embedding
to a chosen successor token, so after reading t the model's argmax is succ(t) by a wide margin.
The decoder layers keep small random weights: every logit still depends on the whole context
(so cache bugs change the logprobs), but not enough to change the argmax. Used to drive
multi-turn episodes deterministically through the real sampler, cache and rollout code.
"""

import jax.numpy as jnp
import numpy as np

from tspo_jax.model import qwen2


def successor_map(chains):
    """chains: list of token-id lists; each token's successor is the next one in its chain."""
    succ = {}
    for chain in chains:
        for a, b in zip(chain[:-1], chain[1:]):
            if succ.get(a, b) != b:
                raise ValueError(f"token {a} needs two successors ({succ[a]} and {b}): change the script")
            succ[a] = b
    return succ


def scripted_model(vocab_size: int, succ: dict, *, hidden=64, layers=2, margin=1.5, seed=0) -> qwen2.Qwen2:
    cfg = qwen2.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=10000.0,
    )
    model = qwen2.init_model(cfg, seed=seed)
    rs = np.random.RandomState(seed)
    embed = rs.normal(size=(vocab_size, hidden)).astype(np.float32)
    head = 0.02 * rs.normal(size=(hidden, vocab_size)).astype(np.float32)
    for a, b in succ.items():
        head[:, b] += margin * embed[a] / np.linalg.norm(embed[a])
    # Sharp, position-dependent attention (large q/k) with small values: the context moves every
    # logprob (a wrong position or cache slot shows) without moving the argmax.
    for layer in model.layers:
        for name in ("q_kernel", "k_kernel"):
            var = getattr(layer.attn, name)
            var.set_value(var[...] * 15.0)
    model.embed.set_value(jnp.asarray(embed))
    model.lm_head.set_value(jnp.asarray(head))
    return model
