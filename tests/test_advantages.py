"""Advantage estimators against plain-Python references (loops over groups), torch for verl's GRPO,
a hand-worked TSPO example, and the batch sharded over 8 fake CPU devices."""

import math
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tspo_jax import advantages as A
from tspo_jax import rewards as R

EPS = 1e-6
NAMES = ("grpo", "dr_grpo", "rloo", "tspo", "tspo_turn")

# ----------------------------------------------------------------------------- reference


def ref_normalize(values, scale=True):
    """verl's rule: a one-member group keeps its value (mean 0, std 1); std is unbiased."""
    n = len(values)
    if n == 1:
        mean, std = 0.0, 1.0
    else:
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return [(v - mean) / (std + EPS) if scale else v - mean for v in values]


def ref_turn_advantages(name, outcome, turn_returns, turn_valid, group_ids, num_groups, correct):
    """{(row, turn): advantage} for every row in a real group; missing keys mean 0."""
    B, K = turn_returns.shape
    groups = defaultdict(list)
    for b in range(B):
        if 0 <= group_ids[b] < num_groups:
            groups[int(group_ids[b])].append(b)
    adv = {}
    for rows in groups.values():
        r = [float(outcome[b]) for b in rows]
        n = len(rows)
        if name in ("grpo", "dr_grpo"):
            traj = ref_normalize(r, scale=name == "grpo")
        elif name == "rloo":
            traj = [x - (sum(r) - x) / (n - 1) for x in r] if n > 1 else r
        turns = [(b, k) for b in rows for k in range(K) if turn_valid[b, k]]
        pooled = (
            dict(zip(turns, ref_normalize([float(turn_returns[b, k]) for b, k in turns]))) if turns else {}
        )
        n_right = sum(bool(correct[b]) for b in rows)
        for i, b in enumerate(rows):
            for k in range(K):
                if name in ("grpo", "dr_grpo", "rloo"):
                    adv[b, k] = traj[i]
                elif name == "tspo_turn":
                    adv[b, k] = pooled.get((b, k), 0.0)
                elif 0 < n_right < n:  # tspo, mixed group
                    adv[b, k] = ref_normalize(r)[i]
                elif n_right == 0:  # tspo, all wrong
                    adv[b, k] = pooled.get((b, k), 0.0)
                else:  # tspo, all right
                    adv[b, k] = 0.0
    return adv


def ref_token_advantages(turn_adv, turn_ids, loss_mask, group_ids, num_groups):
    B, T = turn_ids.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            if loss_mask[b, t] and 0 <= group_ids[b] < num_groups:
                out[b, t] = turn_adv.get((b, int(turn_ids[b, t])), 0.0)
    return out


def ref_metrics(token_adv, outcome, turn_returns, turn_valid, first_occ, group_ids, num_groups, correct):
    groups = defaultdict(list)
    for b, g in enumerate(group_ids):
        if 0 <= g < num_groups:
            groups[int(g)].append(b)
    n = len(groups)
    homog = sum(all(np.all(token_adv[b] == 0) for b in rows) for rows in groups.values())
    stds = [np.std([outcome[b] for b in rows], ddof=1) if len(rows) > 1 else 0.0 for rows in groups.values()]
    wrong = [rows for rows in groups.values() if not any(correct[b] for b in rows)]
    right = [rows for rows in groups.values() if all(correct[b] for b in rows)]

    def signal(rows):
        vals = [turn_returns[b, k] for b in rows for k in range(turn_returns.shape[1]) if turn_valid[b, k]]
        return len(set(vals)) > 1

    rows_all = [b for rows in groups.values() for b in rows]
    hits = [first_occ[b] for b in rows_all if first_occ[b] >= 0]
    return {
        "adv/homogenized_group_frac": homog / n,
        "adv/reward_std_mean": sum(stds) / n,
        "adv/all_wrong_group_frac": len(wrong) / n,
        "adv/all_right_group_frac": len(right) / n,
        "adv/mixed_group_frac": (n - len(wrong) - len(right)) / n,
        "adv/folr_rescued_frac": sum(signal(rows) for rows in wrong) / max(len(wrong), 1),
        "adv/folr_hit_frac": len(hits) / len(rows_all),
        "adv/k_star_mean": sum(hits) / max(len(hits), 1),
    }


