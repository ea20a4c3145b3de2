"""Outcome rewards and FOLR turn returns for search episodes, computed on the host.

Everything here works on text the rollout already holds (decoded turns, observation strings,
the response after the prompt); nothing is re-tokenised. See /work/shared/TSPO.md for the
definitions. What is Search-R1's and what is ours:

* Search-R1: `normalize_answer`, exact match against any gold alias, the v0.3 format terms
  (`structure_format_score`, `final_format_score`, `retrieval_score`) and its tag grammar.
  One deliberate difference, answer extraction: Search-R1 (qa_em.extract_solution) reads the
  decoded prompt + response and returns the last `<answer>...</answer>` only when there are at
  least two, else nothing. Its prompt holds two (`<answer> and </answer>` and the example
  `<answer> Beijing </answer>`), so a response with no answer at all is read as "Beijing" and
  scores 1 on a gold "Beijing". We read the response only and take its last `<answer>`; a
  response without one has no answer and scores 0.
* Ours (TSPO's method section is not public): FOLR's first-occurrence turn k*, its
  incidental-match guard, and the stage-aware turn returns G_k. Every choice is a knob in
  `default_config().folr`.

Stage-aware returns, with r = outcome (EM plus any format terms) and alpha = folr.alpha:
  correct episode (em = 1):            G_k = r                       for every turn k
  wrong episode with k*:               G_k = r + alpha * [k <= k*]
  wrong episode without k* (or FOLR off): G_k = r
With the default binary reward (format terms 0) the wrong cases are exactly TSPO.md's
G_k = alpha for k <= k*, 0 after; adding alpha on top of r is our extension for format terms.
Under the `tspo` advantage alpha is only a scale there: an all-wrong group's returns are r or r + alpha,
and with r equal across the group (format terms 0) the turn-level normalisation divides alpha out.
It matters for `tspo_turn` (mixed groups pool 1 with alpha) and where format terms differ.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Iterable, Sequence

import ml_collections
import numpy as np

FOLR_SCOPES = ("information", "all")
FOLR_MATCH_MODES = ("substring", "word")

# K, turn slots, when the caller does not give the rollout's: Search-R1 runs max_turns = 4 search
# turns, then one last generation with search disabled, so at most 5 policy turns.
DEFAULT_NUM_TURNS = 5
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFORMATION_RE = re.compile(r"<information>(.*?)</information>", re.DOTALL)
_TAG_RE = re.compile(r"</?(?:think|search|information|answer)>")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
# str.translate deletes ASCII punctuation in C: the same result as Search-R1's per-character
# filter, ~15x faster on retrieved documents (measured on the tools/bench_core.py texts).
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def default_config() -> ml_collections.ConfigDict:
    """Reward knobs. Defaults give Search-R1's plain EM reward plus FOLR as defined in TSPO.md."""
    cfg = ml_collections.ConfigDict()
    cfg.em_score = 1.0  # Search-R1's `score`: reward of a correct, well-formatted answer
    # Search-R1 v0.3 format terms; all 0 (the default) reduces the reward to EM * em_score.
    cfg.structure_format_score = 0.0
    cfg.final_format_score = 0.0
    cfg.retrieval_score = 0.0
    cfg.folr = ml_collections.ConfigDict()
    cfg.folr.enabled = True
    cfg.folr.scope = "information"  # 'information': observations only; 'all': policy text too
    cfg.folr.alpha = 0.5  # G_k for k <= k* in a wrong episode (our choice)
    # Aliases shorter than this after normalisation are ignored by FOLR: it drops yes/no and
    # one-to-three character answers ("uk", "10") whose substring hits are mostly incidental.
    cfg.folr.min_answer_chars = 4
    cfg.folr.guard_question = True  # ignore an alias that already appears in the question
    cfg.folr.match = "substring"  # TSPO.md's definition; 'word' requires whole-word matches
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad knob and the values it accepts."""
    folr = cfg.folr
    if folr.scope not in FOLR_SCOPES:
        raise ValueError(f"rewards.folr.scope={folr.scope!r} is not one of {FOLR_SCOPES}.")
    if folr.match not in FOLR_MATCH_MODES:
        raise ValueError(f"rewards.folr.match={folr.match!r} is not one of {FOLR_MATCH_MODES}.")
    if not 0.0 <= float(folr.alpha) <= 1.0:
        raise ValueError(f"rewards.folr.alpha={folr.alpha} must lie in [0, 1] (0.5 by default).")
    if int(folr.min_answer_chars) < 1:
        raise ValueError(
            f"rewards.folr.min_answer_chars={folr.min_answer_chars} must be >= 1: an empty "
            "alias is a substring of every text."
        )


@dataclasses.dataclass
class EpisodeText:
    """The host-side text of one episode, as the rollout holds it.

    turn_texts[k] is the policy's decoded text of turn k; observations[k] the retrieved text
    appended after it: None unless turn k searched and the retriever returned documents (the
    invalid-action message and a "Search failed" text are no o_k for FOLR); response_text
    everything after the prompt.
    """

    question: str
    golds: list[str]
    data_source: str
    turn_texts: list[str]
    observations: list[str | None]
    response_text: str

    def __post_init__(self):
        # A bare string would be iterated character by character: refuse it loudly.
        if isinstance(self.golds, str):
            raise ValueError(
                f"EpisodeText.golds must be a list of aliases, got the string {self.golds!r}; "
                f"wrap it: [{self.golds!r}]."
            )
        self.golds = [str(g) for g in self.golds]  # parquet gives numpy arrays of str
        if not self.golds:
            raise ValueError(
                f"EpisodeText.golds is empty for question {self.question!r}; every episode "
                "needs at least one gold answer."
            )
        self.turn_texts = list(self.turn_texts)
        self.observations = list(self.observations)
        if len(self.observations) != len(self.turn_texts):
            raise ValueError(
                f"EpisodeText has {len(self.turn_texts)} turn_texts but {len(self.observations)} "
                "observations; give one observation per turn (None for a turn that did not search)."
            )


@dataclasses.dataclass
class RewardBatch:
    """Per-episode rewards as numpy arrays (B episodes, K = num_turns turn slots)."""

    outcome: np.ndarray  # [B] float32, EM * em_score plus format terms
    em: np.ndarray  # [B] float32, 0/1 exact match
    turn_returns: np.ndarray  # [B, K] float32, G_k (0 on invalid slots)
    turn_valid: np.ndarray  # [B, K] bool, k < number of turns of the episode
    first_occurrence: np.ndarray  # [B] int32, 0-based k*, -1 if none (or FOLR disabled)


# ----------------------------------------------------------------------------- answers, EM


def normalize_answer(text: str) -> str:
    """Search-R1's normalisation: lowercase, drop ASCII punctuation, articles -> ' ', squeeze spaces."""
    text = text.lower().translate(_DELETE_PUNCTUATION)
    squeezed = " ".join(text.split())
    if squeezed.isascii() and squeezed.isprintable():
        # Only [a-z0-9] words and single spaces are left, so the regex's \b(a|an|the)\b means
        # exactly "a whole word", which str.replace finds faster than the regex engine.
        padded = f" {squeezed} "
        for article in (" the ", " an ", " a "):
            while article in padded:  # again for runs like "a a", which one pass skips
                padded = padded.replace(article, " ")
        return padded[1:-1]
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def extract_answer(response_text: str) -> str | None:
    """The stripped content of the last <answer>...</answer> of the response, None if there is none.

    Pass the response only (the text after the prompt): the prompt's own example answer tags
    must never count.
    """
    last = None
    for last in _ANSWER_RE.finditer(response_text):
        pass
    return None if last is None else last.group(1).strip()


