"""Host + device cost of compute_rewards + compute_advantages on a synthetic Search-R1-sized step.

Default: 512 prompts x 5 rollouts = 2,560 episodes, each with 4 search turns of 3 retrieved
~100-word documents and a final answer turn (K = 5), token arrays of T = 3,072.

    python tools/bench_core.py [--prompts 512] [--n 5] [--turns 4] [--docs 3] [--doc_words 100]
                               [--seq_len 3072] [--repeats 3] [--estimator tspo]
                               [--scope information|all] [--match substring|word]

Documents are drawn independently for every observation (worst case for the normalisation
cache); a quarter of the observations contain a gold alias.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from tspo_jax import advantages, rewards  # noqa: E402


def make_vocabulary(rng: np.random.Generator, size: int = 20000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 10, size)
    return ["".join(rng.choice(letters, n)) for n in lengths]


def make_episodes(args, rng: np.random.Generator) -> list[rewards.EpisodeText]:
    vocab = make_vocabulary(rng)

    def words(n: int) -> str:
        return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))

    def document(gold: str | None) -> str:
        body = words(args.doc_words).split()
        if gold is not None:
            body.insert(int(rng.integers(0, len(body))), gold)
        title = body[0].capitalize()
        return f"{title}\n{' '.join(body)}."

    episodes = []
    for p in range(args.prompts):
        question = words(12).capitalize() + "?"
        golds = [words(int(rng.integers(1, 4))) for _ in range(int(rng.integers(1, 4)))]
        source = ("nq", "hotpotqa")[p % 2]
        for _ in range(args.n):
            turn_texts, observations = [], []
            for _ in range(args.turns):
                turn_texts.append(f"<think>{words(30)}</think>\n<search> {words(6)} </search>")
                hit = rng.random() < 0.25
                docs = [document(golds[0] if hit and d == 0 else None) for d in range(args.docs)]
                body = "".join(
                    f"Doc {i + 1}(Title: {doc.split(chr(10))[0]}) {doc.split(chr(10), 1)[1]}\n"
                    for i, doc in enumerate(docs)
                )
                observations.append(f"\n\n<information>{body}</information>\n\n")
            answer = golds[0] if rng.random() < 0.3 else words(2)
            turn_texts.append(f"<think>{words(30)}</think>\n<answer> {answer} </answer>")
            observations.append(None)
            response = "".join(t + (o or "") for t, o in zip(turn_texts, observations))
            episodes.append(rewards.EpisodeText(question, golds, source, turn_texts, observations, response))
    return episodes


def make_token_arrays(num_turns: list[int], seq_len: int, k: int, rng: np.random.Generator):
    """turn_ids / loss_mask with a prompt, then per turn ~100 policy and ~400 observation tokens."""
    b = len(num_turns)
    turn_ids = np.full((b, seq_len), -1, np.int32)
    loss_mask = np.zeros((b, seq_len), np.float32)
    for row, turns in enumerate(num_turns):
        t = int(rng.integers(100, 300))
        for turn in range(turns):
            policy, observation = (
                int(rng.integers(50, 150)),
                (int(rng.integers(300, 500)) if turn < turns - 1 else 0),
            )
            end = min(t + policy, seq_len)
            turn_ids[row, t:end], loss_mask[row, t:end] = turn, 1.0
            t = end
            end = min(t + observation, seq_len)
            turn_ids[row, t:end] = turn
            t = end
    return turn_ids, loss_mask


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--turns", type=int, default=4, help="search turns; one answer turn follows")
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--doc_words", type=int, default=100)
    parser.add_argument("--seq_len", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--estimator", default="tspo")
    parser.add_argument("--scope", default="information", help="rewards.folr.scope")
    parser.add_argument("--match", default="substring", help="rewards.folr.match")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    episodes = make_episodes(args, rng)
    cfg = rewards.default_config()
    cfg.num_turns = args.turns + 1
    cfg.folr.scope, cfg.folr.match = args.scope, args.match
    obs_chars = sum(len(o) for ep in episodes for o in ep.observations if o)

    reward_times, rb = timed(lambda: rewards.compute_rewards(episodes, cfg), args.repeats)

    group_ids = np.repeat(np.arange(args.prompts), args.n).astype(np.int32)
    turn_ids, loss_mask = make_token_arrays(
        [len(ep.turn_texts) for ep in episodes], args.seq_len, cfg.num_turns, rng
    )

    def advantage_step():
        token_adv, metrics = advantages.compute_advantages(
            args.estimator,
            rb.outcome,
            rb.turn_returns,
            rb.turn_valid,
            rb.first_occurrence,
            group_ids,
            turn_ids,
            loss_mask,
            num_groups=args.prompts,
            correct=rb.em > 0,
        )
        return jax.block_until_ready((token_adv, metrics))

    compile_times, _ = timed(advantage_step, 1)
    adv_times, (_, metrics) = timed(advantage_step, max(args.repeats, 3))
    by_source = advantages.reward_by_source(rb.outcome, [ep.data_source for ep in episodes])

    result = {
        "episodes": len(episodes),
        "observation_mb": round(obs_chars / 1e6, 1),
        "device": str(jax.devices()[0]),
        "compute_rewards_s": [round(t, 3) for t in reward_times],
        "compute_advantages_first_call_s": round(compile_times[0], 3),
        "compute_advantages_s": [round(t, 4) for t in adv_times],
        "total_median_s": round(statistics.median(reward_times) + statistics.median(adv_times), 3),
        "em_mean": float(rb.em.mean()),
        "k_star_hit_frac": float((rb.first_occurrence >= 0).mean()),
        "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        "reward_by_source": {k: round(v, 4) for k, v in by_source.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
