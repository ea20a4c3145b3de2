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

The long-tailed shape (`make_long_tail_script`) samples instead: the fillers form a cycle, and after
each filler the model's two best tokens are the next filler and the start of the search call, the
call with probability ~1/`mean_turn` (sampled with top_k=2 at temperature 1). Turn lengths are then
geometric (mean ~`mean_turn`, cut at the per-turn limit); the engines draw them from keys made of
(seed, episode, turn, position), so every one of our methods samples the same episodes, and the
PyTorch contenders are given those tokens (see episodes.py).
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


@dataclasses.dataclass(frozen=True)
class LongTailScript:
    fillers: tuple[int, ...]  # a cycle: each filler's successor is the next one
    call: tuple[int, ...]  # `<search> QUERY</search>`: the branch after any filler
    successors: dict
    prompts: tuple[tuple[int, ...], ...]
    mean_turn: float


def make_long_tail_script(tokenizer, obs_ids_example: list[int], *, mean_turn: float = 150.0,
                          cycle: int = 64) -> LongTailScript:
    call = tokenizer.encode(f"<search> {QUERY}</search>")
    prompts = tuple(tuple(tokenizer.encode(q)) for q in QUESTIONS)
    invalid_end = tokenizer.encode(rollout.INVALID_ACTION_MESSAGE)[-1]
    avoid = set(call) | {p[-1] for p in prompts} | {obs_ids_example[-1], invalid_end}
    fillers = filler_tokens(tokenizer, cycle, avoid)
    # Every turn starts at fillers[0]: after a prompt, an observation or the invalid-action message.
    chains = [[t, fillers[0]] for t in {p[-1] for p in prompts} | {obs_ids_example[-1], invalid_end}]
    chains += [fillers + fillers[:1], call]
    return LongTailScript(tuple(fillers), tuple(call), successor_map(chains), prompts, mean_turn)


def long_tail_weights(model: qwen2.Qwen2, script: LongTailScript, *, margin: float = 2.0,
                      residual_scale: float = 0.1, seed: int = 0) -> qwen2.Qwen2:
    """Scripted weights whose fillers also lead to the call's first token with log-odds
    -log(mean_turn - 1): filler embeddings share a unit direction c (half their norm), the call's
    head column reads c and the successor columns read the rest, so the odds are the same after
    every filler."""
    d = model.cfg.hidden_size
    rs = np.random.default_rng(seed + 1)
    c = rs.standard_normal(d).astype(np.float32)
    c /= np.linalg.norm(c)
    model = script_weights(model, script.successors, margin=margin, residual_scale=residual_scale, seed=seed,
                           shared=(script.fillers, c))
    head = np.array(model.lm_head[...], np.float32)
    # h ~ sqrt(d) * (c + r) / sqrt(2) after a filler: successor logit margin * sqrt(d / 2).
    head[:, script.call[0]] += (margin - np.log(script.mean_turn - 1) / np.sqrt(d / 2)) * c
    model.lm_head.set_value(jnp.asarray(head, model.cfg.jnp_param_dtype))
    return model


def script_weights(model: qwen2.Qwen2, successors: dict, *, margin: float = 1.5, residual_scale: float = 0.1,
                   seed: int = 0, shared: tuple | None = None) -> qwen2.Qwen2:
    """Rewrites the embedding, LM head and residual writes of `model` (in place) to follow the script.
    `shared` = (tokens, unit vector c): those tokens' embeddings are (c + r) / sqrt(2) with r a unit
    vector orthogonal to c, and their successors read r only (see long_tail_weights)."""
    cfg = model.cfg
    if cfg.tie_word_embeddings:
        raise BenchmarkError("a scripted model needs an untied LM head (tie_word_embeddings=False)")
    rs = np.random.default_rng(seed)
    pdt = cfg.jnp_param_dtype
    embed = rs.standard_normal((cfg.vocab_size, cfg.hidden_size), dtype=np.float32)
    head = 0.02 * rs.standard_normal((cfg.hidden_size, cfg.vocab_size), dtype=np.float32)
    reads = {}  # token -> the unit direction its successor's head column reads
    if shared:
        tokens, c = shared
        for t in tokens:
            r = embed[t] - (embed[t] @ c) * c
            r /= np.linalg.norm(r)
            reads[t] = r
            embed[t] = (c + r) / np.sqrt(2) * np.sqrt(cfg.hidden_size)
    for a, b in successors.items():
        head[:, b] += margin * reads.get(a, embed[a] / np.linalg.norm(embed[a]))
    model.embed.set_value(jnp.asarray(embed, pdt))
    model.lm_head.set_value(jnp.asarray(head, pdt))
    for layer in model.layers:
        for var in (layer.attn.o_kernel, layer.mlp.down_kernel):
            var.set_value(var[...] * residual_scale)
    return model


def observation_example(tokenizer, max_obs_length: int) -> list[int]:
    return rollout.observation_ids(tokenizer, "Doc 1(Title: x) y\n", max_obs_length)