def _as_aliases(golds: str | Iterable[str]) -> list[str]:
    aliases = [golds] if isinstance(golds, str) else [str(g) for g in golds]
    if not aliases:
        raise ValueError("golds is empty: exact match needs at least one gold alias.")
    return aliases


def exact_match(prediction: str | None, golds: str | Iterable[str]) -> float:
    """1.0 if normalize_answer(prediction) equals a normalised gold alias, else 0.0 (None -> 0.0)."""
    aliases = _as_aliases(golds)
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) == pred for g in aliases))


# ----------------------------------------------------------------------------- format terms


def is_valid_format(response_text: str) -> bool:
    """Search-R1's tag grammar over the response: (<think></think><search></search>
    <information></information>)* <think></think><answer></answer>, whitespace between tags,
    nothing after </answer>. (Search-R1 first skips to the assistant marker; our response
    already starts there.)"""
    tags = ("think", "search", "information", "answer")
    for tag in tags:
        if response_text.count(f"<{tag}>") != response_text.count(f"</{tag}>"):
            return False
    transitions = {
        ("<think>", "start"): "in_think",
        ("<think>", "information"): "in_think",
        ("</think>", "in_think"): "after_think",
        ("<search>", "after_think"): "in_search",
        ("</search>", "in_search"): "after_search",
        ("<information>", "after_search"): "in_information",
        ("</information>", "in_information"): "information",
        ("<answer>", "after_think"): "in_answer",
        ("</answer>", "in_answer"): "end",
    }
    inside = {"in_think", "in_search", "in_information", "in_answer"}
    state = "start"
    for part in re.split(r"(</?(?:think|search|information|answer)>)", response_text):
        if not part.strip():
            continue
        if _TAG_RE.fullmatch(part):
            state = transitions.get((part, state))
            if state is None:
                return False
        elif state not in inside:
            return False  # text between tags, or after </answer>
    return state == "end"


