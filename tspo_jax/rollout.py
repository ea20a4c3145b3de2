"""Multi-turn search episodes: decoding interrupted by tool calls, resumed on the same KV cache.

For a batch of rows (questions x group size), each turn decodes every live row until it stops
(`</search>`, `</answer>`, EOS or the per-turn budget). Rows that searched get their query parsed,
retrieved in one batched call, formatted as Search-R1's `<information>` observation, tokenized,
truncated, and appended to *their* cache rows only (one compiled append); then decoding resumes.
Nothing is decoded and re-tokenized: the token ids in an `Episode` are exactly the ones the model
consumed, so training scores the same sequence the sampler produced.

`resume="reprefill"` is the naive method kept for tests and benchmarks: every turn prefills the
whole context so far into a fresh cache. Greedy episodes of both methods are identical.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import jax
import numpy as np

from tspo_jax import sampling
from tspo_jax.rewards import extract_answer
from tspo_jax.retrieval.base import OBSERVATION_HEAD, OBSERVATION_TAIL, Doc, Retriever, RetrieverError, format_docs
from tspo_jax.sharding import to_host

log = logging.getLogger(__name__)

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
STOP_STRINGS = (SEARCH_CLOSE, ANSWER_CLOSE)

DEFAULT_TEMPLATE = (
    "Answer the question below. Think step by step inside <think> and </think> whenever you get "
    "new information. If you are missing knowledge, search for it by writing a query between "
    "<search> and </search>; the results will come back between <information> and "
    "</information>. Search as often as you need. When you know the answer, write only the "
    "answer between <answer> and </answer>, for example <answer> Paris </answer>.\n"
    "Question: {question}\n"
)

INVALID_ACTION_MESSAGE = (
    "\nThat was not a valid action. To search, put a query between <search> and </search>. "
    "To answer, put the answer between <answer> and </answer>. Try again.\n"
)
MAX_QUERY_CHARS = 512  # a runaway query is cut before it reaches the retriever


@dataclasses.dataclass
class RolloutConfig:
    max_turns: int = 4  # turns that may search; then one last turn with search disabled
    max_response_length: int = 500  # tokens per policy turn
    max_obs_length: int = 500  # tokens per observation (the docs are truncated, tags kept)
    max_prompt_length: int = 512
    max_context_length: int | None = None  # default: enough for every turn at full length
    docs_per_search: int = 3  # documents each search returns (Search-R1's top-k)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    resume: str = "cache"  # "cache" (interrupt/resume) or "reprefill" (naive, for tests/benchmarks)
    on_retriever_error: str = "raise"  # "raise" or "observe" (the error text becomes the observation)
    template: str = DEFAULT_TEMPLATE
    use_chat_template: bool = True

    def __post_init__(self):
        if self.resume not in ("cache", "reprefill"):
            raise ValueError(f"resume must be 'cache' or 'reprefill', got {self.resume!r}")
        if self.on_retriever_error not in ("raise", "observe"):
            raise ValueError(
                f"on_retriever_error must be 'raise' or 'observe', got {self.on_retriever_error!r}"
            )
        if "{question}" not in self.template:
            raise ValueError("the prompt template must contain the placeholder {question}")
        for name in ("max_turns", "max_response_length", "max_obs_length", "max_prompt_length", "docs_per_search"):
            if getattr(self, name) < (0 if name == "max_turns" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def sampling_params(self) -> sampling.SamplingParams:
        return sampling.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, greedy=self.greedy
        )

    @property
    def num_turns(self) -> int:
        """Policy turns an episode may take: max_turns that may search, then one last turn."""
        return self.max_turns + 1

    def context_length(self, prompt_len: int) -> int:
        if self.max_context_length:
            return self.max_context_length
        turns = self.num_turns
        obs_width = sampling.bucket(max(self.max_obs_length, len(INVALID_ACTION_MESSAGE)), 16)
        return prompt_len + turns * self.max_response_length + self.max_turns * obs_width


@dataclasses.dataclass
class Turn:
    action: str  # "search", "answer", "invalid", or "search_disabled" on the last turn
    policy_span: tuple[int, int]  # [start, end) into Episode.tokens
    obs_span: tuple[int, int] | None
    text: str  # the policy's text this turn
    observation: str | None  # the environment's text appended after it
    query: str | None = None
    docs: list[Doc] = dataclasses.field(default_factory=list)
    stop: str = ""  # the sampler's stop reason


@dataclasses.dataclass
class Episode:
    uid: str
    prompt_len: int
    tokens: list[int]
    loss_mask: list[int]  # 1: generated by the policy
    turn_ids: list[int]  # turn index per token, -1 for the prompt
    logprobs: list[float]  # sampling logprob per token, 0 off the policy's tokens
    turns: list[Turn]
    answer: str | None
    stop_reason: str  # "answer", "max_turns", "context", "invalid"
    group: int = 0

    @property
    def response_text(self) -> str:
        return "".join(t.text + (t.observation or "") for t in self.turns)

    @property
    def num_turns(self) -> int:
        return len(self.turns)


def build_prompt(tokenizer, question: str, cfg: RolloutConfig) -> list[int]:
    text = cfg.template.format(question=question.strip())
    if cfg.use_chat_template and tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tokenizer.encode(text)
    if len(ids) > cfg.max_prompt_length:
        # Keep the end, where the question and the generation prompt are.
        ids = ids[-cfg.max_prompt_length :]
    return ids


def parse_action(text: str) -> tuple[str, str | None]:
    """The action a turn's text ends in: ("search", query), ("answer", answer) or ("invalid", None).

    The query / answer is what follows the *last* opening tag before the closing one, so nested or
    repeated tags resolve to the innermost, most recent content."""
    for kind, open_tag, close_tag in (
        ("search", SEARCH_OPEN, SEARCH_CLOSE),
        ("answer", ANSWER_OPEN, ANSWER_CLOSE),
    ):
        end = text.find(close_tag)
        if end < 0:
            continue
        # Only the stop string that ended the turn counts: the earliest closing tag.
        other = SEARCH_CLOSE if kind == "answer" else ANSWER_CLOSE
        other_end = text.find(other)
        if 0 <= other_end < end:
            continue
        start = text.rfind(open_tag, 0, end)
        if start < 0:
            return "invalid", None
        content = text[start + len(open_tag) : end].strip()
        if not content:
            return "invalid", None
        return kind, content
    return "invalid", None


def observation_ids(tokenizer, docs_text: str, max_obs_length: int) -> list[int]:
    """Search-R1's observation `\\n\\n<information>{docs.strip()}</information>\\n\\n` as token ids.

    The tags are tokenized apart from the docs so that truncating to `max_obs_length` cuts the
    docs, never the closing tag (Search-R1 cuts the whole string; keeping the tag is our choice)."""
    head = tokenizer.encode(OBSERVATION_HEAD)
    tail = tokenizer.encode(OBSERVATION_TAIL)
    body = tokenizer.encode(docs_text.strip())
    room = max(max_obs_length - len(head) - len(tail), 0)
    return head + body[:room] + tail


class EpisodeRunner:
    """Runs batched search episodes with one model, tokenizer and retriever."""

    def __init__(self, sampler: sampling.Sampler, tokenizer, retriever: Retriever | None, cfg: RolloutConfig):
        if tuple(sampler.stop_table.stop_strings[:2]) != STOP_STRINGS:
            raise ValueError(f"the sampler must be built with stop strings {STOP_STRINGS} first")
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.cfg = cfg
        self._invalid = tokenizer.encode(INVALID_ACTION_MESSAGE)
        self.timing: dict[str, float] = {}

    # --- host-side environment ----------------------------------------------------------------
    def _observation_ids(self, docs_text: str) -> list[int]:
        return observation_ids(self.tokenizer, docs_text, self.cfg.max_obs_length)

    def _retrieve(self, queries: list[str]) -> list[list[Doc]] | str:
        if self.retriever is None:
            raise RetrieverError("the policy searched but no retriever was given: pass --retriever")
        t0 = time.perf_counter()
        try:
            results = self.retriever.search(queries, self.cfg.docs_per_search)
        except RetrieverError as e:
            if self.cfg.on_retriever_error == "raise":
                raise
            log.warning("retriever failed, the error becomes the observation: %s", e)
            return f"Search failed: {e}"
        finally:
            self.timing["retrieval"] = self.timing.get("retrieval", 0.0) + time.perf_counter() - t0
        if len(results) != len(queries):
            raise RetrieverError(f"retriever returned {len(results)} result lists for {len(queries)} queries")
        return results

    # --- the episode loop ----------------------------------------------------------------------
    def run(
        self,
        params,
        questions: Sequence[str],
        uids: Sequence[str] | None = None,
        *,
        n: int = 1,
        rng=None,
        seed: int = 0,
    ) -> list[Episode]:
        """Episodes for every question repeated n times (rows of one question are adjacent)."""
        cfg, tok, smp = self.cfg, self.tokenizer, self.sampler
        self.timing = {}
        uids = list(uids) if uids is not None else [str(i) for i in range(len(questions))]
        rows = len(questions) * n
        prompts = [build_prompt(tok, q, cfg) for q in questions for _ in range(n)]
        episodes = [
            Episode(
                uid=uids[i // n],
                prompt_len=len(p),
                tokens=list(p),
                loss_mask=[0] * len(p),
                turn_ids=[-1] * len(p),
                logprobs=[0.0] * len(p),
                turns=[],
                answer=None,
                stop_reason="max_turns",
                group=i // n,
            )
            for i, p in enumerate(prompts)
        ]
        b = sampling.bucket(rows, smp.row_multiple)
        width = sampling.bucket(max(len(p) for p in prompts), 16)
        max_len = sampling.bucket(cfg.context_length(width), 64)
        rng = jax.random.key(seed) if rng is None else rng
        alive = np.zeros(b, bool)
        alive[:rows] = True

        t0 = time.perf_counter()
        gen = smp.prefill(params, *sampling.left_pad(prompts, width, smp.pad_id, num_rows=b), max_len=max_len)
        for turn in range(cfg.num_turns):
            if not alive.any():
                break
            search_allowed = turn < cfg.max_turns
            if cfg.resume == "reprefill" and turn > 0:
                gen = self._reprefill(params, episodes, b, max_len)
            rng, key = jax.random.split(rng)
            gen, out = smp.decode(
                params, gen, key, max_new=cfg.max_response_length, sampling=cfg.sampling_params, active=alive
            )
            out = to_host(out)  # every process needs every row: host-side work is replicated
            appends: dict[int, list[int]] = {}
            searches: list[tuple[int, str]] = []
            for i in np.flatnonzero(alive):
                ep = episodes[i]
                k = int(out.num_tokens[i])
                ids = out.tokens[i, :k].tolist()
                start = len(ep.tokens)
                ep.tokens += ids
                ep.loss_mask += [1] * k
                ep.turn_ids += [turn] * k
                ep.logprobs += out.logprobs[i, :k].tolist()
                text = tok.decode(ids)
                stop = sampling.STOP_NAMES[int(out.stop_reason[i])]
                action, content = parse_action(text) if stop == "stop_string" else ("invalid", None)
                t = Turn(
                    action=action,
                    policy_span=(start, start + k),
                    obs_span=None,
                    text=text,
                    observation=None,
                    stop=stop,
                )
                ep.turns.append(t)
                if stop == "context":
                    ep.stop_reason, alive[i] = "context", False
                elif action == "answer":
                    ep.answer, ep.stop_reason, alive[i] = content, "answer", False
                elif not search_allowed:
                    t.action = "search_disabled" if action == "search" else action
                    ep.stop_reason, alive[i] = "max_turns", False
                elif action == "search":
                    t.query = content[:MAX_QUERY_CHARS]
                    searches.append((i, t.query))
                else:
                    t.observation = INVALID_ACTION_MESSAGE
                    appends[i] = list(self._invalid)
            if searches:
                results = self._retrieve([q for _, q in searches])
                for j, (i, _) in enumerate(searches):
                    turn_rec = episodes[i].turns[-1]
                    if isinstance(results, str):
                        obs_ids = self._observation_ids(results)
                    else:
                        turn_rec.docs = results[j]
                        obs_ids = self._observation_ids(format_docs(results[j]))
                    turn_rec.observation = tok.decode(obs_ids)
                    appends[i] = obs_ids
            if not appends:
                continue
            # Rows whose observation would not leave room for a next turn end here.
            room = max_len - int(gen.cache.index)
            width = sampling.bucket(max(len(v) for v in appends.values()), 16)
            if width + 1 > room:
                for i in appends:
                    episodes[i].stop_reason, alive[i] = "context", False
                    episodes[i].turns[-1].observation = None
                continue
            for i, ids in appends.items():
                ep = episodes[i]
                start = len(ep.tokens)
                ep.tokens += ids
                ep.loss_mask += [0] * len(ids)
                ep.turn_ids += [turn] * len(ids)
                ep.logprobs += [0.0] * len(ids)
                ep.turns[-1].obs_span = (start, start + len(ids))
            if cfg.resume == "cache":
                seqs = [appends.get(i, []) for i in range(b)]
                gen = smp.append(params, gen, *sampling.right_pad(seqs, width, smp.pad_id))
        for ep in episodes:
            if ep.answer is None:
                ep.answer = extract_answer("".join(t.text for t in ep.turns))
        self.timing["total"] = time.perf_counter() - t0
        return episodes

    def _reprefill(self, params, episodes: list[Episode], b: int, max_len: int):
        """The naive method: the whole context so far, prefilled from scratch."""
        seqs = [ep.tokens for ep in episodes]
        width = sampling.bucket(max(len(s) for s in seqs), 16)
        return self.sampler.prefill(
            params, *sampling.left_pad(seqs, width, self.sampler.pad_id, num_rows=b), max_len=max_len
        )
