"""Rewards and FOLR against plain-Python references written here from the definitions of
Search-R1 and TSPO.md."""

import re
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo_jax import rewards as R

# ----------------------------------------------------------------------------- references


def ref_normalize(s):
    """Search-R1's normalize_answer, written out step by step."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def ref_extract(response):
    matches = re.findall(r"<answer>(.*?)</answer>", response, re.DOTALL)
    return matches[-1].strip() if matches else None


def ref_em(pred, golds):
    if pred is None:
        return 0.0
    return 1.0 if any(ref_normalize(pred) == ref_normalize(g) for g in golds) else 0.0


def ref_folr_text(text):
    # Our documented choice: tags become spaces before normalising.
    return ref_normalize(re.sub(r"</?(think|search|information|answer)>", " ", text))


def ref_first_occurrence(ep, scope, min_chars, guard, word):
    pad = (lambda x: f" {x} ") if word else (lambda x: x)
    question = pad(ref_folr_text(ep.question))
    aliases = []
    for g in ep.golds:
        a = ref_normalize(g)
        if len(a) < min_chars:
            continue
        if guard and pad(a) in question:
            continue
        aliases.append(pad(a))
    for k in range(len(ep.turn_texts)):
        texts = []
        if scope == "all":
            texts.append(ep.turn_texts[k])
        if ep.observations[k] is not None:
            texts.append(ep.observations[k])
        if any(a in pad(ref_folr_text(t)) for t in texts for a in aliases):
            return k
    return -1


def ref_returns(outcome, correct, k_star, turns, K, alpha):
    out = []
    for k in range(K):
        if k >= turns:
            out.append(0.0)
        elif correct or k_star < 0:
            out.append(outcome)
        else:
            out.append(outcome + (alpha if k <= k_star else 0.0))
    return out


def make_episode(question, golds, turns, answer=None, source="nq"):
    """turns: list of (policy_text, observation or None); the answer closes the last turn."""
    turn_texts = [t for t, _ in turns]
    if answer is not None:
        turn_texts[-1] = turn_texts[-1] + f"<answer>{answer}</answer>"
    observations = [o for _, o in turns]
    response = "".join(t + (o or "") for t, o in zip(turn_texts, observations))
    return R.EpisodeText(question, golds, source, turn_texts, observations, response)


def obs(*docs):
    body = "".join(f"Doc {i + 1}(Title: {d.split()[0]}) {d}\n" for i, d in enumerate(docs))
    return f"\n\n<information>{body}</information>\n\n"


def cfg(**folr):
    c = R.default_config()
    for k, v in folr.items():
        setattr(c.folr, k, v)
    return c


# ----------------------------------------------------------------------------- normalisation, EM

SOME_CHARS = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzTHEAN \t\n.,!?'\"-()é’0123"))
TEXT = st.text(alphabet=SOME_CHARS | st.characters(), max_size=60)


@given(TEXT)
@settings(max_examples=200, deadline=None)
def test_normalize_answer_matches_reference(text):
    assert R.normalize_answer(text) == ref_normalize(text)


@given(TEXT, st.lists(TEXT, min_size=1, max_size=3))
@settings(max_examples=100, deadline=None)
def test_exact_match_matches_reference(pred, golds):
    assert R.exact_match(pred, golds) == ref_em(pred, golds)


@pytest.mark.parametrize(
    "text",
    [
        "a a b",
        "The the An a",
        "x\x00the y",
        "\x1cthe\x1cend",
        "Ünïcödé THE café",
        "“the” end",
        "an\ta\nthe",
        "",
        "the",
        "xa ax thea",
    ],
)
def test_normalize_answer_edge_cases(text):
    # runs of articles, control characters and non-ASCII text take different internal paths
    assert R.normalize_answer(text) == ref_normalize(text)


def test_exact_match_aliases_punctuation_articles():
    assert R.exact_match("the Beatles!", ["Beatles"]) == 1.0
    assert R.exact_match("Beatles", ["The Fab Four", "The Beatles"]) == 1.0
    assert R.exact_match("U.S.A.", ["usa"]) == 1.0
    assert R.exact_match("an  Apple", ["apple"]) == 1.0
    assert R.exact_match("Beatle", ["The Beatles"]) == 0.0
    assert R.exact_match(None, ["x"]) == 0.0
    assert R.exact_match("Paris", "paris") == 1.0  # a single string is one alias
    with pytest.raises(ValueError, match="golds is empty"):
        R.exact_match("x", [])


@given(
    st.lists(
        st.sampled_from(["<answer>", "</answer>", "x", " Paris ", "\n", "<think>", "a</answer>b"]),
        max_size=12,
    )
)
@settings(max_examples=150, deadline=None)
def test_extract_answer_matches_reference(parts):
    response = "".join(parts)
    assert R.extract_answer(response) == ref_extract(response)


def test_extract_answer_takes_last_answer_of_response():
    assert R.extract_answer("<answer> A </answer> then <answer>\nB\n</answer>") == "B"
    assert R.extract_answer("no tags here") is None
    assert R.extract_answer("<answer>unclosed") is None


# ----------------------------------------------------------------------------- format terms

VALID = [
    "<think>x</think>\n<answer>y</answer>",
    "<think>a</think><search>q</search>\n\n<information>d</information>\n\n"
    "<think>b</think><answer>y</answer>\n",
]
INVALID = [
    "<answer>y</answer>",  # no think first
    "<think>x</think> stray <answer>y</answer>",  # text between tags
    "<think>x</think><answer>y</answer> trailing",  # text after the answer
    "<think>x</think><search>q</search><think>y</think><answer>z</answer>",  # search without information
    "<think>x<answer>y</answer>",  # unbalanced
    "<think>x</think><search>q</search>\n\n<information>d</information>\n\n",  # never answered
]


@pytest.mark.parametrize("text", VALID)
def test_valid_format(text):
    assert R.is_valid_format(text)


@pytest.mark.parametrize("text", INVALID)
def test_invalid_format(text):
    assert not R.is_valid_format(text)


def ref_v03(answer, em, valid, retrieval_hit, s=1.0, structure=0.2, final=0.1, retrieval=0.1):
    """Search-R1 v0.3 compute_score_em, branch by branch."""
    retrieval_correct = valid and retrieval_hit
    if answer is None:
        if valid:
            return structure + retrieval if retrieval_correct else structure
        return 0.0
    if em:
        return s if valid else s - structure
    if valid:
        return structure + retrieval if retrieval_correct else structure
    return final


@pytest.mark.parametrize(
    "response",
    [
        "<think>t</think><answer>Paris</answer>",  # right, valid
        "<answer>Paris</answer>",  # right, invalid
        # wrong, valid, with and without the gold in the retrieved information
        "<think>t</think><search>q</search><information>Paris is big</information>"
        "<think>u</think><answer>Rome</answer>",
        "<think>t</think><search>q</search><information>nothing</information>"
        "<think>u</think><answer>Rome</answer>",
        "<think>t</think><search>q</search><information>Paris</information>",  # no answer: never ends
        "<think>t</think>",
        "garbage <answer>Rome</answer>",  # wrong, invalid
        "garbage",
    ],
)
def test_v03_format_terms(response):
    c = R.default_config()
    c.structure_format_score, c.final_format_score, c.retrieval_score = 0.2, 0.1, 0.1
    ep = R.EpisodeText("Capital of France?", ["Paris"], "nq", [response], [None], response)
    got = R.compute_rewards([ep], c).outcome[0]
    answer = ref_extract(response)
    blocks = re.findall(r"<information>(.*?)</information>", response, re.DOTALL)
    hit = any("paris" in ref_normalize(b) for b in blocks)
    want = ref_v03(answer, ref_em(answer, ["Paris"]), R.is_valid_format(response), hit)
    assert got == pytest.approx(want, abs=1e-7)


def test_default_reward_is_plain_em():
    ep = make_episode("Capital of France?", ["Paris"], [("<think>t</think>", None)], answer="paris")
    bad = make_episode("Capital of France?", ["Paris"], [("no format", None)], answer="Paris")
    rb = R.compute_rewards([ep, bad], R.default_config())
    np.testing.assert_array_equal(rb.outcome, [1.0, 1.0])
    np.testing.assert_array_equal(rb.em, [1.0, 1.0])


# ----------------------------------------------------------------------------- FOLR cases

Q = "Who wrote the novel Frankenstein?"
GOLD = ["Mary Shelley", "Mary Wollstonecraft Shelley"]


def four_turns(hit_turn, answer="Percy Shelley", policy_mentions=False):
    turns = []
    for k in range(4):
        policy = f"<think>step {k}</think><search>frankenstein author {k}</search>"
        if policy_mentions and k == 0:
            policy = "<think>maybe Mary Shelley?</think><search>frankenstein author</search>"
        doc = (
            "Frankenstein is an 1818 novel by Mary Shelley." if k == hit_turn else "Frankenstein is a novel."
        )
        turns.append(
            (policy, obs(doc, "Gothic fiction is a genre.", "Percy Shelley was a poet.") if k < 3 else None)
        )
    turns[3] = ("<think>done</think>", None)
    return make_episode(Q, GOLD, turns, answer=answer)


def test_gold_in_turn_2_of_4():
    rb = R.compute_rewards([four_turns(hit_turn=1)], cfg(), num_turns=4)
    assert rb.first_occurrence[0] == 1
    assert rb.em[0] == 0.0
    np.testing.assert_allclose(rb.turn_returns[0], [0.5, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(rb.turn_valid[0], [True] * 4)


def test_correct_episode_gets_outcome_on_every_turn():
    rb = R.compute_rewards([four_turns(hit_turn=1, answer="mary shelley.")], cfg(), num_turns=4)
    assert rb.em[0] == 1.0 and rb.first_occurrence[0] == 1
    np.testing.assert_allclose(rb.turn_returns[0], [1.0] * 4)


def test_gold_only_in_question_is_ignored():
    q = "Was Mary Shelley the author of Frankenstein?"
    ep = make_episode(
        q, ["Mary Shelley"], [("<search>x</search>", obs("Mary Shelley wrote it.")), ("", None)], "no"
    )
    assert R.compute_rewards([ep], cfg(), num_turns=4).first_occurrence[0] == -1
    assert R.compute_rewards([ep], cfg(guard_question=False), num_turns=4).first_occurrence[0] == 0


def test_gold_shorter_than_minimum_is_ignored():
    ep = make_episode(
        "Is Rome in Italy?", ["yes"], [("<search>x</search>", obs("Yes, Rome is there.")), ("", None)], "no"
    )
    assert R.compute_rewards([ep], cfg(), num_turns=4).first_occurrence[0] == -1  # "yes" has 3 < 4 chars
    assert R.compute_rewards([ep], cfg(min_answer_chars=3), num_turns=4).first_occurrence[0] == 0


def test_gold_in_policy_text_counts_only_under_scope_all():
    ep = four_turns(hit_turn=-1, policy_mentions=True)
    assert R.compute_rewards([ep], cfg(scope="information"), num_turns=4).first_occurrence[0] == -1
    rb = R.compute_rewards([ep], cfg(scope="all"), num_turns=4)
    assert rb.first_occurrence[0] == 0
    np.testing.assert_allclose(rb.turn_returns[0], [0.5, 0.0, 0.0, 0.0])


def test_aliases_punctuation_and_articles_in_documents():
    # second alias, punctuation and an article inside the document
    ep = make_episode(
        "Which band recorded Abbey Road?",
        ["Fab Four", "The Beatles"],
        [("<search>abbey road</search>", obs("Abbey Road is an album by the Beatles!")), ("", None)],
        "x",
    )
    assert R.compute_rewards([ep], cfg(), num_turns=4).first_occurrence[0] == 0
    ep = make_episode(
        "Which country?", ["U.S.A."], [("<search>q</search>", obs("It is in the USA.")), ("", None)], "x"
    )
    assert R.compute_rewards([ep], cfg(min_answer_chars=3), num_turns=4).first_occurrence[0] == 0


def test_word_match_mode_rejects_partial_words():
    ep = make_episode("Where?", ["Paris"], [("<search>q</search>", obs("A Parisian cafe.")), ("", None)], "x")
    assert R.compute_rewards([ep], cfg(match="substring"), num_turns=4).first_occurrence[0] == 0
    assert R.compute_rewards([ep], cfg(match="word"), num_turns=4).first_occurrence[0] == -1


def test_one_turn_episode_and_disabled_folr():
    ep = make_episode(Q, GOLD, [("<think>no idea</think>", None)], answer="Byron")
    rb = R.compute_rewards([ep], cfg(), num_turns=3)
    assert rb.turn_returns.shape == (1, 3)
    np.testing.assert_array_equal(rb.turn_valid[0], [True, False, False])
    np.testing.assert_allclose(rb.turn_returns[0], [0.0, 0.0, 0.0])
    off = R.compute_rewards([four_turns(hit_turn=0)], cfg(enabled=False), num_turns=4)
    assert off.first_occurrence[0] == -1
    np.testing.assert_allclose(off.turn_returns[0], [0.0] * 4)


def test_alpha_is_used():
    rb = R.compute_rewards([four_turns(hit_turn=2)], cfg(alpha=0.25), num_turns=4)
    np.testing.assert_allclose(rb.turn_returns[0], [0.25, 0.25, 0.25, 0.0])


# ----------------------------------------------------------------------------- random batches vs reference

WORDS = [
    "Paris",
    "paris,",
    "the",
    "a",
    "Rome",
    "New",
    "York",
    "new-york",
    "an",
    "Shelley",
    "mary",
    "is",
    "yes",
    "U.S.",
]
GOLDS = [["Paris"], ["New York", "NYC"], ["Mary Shelley"], ["yes"], ["the Rome"], ["U.S."]]


@st.composite
def episodes(draw):
    words = st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join)
    out = []
    for _ in range(draw(st.integers(1, 6))):
        golds = draw(st.sampled_from(GOLDS))
        turns = []
        for _ in range(draw(st.integers(1, 4))):
            policy = "<think>" + draw(words) + "</think>"
            observation = draw(st.none() | words.map(lambda w: f"\n\n<information>{w}</information>\n\n"))
            turns.append((policy, observation))
        answer = draw(st.none() | words | st.sampled_from(golds))
        out.append(make_episode(draw(words) + "?", golds, turns, answer=answer))
    return out


@given(
    episodes(),
    st.sampled_from(R.FOLR_SCOPES),
    st.integers(1, 6),
    st.booleans(),
    st.sampled_from(R.FOLR_MATCH_MODES),
    st.sampled_from([0.0, 0.5, 1.0]),
)
@settings(max_examples=60, deadline=None)
def test_compute_rewards_matches_reference(eps, scope, min_chars, guard, match, alpha):
    c = cfg(scope=scope, min_answer_chars=min_chars, guard_question=guard, match=match, alpha=alpha)
    rb = R.compute_rewards(eps, c, num_turns=4)
    for i, ep in enumerate(eps):
        answer = ref_extract(ep.response_text)
        em = ref_em(answer, ep.golds)
        k_star = ref_first_occurrence(ep, scope, min_chars, guard, match == "word")
        assert R.extract_answer(ep.response_text) == answer
        assert rb.em[i] == em and rb.outcome[i] == em
        assert rb.first_occurrence[i] == k_star
        np.testing.assert_allclose(
            rb.turn_returns[i], ref_returns(em, em == 1.0, k_star, len(ep.turn_texts), 4, alpha)
        )
        np.testing.assert_array_equal(rb.turn_valid[i], [k < len(ep.turn_texts) for k in range(4)])
    assert rb.outcome.dtype == np.float32 and rb.turn_returns.dtype == np.float32
    assert rb.first_occurrence.dtype == np.int32 and rb.turn_valid.dtype == bool


# ----------------------------------------------------------------------------- bad input


def test_bad_config_and_episodes_raise_clear_errors():
    ep = four_turns(hit_turn=1)
    with pytest.raises(ValueError, match=r"scope='foo'.*\('information', 'all'\)"):
        R.compute_rewards([ep], cfg(scope="foo"), num_turns=4)
    with pytest.raises(ValueError, match="match="):
        R.compute_rewards([ep], cfg(match="regex"), num_turns=4)
    with pytest.raises(ValueError, match="alpha"):
        R.compute_rewards([ep], cfg(alpha=2.0), num_turns=4)
    with pytest.raises(ValueError, match="min_answer_chars"):
        R.compute_rewards([ep], cfg(min_answer_chars=0), num_turns=4)
    with pytest.raises(ValueError, match="4 turns but num_turns"):
        R.compute_rewards([ep], cfg(), num_turns=2)
    with pytest.raises(ValueError, match="list of aliases"):
        R.EpisodeText("q", "Paris", "nq", ["t"], [None], "t")
    with pytest.raises(ValueError, match="golds is empty"):
        R.EpisodeText("q", [], "nq", ["t"], [None], "t")
    with pytest.raises(ValueError, match="observations"):
        R.EpisodeText("q", ["a"], "nq", ["t", "u"], [None], "tu")
    with pytest.raises(TypeError, match="EpisodeText"):
        R.compute_rewards([{"question": "q"}], cfg(), num_turns=4)


def test_golds_from_numpy_array_are_accepted():
    ep = R.EpisodeText(
        "q", np.array(["Paris", "paris"]), "nq", ["<answer>Paris</answer>"], [None], "<answer>Paris</answer>"
    )
    assert ep.golds == ["Paris", "paris"]
    assert R.compute_rewards([ep], cfg(), num_turns=4).em[0] == 1.0