# ----------------------------------------------------------------------------- random batches

B, K, T, G = 16, 4, 24, 6


@st.composite
def batches(draw):
    group_ids = np.array(draw(st.lists(st.integers(-1, G - 1), min_size=B, max_size=B)), np.int32)
    group_ids[0] = 0  # at least one real group
    binary = draw(st.booleans())
    alpha = draw(st.sampled_from([0.25, 0.5]))
    correct = np.array(draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    # Whole groups right or wrong often enough to exercise tspo's branches.
    for g in range(G):
        mode = draw(st.sampled_from(["as drawn", "all right", "all wrong"]))
        if mode != "as drawn":
            correct[group_ids == g] = mode == "all right"
    outcome = np.zeros(B, np.float32)
    turn_returns = np.zeros((B, K), np.float32)
    turn_valid = np.zeros((B, K), bool)
    first_occ = np.full(B, -1, np.int32)
    turn_ids = np.full((B, T), -1, np.int32)
    loss_mask = np.zeros((B, T), np.float32)
    for b in range(B):
        if binary:
            outcome[b] = 1.0 if correct[b] else 0.0
        else:
            outcome[b] = draw(st.sampled_from([1.0, 0.8] if correct[b] else [0.0, 0.1, 0.2, 0.3]))
        turns = draw(st.integers(1, K))
        first_occ[b] = draw(st.integers(-1, turns - 1))
        turn_valid[b, :turns] = True
        turn_returns[b, :turns] = outcome[b]
        if not correct[b] and first_occ[b] >= 0:
            turn_returns[b, : first_occ[b] + 1] += alpha
        t = draw(st.integers(0, 4))  # prompt
        all_masked = draw(st.integers(0, 5)) == 0
        for k in range(turns):
            for _ in range(draw(st.integers(0, 3))):  # policy tokens
                turn_ids[b, t], loss_mask[b, t] = k, 0.0 if all_masked else 1.0
                t += 1
            for _ in range(draw(st.integers(0, 1))):  # observation tokens
                turn_ids[b, t] = k
                t += 1
    return dict(
        outcome=outcome,
        turn_returns=turn_returns,
        turn_valid=turn_valid,
        first_occurrence=first_occ,
        group_ids=group_ids,
        turn_ids=turn_ids,
        loss_mask=loss_mask,
        correct=correct,
    )


DTYPES = dict(
    outcome=np.float32,
    turn_returns=np.float32,
    turn_valid=bool,
    first_occurrence=np.int32,
    group_ids=np.int32,
    turn_ids=np.int32,
    loss_mask=np.float32,
    correct=bool,
)


def pad(batch):
    """Pad a small batch to the shared shapes [B], [B, K], [B, T] (padding rows get group id -1),
    so every test reuses the same compiled kernels."""
    fills = {"group_ids": -1, "turn_ids": -1, "first_occurrence": -1}
    out = {}
    for key, x in batch.items():
        x = np.asarray(x, DTYPES[key])
        full = (B,) if x.ndim == 1 else (B, K) if key in ("turn_returns", "turn_valid") else (B, T)
        out[key] = np.pad(x, [(0, f - n) for f, n in zip(full, x.shape)], constant_values=fills.get(key, 0))
    return out


def _every_estimator(batch):
    out = {name: A.compute_advantages(name, **batch, num_groups=G) for name in NAMES}
    without_correct = {k: v for k, v in batch.items() if k != "correct"}
    out["tspo/threshold"] = A.compute_advantages("tspo", **without_correct, num_groups=G)
    return out


# All estimators in one jitted program: one compile for every test that uses the shared shapes.
EVERY_ESTIMATOR = jax.jit(_every_estimator)


def run(name, batch):
    """(token advantages, metrics) as numpy for a padded batch; 'tspo/threshold' omits `correct`."""
    batch = {k: np.asarray(v, DTYPES[k]) for k, v in batch.items()}
    batch.setdefault("correct", batch["outcome"] > A.CORRECT_THRESHOLD)
    token_adv, metrics = EVERY_ESTIMATOR(batch)[name]
    return np.asarray(token_adv), {k: float(v) for k, v in metrics.items()}


@given(batch=batches())
@settings(max_examples=60, deadline=None)
def test_estimators_match_reference(batch):
    for name in NAMES:
        token_adv, metrics = run(name, batch)
        correct = batch["correct"]
        turn_adv = ref_turn_advantages(
            name, batch["outcome"], batch["turn_returns"], batch["turn_valid"], batch["group_ids"], G, correct
        )
        want = ref_token_advantages(turn_adv, batch["turn_ids"], batch["loss_mask"], batch["group_ids"], G)
        np.testing.assert_allclose(token_adv, want, rtol=1e-5, atol=1e-5, err_msg=name)
        assert token_adv.dtype == np.float32
        assert np.all(token_adv[batch["loss_mask"] == 0] == 0)
        ref = ref_metrics(
            want,
            batch["outcome"],
            batch["turn_returns"],
            batch["turn_valid"],
            batch["first_occurrence"],
            batch["group_ids"],
            G,
            correct,
        )
        # "All advantages 0" is exact equality: an advantage that is 0 in float32 can be 1e-8 in the
        # float64 reference (e.g. the middle of outcomes 0.1, 0.2, 0.3). Either count is right then.
        near_zero = np.where(np.abs(want) <= 1e-5, 0.0, want)
        loose = ref_metrics(near_zero, batch["outcome"], batch["turn_returns"], batch["turn_valid"],
                            batch["first_occurrence"], batch["group_ids"], G, correct)
        for key, value in ref.items():
            allowed = [value, loose[key]] if key == "adv/homogenized_group_frac" else [value]
            assert any(metrics[key] == pytest.approx(v, abs=1e-5) for v in allowed), (name, key, metrics[key], allowed)


def test_continuous_rewards_match_reference():
    rng = np.random.default_rng(0)
    batch = {
        "outcome": rng.uniform(-2, 3, B).astype(np.float32),
        "turn_returns": rng.uniform(-1, 1, (B, K)).astype(np.float32),
        "turn_valid": rng.random((B, K)) < 0.8,
        "first_occurrence": np.full(B, -1, np.int32),
        "group_ids": rng.integers(0, G, B).astype(np.int32),
        "turn_ids": rng.integers(-1, K, (B, T)).astype(np.int32),
        "loss_mask": (rng.random((B, T)) < 0.7).astype(np.float32),
    }
    correct = batch["outcome"] > A.CORRECT_THRESHOLD
    for name in NAMES:
        token_adv, _ = run(name, batch)
        turn_adv = ref_turn_advantages(
            name, batch["outcome"], batch["turn_returns"], batch["turn_valid"], batch["group_ids"], G, correct
        )
        want = ref_token_advantages(turn_adv, batch["turn_ids"], batch["loss_mask"], batch["group_ids"], G)
        np.testing.assert_allclose(token_adv, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_correct_defaults_to_outcome_threshold():
    # Search-R1 v0.3 values: right 1.0 / 0.8, wrong 0.0 .. 0.3; without `correct`, outcome > 0.5 decides.
    batch = pad(
        dict(
            outcome=[1.0, 0.8, 0.3, 0.2, 0.1, 0.0],
            turn_returns=np.tile([[1.0], [0.8], [0.8], [0.2], [0.6], [0.0]], 4),
            turn_valid=np.ones((6, 4), bool),
            first_occurrence=[-1, -1, 1, -1, 3, -1],
            group_ids=[0, 0, 1, 1, 1, 2],
            turn_ids=np.tile(np.arange(4), (6, 1)),
            loss_mask=np.ones((6, 4)),
        )
    )
    given_em = run("tspo", dict(batch, correct=batch["outcome"] > 0.5))
    threshold = run("tspo/threshold", batch)
    np.testing.assert_array_equal(given_em[0], threshold[0])
    assert threshold[1]["adv/all_right_group_frac"] == pytest.approx(1 / 3)
    assert threshold[1]["adv/all_wrong_group_frac"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- Search-R1 / verl GRPO


def verl_grpo(scores, index, eps=1e-6):
    """verl's compute_grpo_outcome_advantage (the loop Search-R1 runs), in torch float32."""
    scores = torch.tensor(scores, dtype=torch.float32)
    id2score = defaultdict(list)
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    mean, std = {}, {}
    for idx, vals in id2score.items():
        if len(vals) == 1:
            mean[idx], std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            mean[idx], std[idx] = torch.mean(torch.stack(vals)), torch.std(torch.stack(vals))
    return np.array([float((scores[i] - mean[index[i]]) / (std[index[i]] + eps)) for i in range(len(scores))])


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.randoms())
@settings(max_examples=40, deadline=None)
def test_grpo_matches_verl_torch(sizes, rnd):
    group_ids = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    n = len(group_ids)
    outcome = np.array([rnd.choice([0.0, 1.0]) for _ in range(n)], np.float32)
    want = verl_grpo(outcome, list(group_ids))
    batch = pad(
        dict(
            outcome=outcome,
            turn_returns=np.zeros((n, K)),
            turn_valid=np.ones((n, K), bool),
            first_occurrence=np.full(n, -1),
            group_ids=group_ids,
            turn_ids=np.zeros((n, T)),
            loss_mask=np.ones((n, T)),
        )
    )
    token_adv, _ = run("grpo", batch)
    np.testing.assert_allclose(token_adv[:n, 0], want, rtol=1e-6, atol=1e-6)
    assert np.all(token_adv[n:] == 0)  # padding rows


def test_group_size_one_follows_verl():
    # verl gives a one-member group mean 0, std 1: grpo -> r / (1 + eps); rloo, dr_grpo -> r.
    batch = pad(
        dict(
            outcome=[1.0, 0.0, 1.0],
            turn_returns=[[1.0], [0.5], [1.0]],
            turn_valid=np.ones((3, 1), bool),
            first_occurrence=[-1, 0, -1],
            group_ids=[0, 1, 2],
            turn_ids=np.zeros((3, 2)),
            loss_mask=np.ones((3, 2)),
        )
    )
    np.testing.assert_allclose(run("grpo", batch)[0][:3, 0], [1 / (1 + EPS), 0.0, 1 / (1 + EPS)], rtol=1e-7)
    np.testing.assert_allclose(run("rloo", batch)[0][:3, 0], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(run("dr_grpo", batch)[0][:3, 0], [1.0, 0.0, 1.0])
    # tspo: singletons are all right (-> 0) or all wrong (-> the single turn's G / (1 + eps)).
    np.testing.assert_allclose(run("tspo", batch)[0][:3, 0], [0.0, 0.5 / (1 + EPS), 0.0], rtol=1e-7)


def test_zero_std_groups_give_exact_zeros():
    # Five identical 0.8 rewards: a plain float32 mean is off by an ulp; we return exactly 0.
    batch = pad(
        dict(
            outcome=np.full(5, 0.8),
            turn_returns=np.full((5, 2), 0.8),
            turn_valid=np.ones((5, 2), bool),
            first_occurrence=np.full(5, -1),
            group_ids=np.zeros(5),
            turn_ids=np.tile([0, 1], (5, 1)),
            loss_mask=np.ones((5, 2)),
        )
    )
    for name in NAMES:
        token_adv, metrics = run(name, batch)
        assert np.all(token_adv == 0.0), name
        assert metrics["adv/homogenized_group_frac"] == 1.0


# ----------------------------------------------------------------------------- hand-worked example


def layout(turns_per_episode, searched):
    """Token layout: 2 prompt tokens; per turn 2 policy tokens, then 1 observation token if it searched."""
    turn_ids = np.full((len(turns_per_episode), T), -1, np.int32)
    loss_mask = np.zeros((len(turns_per_episode), T), np.float32)
    for b, turns in enumerate(turns_per_episode):
        t = 2
        for k in range(turns):
            turn_ids[b, t : t + 2], loss_mask[b, t : t + 2] = k, 1.0
            t += 2
            if searched[b][k]:
                turn_ids[b, t] = k
                t += 1
    return turn_ids, loss_mask


def test_hand_worked_example():
    """One prompt, five rollouts, all wrong: GRPO learns nothing, TSPO credits the search turns.

    Question "What is the capital of Australia?", gold "Canberra". alpha = 0.5, scope 'information'.
      ep 0: search -> Sydney docs; search -> Canberra docs (k* = 1); answers Sydney.  G = [.5, .5, 0]
      ep 1: search -> Canberra docs (k* = 0); answers Melbourne.                   G = [.5, 0]
      ep 2: answers Sydney without searching.                                       G = [0]
      ep 3: two searches that find nothing relevant; answers Perth.                 G = [0, 0, 0]
      ep 4: thinks "Canberra?" itself (scope 'information' ignores it); Sydney.     G = [0, 0]
    GRPO: every reward is 0, std 0, so every advantage is 0.
    TSPO: all wrong -> pool the 11 turns: mean 3/22, unbiased std sqrt(3/55) = 0.23355;
      G = 0.5 -> (0.5 - 3/22) / 0.23355 = +1.5570;  G = 0 -> -(3/22) / 0.23355 = -0.5839.
    Had ep 4 answered Canberra (a mixed group), TSPO = GRPO: r = [0,0,0,0,1], mean 0.2,
      std sqrt(0.2) = 0.44721: the right one gets +1.7889, the others -0.4472.
    """
    question, gold = "What is the capital of Australia?", ["Canberra"]

    def info(text):
        return f"\n\n<information>Doc 1(Title: {text.split()[0]}) {text}\n</information>\n\n"

    def episode(turns, answer):
        texts = [t for t, _ in turns]
        texts[-1] += f"<answer>{answer}</answer>"
        observations = [o for _, o in turns]
        response = "".join(t + (o or "") for t, o in zip(texts, observations))
        return R.EpisodeText(question, gold, "nq", texts, observations, response)

    s = "<think>I should search.</think><search>capital of Australia</search>"
    done = ("<think>ok</think>", None)
    episodes = [
        episode(
            [
                (s, info("Sydney is the largest city of Australia.")),
                (s, info("Canberra is the capital city of Australia.")),
                done,
            ],
            "Sydney",
        ),
        episode([(s, info("Canberra, the capital, lies in the ACT.")), done], "Melbourne"),
        episode([("<think>I know this.</think>", None)], "Sydney"),
        episode(
            [(s, info("Perth is in Western Australia.")), (s, info("Koalas live in Australia.")), done],
            "Perth",
        ),
        episode(
            [
                (
                    "<think>Canberra? Let me check.</think><search>Australia</search>",
                    info("Australia is a country."),
                ),
                done,
            ],
            "Sydney",
        ),
    ]
    cfg = R.default_config()
    rb = R.compute_rewards(episodes, cfg, num_turns=K)  # 4 turn slots; these episodes use at most 3
    np.testing.assert_array_equal(rb.first_occurrence, [1, 0, -1, -1, -1])
    np.testing.assert_array_equal(rb.outcome, [0, 0, 0, 0, 0])
    np.testing.assert_allclose(
        rb.turn_returns[:, :3], [[0.5, 0.5, 0], [0.5, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    )

    turn_ids, loss_mask = layout([3, 2, 1, 3, 2], [[1, 1, 0], [1, 0], [0], [1, 1, 0], [1, 0]])
    batch = pad(
        dict(
            outcome=rb.outcome,
            turn_returns=rb.turn_returns,
            turn_valid=rb.turn_valid,
            first_occurrence=rb.first_occurrence,
            group_ids=np.zeros(5),
            turn_ids=turn_ids,
            loss_mask=loss_mask,
            correct=rb.em > 0,
        )
    )
    grpo, grpo_metrics = run("grpo", batch)
    tspo, tspo_metrics = run("tspo", batch)
    assert np.all(grpo == 0) and grpo_metrics["adv/homogenized_group_frac"] == 1.0

    hi, lo = (0.5 - 3 / 22) / math.sqrt(3 / 55), -(3 / 22) / math.sqrt(3 / 55)
    assert hi == pytest.approx(1.5570, abs=1e-4) and lo == pytest.approx(-0.5839, abs=1e-4)
    per_turn = {0: [hi, hi, lo], 1: [hi, lo], 2: [lo], 3: [lo, lo, lo], 4: [lo, lo]}
    for b, turns in per_turn.items():
        for k, value in enumerate(turns):
            policy_tokens = (turn_ids[b] == k) & (loss_mask[b] > 0)
            np.testing.assert_allclose(tspo[b][policy_tokens], value, rtol=1e-5)
    assert np.all(tspo[:5][loss_mask == 0] == 0)  # prompt, observations, padding
    assert tspo_metrics["adv/folr_rescued_frac"] == 1.0 and tspo_metrics["adv/homogenized_group_frac"] == 0.0
    assert tspo_metrics["adv/k_star_mean"] == pytest.approx(0.5)

    # With the format terms 0, an all-wrong group's returns are alpha or 0, and TSPO's turn-level
    # normalisation divides alpha out: alpha = 0.25 or 1.0 gives alpha = 0.5's advantages. (A FOLR
    # alpha sweep on the demo, whose format terms are 0, therefore cannot change a `tspo` run.)
    def with_alpha(alpha):
        cfg_a = R.default_config()
        cfg_a.folr.alpha = alpha
        rb_a = R.compute_rewards(episodes, cfg_a, num_turns=K)
        np.testing.assert_allclose(rb_a.turn_returns, rb.turn_returns * (alpha / 0.5), rtol=1e-6)
        return {**batch, "turn_returns": pad({"turn_returns": rb_a.turn_returns})["turn_returns"]}

    for alpha in (0.25, 1.0):
        np.testing.assert_allclose(run("tspo", with_alpha(alpha))[0], tspo, rtol=1e-5, atol=1e-6)

    # Counterfactual: ep 4 answers correctly -> mixed group -> TSPO uses GRPO's trajectory advantage.
    batch["outcome"][4], batch["correct"][4] = 1.0, True
    batch["turn_returns"][4, :2] = 1.0
    grpo, _ = run("grpo", batch)
    tspo, _ = run("tspo", batch)
    np.testing.assert_allclose(tspo, grpo)
    np.testing.assert_allclose(tspo[4, 2], 0.8 / (math.sqrt(0.2) + EPS), rtol=1e-6)
    np.testing.assert_allclose(tspo[0, 2], -0.2 / (math.sqrt(0.2) + EPS), rtol=1e-6)

    # In a mixed group alpha does matter for `tspo_turn`, which pools the right episode's returns (1)
    # with the wrong ones' (alpha or 0) turn by turn; `tspo` ignores FOLR there (GRPO's advantages).
    mixed = {}
    for alpha in (0.5, 1.0):
        b_a = with_alpha(alpha)
        b_a["turn_returns"][4, :2] = 1.0
        mixed[alpha] = (run("tspo_turn", b_a)[0], run("tspo", b_a)[0])
    assert np.abs(mixed[0.5][0] - mixed[1.0][0]).max() > 0.1
    np.testing.assert_allclose(mixed[0.5][1], mixed[1.0][1])


# ----------------------------------------------------------------------------- registry, config, errors


def test_registry_lookup_and_custom_estimator():
    assert set(NAMES) <= set(A.available_advantages())

    @A.register_advantage("test_first_occurrence")
    def k_star_as_advantage(inp):
        return jnp.broadcast_to(inp.first_occurrence[:, None].astype(jnp.float32), inp.turn_returns.shape)

    try:
        batch = pad(
            dict(
                outcome=np.zeros(2),
                turn_returns=np.zeros((2, 2)),
                turn_valid=np.ones((2, 2), bool),
                first_occurrence=[1, 3],
                group_ids=[0, 0],
                turn_ids=[[0, 1], [1, K]],
                loss_mask=np.ones((2, 2)),
            )
        )
        token_adv, metrics = A.compute_advantages("test_first_occurrence", **batch, num_groups=G)
        token_adv, metrics = np.asarray(token_adv), {k: float(v) for k, v in metrics.items()}
        np.testing.assert_array_equal(token_adv[:2, :2], [[1, 1], [3, 0]])  # turn id K is out of range -> 0
        assert metrics["adv/policy_tokens_without_turn"] == 1.0
        with pytest.raises(ValueError, match="already registered"):
            A.register_advantage("test_first_occurrence")(k_star_as_advantage)
    finally:
        A._REGISTRY.pop("test_first_occurrence")


def test_bad_names_shapes_and_config_raise():
    z = np.zeros
    args = (
        z(4, np.float32),
        z((4, 2), np.float32),
        z((4, 2), bool),
        z(4, np.int32),
        z(4, np.int32),
        z((4, 3), np.int32),
        z((4, 3), np.float32),
    )
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'bar'.*'grpo'"):
        A.compute_advantages("bar", *args, num_groups=1)
    with pytest.raises(ValueError, match="turn_ids"):
        A.compute_advantages("grpo", *args[:5], z((4, 5), np.int32), args[6], num_groups=1)
    with pytest.raises(ValueError, match="group_ids"):
        A.compute_advantages("grpo", *args[:4], z(3, np.int32), *args[5:], num_groups=1)
    with pytest.raises(ValueError, match="num_groups"):
        A.compute_advantages("grpo", *args, num_groups=0)
    cfg = A.default_config()
    assert cfg.name == "tspo" and cfg.eps == 1e-6
    A.validate_config(cfg)
    cfg.name = "bar"
    with pytest.raises(ValueError, match="valid names"):
        A.validate_config(cfg)


def test_reward_by_source():
    out = A.reward_by_source(np.array([1.0, 0.0, 1.0, 1.0]), ["nq", "nq", "hotpotqa", "nq"])
    assert out == {"nq": pytest.approx(2 / 3), "hotpotqa": 1.0}
    with pytest.raises(ValueError, match="one source per outcome"):
        A.reward_by_source(np.zeros(3), ["nq"])


# ----------------------------------------------------------------------------- sharded


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_batch_matches_single_device(axis_type):
    assert jax.device_count() == 8
    rng = np.random.default_rng(1)
    outcome = (rng.random(B) < 0.3).astype(np.float32)
    first_occ = rng.integers(-1, K, B).astype(np.int32)
    turn_valid = np.arange(K)[None] < rng.integers(1, K + 1, B)[:, None]
    turn_returns = np.where(
        turn_valid, outcome[:, None] + 0.5 * (np.arange(K)[None] <= first_occ[:, None]), 0
    )
    batch = dict(
        outcome=outcome,
        turn_returns=turn_returns.astype(np.float32),
        turn_valid=turn_valid,
        first_occurrence=first_occ,
        group_ids=rng.integers(-1, G, B).astype(np.int32),
        turn_ids=rng.integers(-1, K, (B, T)).astype(np.int32),
        loss_mask=(rng.random((B, T)) < 0.6).astype(np.float32),
        correct=outcome > 0.5,
    )
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = {
        k: jax.device_put(x, NamedSharding(mesh, P("data", *[None] * (x.ndim - 1)))) for k, x in batch.items()
    }
    with jax.set_mesh(mesh):
        got = EVERY_ESTIMATOR(sharded)
    for name in got:
        want, want_metrics = run(name, batch)
        token_adv, metrics = got[name]
        assert token_adv.sharding.spec[0] == "data"
        np.testing.assert_allclose(np.asarray(token_adv), want, rtol=1e-6, atol=1e-6, err_msg=name)
        for key, value in want_metrics.items():
            assert float(metrics[key]) == pytest.approx(value, abs=1e-6), key