def information_blocks(response_text: str) -> list[str]:
    return [m.strip() for m in _INFORMATION_RE.findall(response_text)]


def _retrieval_correct(response_text: str, gold_norms: Sequence[str]) -> bool:
    for block in information_blocks(response_text):
        block_norm = normalize_answer(block)
        if any(g in block_norm for g in gold_norms):
            return True
    return False


def outcome_score(em: float, answer: str | None, response_text: str, gold_norms: Sequence[str], cfg) -> float:
    """Search-R1 v0.3 reward; with every format term 0 it is em * em_score."""
    score = float(cfg.em_score)
    structure = float(cfg.structure_format_score)
    final = float(cfg.final_format_score)
    retrieval = float(cfg.retrieval_score)
    if structure == 0.0 and final == 0.0 and retrieval == 0.0:
        return score * em
    valid = is_valid_format(response_text)
    # Search-R1 only credits retrieval inside a well-formed episode.
    structure_reward = structure + (
        retrieval if valid and _retrieval_correct(response_text, gold_norms) else 0.0
    )
    if answer is None:
        return structure_reward if valid else 0.0
    if em:
        return score if valid else score - structure
    return structure_reward if valid else final


# ----------------------------------------------------------------------------- FOLR


class _AliasMatcher:
    """Looks for normalised aliases in texts. Normalisations are cached for the batch (the n
    rollouts of a prompt share the question and often the same documents), and most texts are
    ruled out before any normalisation by a cheap necessary test."""

    def __init__(self, word_match: bool):
        self._cache: dict[str, str] = {}
        self._word_match = word_match

    def normalize(self, text: str) -> str:
        out = self._cache.get(text)
        if out is None:
            # Tags become spaces so "Paris</information>" cannot glue into "parisinformation".
            out = _pad(normalize_answer(_TAG_RE.sub(" ", text)), self._word_match)
            self._cache[text] = out
        return out

    def contains(self, text: str, aliases: Sequence[str]) -> bool:
        if text not in self._cache:
            # Normalising only deletes or splits the words of the lowercased, punctuation-free
            # text, so an alias whose words are not all substrings of it cannot match.
            rough = text.lower().translate(_DELETE_PUNCTUATION)
            aliases = [a for a in aliases if all(w in rough for w in a.split())]
            if not aliases:
                return False
        norm = self.normalize(text)
        return any(a in norm for a in aliases)


