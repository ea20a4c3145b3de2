"""A Qwen2 of any shape whose greedy output follows a script, and the script of a search turn.

Used so that our interrupt/resume rollout, our re-prefill rollout and the PyTorch Search-R1 loop
produce the *same* episodes from the same weights: the comparison is then about how each method
runs them, never about what the model happened to say. (Random weights with forced lengths would
need each method hacked to stop where the others did; Search-R1's own loop could not be used.)

How: each scripted token t gets a random unit-scale embedding e_t and the LM head column of its
successor gets margin * e_t / |e_t|, so after reading t the argmax is succ(t) by a wide margin.
The decoder layers keep their random weights (same FLOPs, same memory traffic) with the writes
into the residual stream scaled down so they never flip the argmax. The turn text is filler words
(tokens that each appear once) and then `<search> query</search>`; after a search result the
model starts the same turn again, so every episode searches max_turns times and then writes one
more (search-disabled) turn.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np

from tspo_jax import rollout
from tspo_jax.bench.configs import BenchmarkError
from tspo_jax.model import qwen2

QUERY = "Dodoles river"
QUESTIONS = (
    "Which river runs through the city of Dodoles?",
    "Where does the river of Dodoles start?",
    "Is the city of Dodoles on a wide river, and which one?",
    "Name the river at Dodoles?",
)
_FILLER = re.compile(r"^ [a-z]{3,}$")


@dataclasses.dataclass(frozen=True)
class Script:
    turn_ids: tuple[int, ...]  # one policy turn, ending in </search>
    turn_text: str
    successors: dict  # token id -> the token the model must predict after it
    prompts: tuple[tuple[int, ...], ...]  # one per question


def filler_tokens(tokenizer, count: int, exclude: set[int]) -> list[int]:
    """`count` distinct vocabulary tokens of the form ' word' that encode back to themselves."""
    out = []
    for i in range(tokenizer.vocab_size):
        if i in exclude or i in tokenizer.special_ids:
            continue
        s = tokenizer.decode([i])
        if _FILLER.match(s) and tokenizer.encode(s) == [i]:
            out.append(i)
            if len(out) == count:
                return out
    raise BenchmarkError(f"the tokenizer has only {len(out)} ' word' tokens; a turn needs {count}: lower turn_tokens")


def successor_map(chains) -> dict[int, int]:
    succ: dict[int, int] = {}
    for chain in chains:
        for a, b in zip(chain[:-1], chain[1:]):
            if succ.setdefault(a, b) != b:
                raise BenchmarkError(f"token {a} would need two successors ({succ[a]} and {b}); change the script")
    return succ


def make_script(tokenizer, turn_tokens: int, obs_ids_example: list[int]) -> Script:
    call = tokenizer.encode(f"<search> {QUERY}</search>")
    if turn_tokens <= len(call):
        raise BenchmarkError(f"turn_tokens={turn_tokens} leaves no room before the {len(call)}-token search call")
    prompts = tuple(tuple(tokenizer.encode(q)) for q in QUESTIONS)
    avoid = set(call) | {p[-1] for p in prompts} | {obs_ids_example[-1]}
    filler = filler_tokens(tokenizer, turn_tokens - len(call), avoid)
    text = tokenizer.decode(filler) + f"<search> {QUERY}</search>"
    turn = tokenizer.encode(text)
    if turn != filler + call or tokenizer.decode(turn) != text:
        raise BenchmarkError("the scripted turn does not survive decode -> encode with this tokenizer")
    chains = [[p[-1], turn[0]] for p in prompts] + [[obs_ids_example[-1], turn[0]], turn]
    return Script(tuple(turn), text, successor_map(chains), prompts)


def script_weights(model: qwen2.Qwen2, successors: dict, *, margin: float = 1.5, residual_scale: float = 0.1,
                   seed: int = 0) -> qwen2.Qwen2:
    """Rewrites the embedding, LM head and residual writes of `model` (in place) to follow the script."""
    cfg = model.cfg
    if cfg.tie_word_embeddings:
        raise BenchmarkError("a scripted model needs an untied LM head (tie_word_embeddings=False)")
    rs = np.random.default_rng(seed)
    pdt = cfg.jnp_param_dtype
    embed = rs.standard_normal((cfg.vocab_size, cfg.hidden_size), dtype=np.float32)
    head = 0.02 * rs.standard_normal((cfg.hidden_size, cfg.vocab_size), dtype=np.float32)
    for a, b in successors.items():
        head[:, b] += margin * embed[a] / np.linalg.norm(embed[a])
    model.embed.set_value(jnp.asarray(embed, pdt))
    model.lm_head.set_value(jnp.asarray(head, pdt))
    for layer in model.layers:
        for var in (layer.attn.o_kernel, layer.mlp.down_kernel):
            var.set_value(var[...] * residual_scale)
    return model


def observation_example(tokenizer, max_obs_length: int) -> list[int]:
    return rollout.observation_ids(tokenizer, "Doc 1(Title: x) y\n", max_obs_length)