def eligible_aliases(golds: Sequence[str], question: str, folr_cfg, matcher=None) -> tuple[str, ...]:
    """Normalised gold aliases FOLR may look for, after the incidental-match guard
    (too short, or already in the question). In 'word' mode they come padded with spaces."""
    word = folr_cfg.match == "word"
    matcher = matcher or _AliasMatcher(word_match=word)
    question_norm = matcher.normalize(question)
    out = []
    for gold in golds:
        alias = normalize_answer(gold)
        if len(alias) < int(folr_cfg.min_answer_chars):
            continue
        alias = _pad(alias, word)
        if folr_cfg.guard_question and alias in question_norm:
            continue
        if alias not in out:
            out.append(alias)
    return tuple(out)


def _pad(text: str, word: bool) -> str:
    return f" {text} " if word else text


def first_occurrence(
    turn_texts: Sequence[str], observations: Sequence[str | None], aliases: Sequence[str], scope: str, matcher
) -> int:
    """0-based k*: the first turn whose observation (scope 'all': or policy text) contains an alias."""
    if not aliases:
        return -1
    for k, observation in enumerate(observations):
        texts = [observation] if observation is not None else []
        if scope == "all":
            texts.insert(0, turn_texts[k])
        if any(matcher.contains(text, aliases) for text in texts):
            return k
    return -1


def stage_returns(
    outcome: float, correct: bool, k_star: int, num_turns: int, num_slots: int, alpha: float
) -> np.ndarray:
    """G_k for k < num_slots (zeros beyond the episode's num_turns)."""
    returns = np.zeros(num_slots, np.float32)
    returns[:num_turns] = outcome
    if not correct and k_star >= 0:
        returns[: min(k_star + 1, num_turns)] += alpha
    return returns


# ----------------------------------------------------------------------------- batch


def compute_rewards(
    episodes: Sequence[EpisodeText], cfg: ml_collections.ConfigDict, num_turns: int = DEFAULT_NUM_TURNS
) -> RewardBatch:
    """Rewards for a batch of episodes; num_turns (K) is the rollout's turn limit (its
    RolloutConfig.num_turns), the static width of turn_returns."""
    validate_config(cfg)
    num_slots = int(num_turns)
    if num_slots < 1:
        raise ValueError(f"num_turns={num_slots} must be >= 1.")
    folr = cfg.folr
    matcher = _AliasMatcher(word_match=folr.match == "word")
    alias_cache: dict[tuple, tuple[str, ...]] = {}

    n = len(episodes)
    outcome = np.zeros(n, np.float32)
    em = np.zeros(n, np.float32)
    turn_returns = np.zeros((n, num_slots), np.float32)
    turn_valid = np.zeros((n, num_slots), bool)
    k_star = np.full(n, -1, np.int32)

    for i, ep in enumerate(episodes):
        if not isinstance(ep, EpisodeText):
            raise TypeError(
                f"episodes[{i}] is a {type(ep).__name__}; compute_rewards takes EpisodeText objects."
            )
        turns = len(ep.turn_texts)
        if turns > num_slots:
            raise ValueError(
                f"episode {i} has {turns} turns but num_turns (K) is {num_slots}; raise "
                "num_turns= to at least the rollout's turn limit (RolloutConfig.num_turns)."
            )
        answer = extract_answer(ep.response_text)
        em[i] = exact_match(answer, ep.golds)
        gold_norms = [normalize_answer(g) for g in ep.golds]
        outcome[i] = outcome_score(em[i], answer, ep.response_text, gold_norms, cfg)

        if folr.enabled:
            key = (ep.question, tuple(ep.golds))
            aliases = alias_cache.get(key)
            if aliases is None:
                aliases = alias_cache[key] = eligible_aliases(ep.golds, ep.question, folr, matcher)
            k_star[i] = first_occurrence(ep.turn_texts, ep.observations, aliases, folr.scope, matcher)
        turn_returns[i] = stage_returns(
            float(outcome[i]), bool(em[i]), int(k_star[i]), turns, num_slots, float(folr.alpha)
        )
        turn_valid[i, :turns] = True

    return RewardBatch(
        outcome=outcome,
        em=em,
        turn_returns=turn_returns,
        turn_valid=turn_valid,
        first_occurrence=k_star,
    )
