"""Multi-turn search episodes: decoding interrupted by tool calls, resumed on the same KV cache.

A turn decodes a row until it stops (`</search>`, `</answer>`, EOS or the per-turn budget). A row
that searched gets its query parsed, retrieved in one batched call with the other rows that
searched, formatted as Search-R1's `<information>` observation, tokenized, truncated, and appended
to *its* cache row only; then its decoding resumes. Nothing is decoded and re-tokenized: the token
ids in an `Episode` are exactly the ones the model consumed, so training scores what was sampled.

Two engines (`engine`):
  slots     (default) S decode slots (`slots`; 0 = one per row). Episodes wait for a free slot,
            are prefilled into it alone, and decode in compiled chunks of at most `decode_chunk`
            steps that return to the host as soon as any slot stops. Between chunks the host ends
            turns, runs one retrieval call for every slot that searched, appends observations
            into those slots, frees finished slots and refills them. No row waits for another's
            turn, and KV memory grows with S, not with the rows.
  lockstep  every row of the step in one cache; each turn lasts as long as its longest row.
A row samples with keys made from (run key, episode index, turn, position), so both engines, any S
and any finishing order sample the same episodes.

`resume="reprefill"` is the naive method kept for tests and benchmarks: every turn prefills the
whole context so far from scratch. Greedy episodes of every method are identical.
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
# Search-R1's own wording (scripts/data_process/nq_search.py's 'base' prefix and the message
# search_r1/llm_agent/generation.py appends after an invalid action), reproduced so that a
# Search-R1-trained checkpoint sees exactly the text it was trained on.
SEARCH_R1_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every "
    "time you get new information. After reasoning, if you find you lack some knowledge, you can call "
    "a search engine by <search> query </search> and it will return the top searched results between "
    "<information> and </information>. You can search as many times as your want. If you find no "
    "further external knowledge needed, you can directly provide the answer inside <answer> and "
    "</answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: {question}\n"
)
SEARCH_R1_INVALID_ACTION_MESSAGE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> "
    "and </search>. If I want to give the final answer, I should put the answer between <answer> and "
    "</answer>. Let me try again.\n"
)
# rollout.template and rollout.invalid_action_message accept a preset's name for its text.
PROMPT_PRESETS = {
    "tspo": {"template": DEFAULT_TEMPLATE, "invalid_action_message": INVALID_ACTION_MESSAGE},
    "search_r1": {"template": SEARCH_R1_TEMPLATE, "invalid_action_message": SEARCH_R1_INVALID_ACTION_MESSAGE},
}
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
    engine: str = "slots"  # "slots" (bounded decode slots, refilled) or "lockstep" (all rows per turn)
    slots: int = 0  # decode slots of the slot engine; 0 = one per row of the step
    decode_chunk: int = 64  # most decode steps per compiled call before the host looks again
    # Most rows one refill (prompts) or append (observations) call takes; more are split into
    # several calls. 0: all slots at once. A refill's activations grow with its rows x width, so at
    # a 2,048-token prompt this, not the KV cache, sets the rollout's peak memory (tspo_jax.plan).
    fill_rows: int = 0
    # Decode from a copy of the params in the compute dtype, gathered over fsdp (still split over
    # tensor), made once per run: otherwise every decode step all-gathers the fsdp-sharded fp32
    # weights (tspo_jax.plan: 7 GB of collectives per step for 3B on v5e-64). Costs that copy's memory.
    gather_params: bool = False
    on_retriever_error: str = "raise"  # "raise" or "observe" (the error text becomes the observation)
    template: str = DEFAULT_TEMPLATE  # text with {question}, or a PROMPT_PRESETS name
    use_chat_template: bool = True
    invalid_action_message: str = INVALID_ACTION_MESSAGE  # text, or a PROMPT_PRESETS name

    def __post_init__(self):
        self.template = PROMPT_PRESETS.get(self.template, {}).get("template", self.template)
        self.invalid_action_message = PROMPT_PRESETS.get(self.invalid_action_message, {}).get(
            "invalid_action_message", self.invalid_action_message)
        if not self.invalid_action_message:
            raise ValueError(f"invalid_action_message is empty: give its text or a preset name {sorted(PROMPT_PRESETS)}")
        if self.resume not in ("cache", "reprefill"):
            raise ValueError(f"resume must be 'cache' or 'reprefill', got {self.resume!r}")
        if self.engine not in ("slots", "lockstep"):
            raise ValueError(f"engine must be 'slots' or 'lockstep', got {self.engine!r}")
        if not isinstance(self.slots, int) or self.slots < 0:
            raise ValueError(f"slots must be an int >= 0 (0: one slot per row), got {self.slots!r}")
        if not isinstance(self.fill_rows, int) or self.fill_rows < 0:
            raise ValueError(f"fill_rows must be an int >= 0 (rows per refill/append call; 0: all slots), got "
                             f"{self.fill_rows!r}")
        if not isinstance(self.decode_chunk, int) or self.decode_chunk < 1:
            raise ValueError(f"decode_chunk must be an int >= 1 (decode steps per compiled call), got "
                             f"{self.decode_chunk!r}")
        if self.on_retriever_error not in ("raise", "observe"):
            raise ValueError(
                f"on_retriever_error must be 'raise' or 'observe', got {self.on_retriever_error!r}"
            )
        if "{question}" not in self.template:
            raise ValueError("the prompt template must contain the placeholder {question} "
                             f"(or be a preset name: {sorted(PROMPT_PRESETS)})")
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
        obs_width = sampling.round_up(max(self.max_obs_length, len(self.invalid_action_message)), 16)
        return prompt_len + turns * self.max_response_length + self.max_turns * obs_width

    def cache_length(self, prompt_len: int) -> int:
        """Positions per cache row: the context length, padded to a multiple of 16."""
        return sampling.round_up(self.context_length(prompt_len), 16)


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

    @property
    def retrieved_observation(self) -> str | None:
        """The observation when it holds retrieved documents, else None. FOLR looks for evidence
        here only: the invalid-action message and a "Search failed: ..." text were not retrieved."""
        return self.observation if self.action == "search" and self.docs else None


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


def fill_calls(rows: int, fill_rows: int) -> list[tuple[int, int, int]]:
    """How the slot engine splits `rows` refills or appends into compiled calls: [(start, end,
    padded rows)], at most fill_rows rows each (0: all in one), padded to the next power of two
    (few distinct shapes to compile) but never past fill_rows."""
    step = fill_rows or rows
    calls = []
    for a in range(0, rows, step):
        padded = sampling.bucket(min(step, rows - a), 1)
        calls.append((a, min(a + step, rows), min(padded, fill_rows) if fill_rows else padded))
    return calls


def build_prompt(tokenizer, question: str | Sequence[dict], cfg: RolloutConfig) -> list[int]:
    """Prompt ids from a question (put into cfg.template) or from a row's own chat messages
    (data.prompt_source="column"), through the chat template with the generation prompt, as
    verl does; without a chat template, verl takes the first message's content as the text."""
    if isinstance(question, str):
        messages = [{"role": "user", "content": cfg.template.format(question=question.strip())}]
    else:
        messages = [dict(m) for m in question]
        if not messages:
            raise ValueError("a prompt given as chat messages needs at least one message")
    if cfg.use_chat_template and tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    elif len(messages) == 1:
        text = messages[0]["content"]
    else:
        raise ValueError(f"a prompt of {len(messages)} chat messages needs the tokenizer's chat template; "
                         "set rollout.use_chat_template=True with a tokenizer that has one")
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
    """Runs batched search episodes with one model, tokenizer and retriever.

    After `run`, `timing` holds seconds (retrieval, total) and `stats` the engine's counters:
    decode_steps, slot_steps (decode steps x rows of the cache), live_steps (slot-steps that
    decoded a live row), occupancy (their ratio), cache_rows, cache_len and kv_bytes (the cache)."""

    def __init__(self, sampler: sampling.Sampler, tokenizer, retriever: Retriever | None, cfg: RolloutConfig):
        if tuple(sampler.stop_table.stop_strings[:2]) != STOP_STRINGS:
            raise ValueError(f"the sampler must be built with stop strings {STOP_STRINGS} first")
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.cfg = cfg
        self._invalid = tokenizer.encode(cfg.invalid_action_message)
        self.timing: dict[str, float] = {}
        self.stats: dict[str, float] = {}

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

    def _end_turn(self, ep: Episode, ids: list[int], logprobs: list[float], stop_code: int, turn: int) -> str:
        """Records a finished policy turn; returns what comes next: "done", "search" (the query is
        on the turn) or "invalid" (the invalid-action message follows)."""
        k = len(ids)
        start = len(ep.tokens)
        ep.tokens += ids
        ep.loss_mask += [1] * k
        ep.turn_ids += [turn] * k
        ep.logprobs += logprobs
        text = self.tokenizer.decode(ids)
        stop = sampling.STOP_NAMES[stop_code]
        action, content = parse_action(text) if stop == "stop_string" else ("invalid", None)
        t = Turn(action=action, policy_span=(start, start + k), obs_span=None, text=text, observation=None, stop=stop)
        ep.turns.append(t)
        if stop == "context":
            ep.stop_reason = "context"
            return "done"
        if action == "answer":
            ep.answer, ep.stop_reason = content, "answer"
            return "done"
        if turn >= self.cfg.max_turns:  # the last turn may not search
            t.action = "search_disabled" if action == "search" else action
            ep.stop_reason = "max_turns"
            return "done"
        if action == "search":
            t.query = content[:MAX_QUERY_CHARS]
            return "search"
        t.observation = self.cfg.invalid_action_message
        return "invalid"

    def _observations(self, episodes: list[Episode], nexts: dict[int, str]) -> dict[int, list[int]]:
        """Observation ids for every episode whose turn searched (one retrieval call) or was invalid."""
        obs = {i: list(self._invalid) for i, what in nexts.items() if what == "invalid"}
        searches = [i for i, what in nexts.items() if what == "search"]
        if searches:
            results = self._retrieve([episodes[i].turns[-1].query for i in searches])
            for j, i in enumerate(searches):
                turn_rec = episodes[i].turns[-1]
                if isinstance(results, str):
                    ids = self._observation_ids(results)
                else:
                    turn_rec.docs = results[j]
                    ids = self._observation_ids(format_docs(results[j]))
                turn_rec.observation = self.tokenizer.decode(ids)
                obs[i] = ids
        return obs

    @staticmethod
    def _add_observation(ep: Episode, ids: list[int], turn: int) -> None:
        start = len(ep.tokens)
        ep.tokens += ids
        ep.loss_mask += [0] * len(ids)
        ep.turn_ids += [turn] * len(ids)
        ep.logprobs += [0.0] * len(ids)
        ep.turns[-1].obs_span = (start, start + len(ids))

    @staticmethod
    def _no_room(ep: Episode) -> None:
        """The observation would leave no room for a next turn: the episode ends here."""
        ep.stop_reason = "context"
        ep.turns[-1].observation = None

    # --- the episode loop ----------------------------------------------------------------------
    def run(
        self,
        params,
        questions: Sequence[str | Sequence[dict]],
        uids: Sequence[str] | None = None,
        *,
        n: int = 1,
        rng=None,
        seed: int = 0,
    ) -> list[Episode]:
        """Episodes for every question repeated n times (rows of one question are adjacent).
        A question is a string for the template, or a row's chat messages (see build_prompt)."""
        cfg, tok = self.cfg, self.tokenizer
        self.timing, self.stats = {}, {"decode_steps": 0, "slot_steps": 0, "live_steps": 0}
        uids = list(uids) if uids is not None else [str(i) for i in range(len(questions))]
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
        rng = jax.random.key(seed) if rng is None else rng
        t0 = time.perf_counter()
        if episodes:
            if cfg.gather_params:
                params = self.sampler.gathered(params)
            (self._run_slots if cfg.engine == "slots" else self._run_lockstep)(params, episodes, rng)
        for ep in episodes:
            if ep.answer is None:
                ep.answer = extract_answer("".join(t.text for t in ep.turns))
        self.timing["total"] = time.perf_counter() - t0
        st = self.stats
        st["occupancy"] = st["live_steps"] / st["slot_steps"] if st["slot_steps"] else 0.0
        return episodes

    def _count(self, gen, out) -> None:
        st = self.stats
        st["decode_steps"] += int(out.steps)
        st["slot_steps"] += int(out.steps) * gen.next_logits.shape[0]
        st["live_steps"] += int(out.live_steps)
        st["cache_rows"], st["cache_len"] = gen.cache.batch, gen.cache.max_len
        st["kv_bytes"] = max(st.get("kv_bytes", 0), sum(x.nbytes for x in jax.tree.leaves(gen.cache)))

    def _run_slots(self, params, episodes: list[Episode], rng) -> None:
        """The slot engine (see the module docstring)."""
        cfg, smp = self.cfg, self.sampler
        rows = len(episodes)
        num = sampling.round_up(min(cfg.slots or rows, rows), smp.row_multiple)
        max_len = cfg.cache_length(max(e.prompt_len for e in episodes))
        gen = smp.init_slots(num, max_len)
        slot_ep = np.full(num, -1)  # episode in each slot, -1: free
        lengths = np.zeros(num, np.int64)  # each slot's cache write index, mirrored on the host
        count = np.zeros(num, np.int32)  # tokens of the current turn so far
        matcher = np.zeros(num, np.int32)
        turn = np.zeros(rows, np.int32)
        buf: dict[int, tuple[list[int], list[float]]] = {}  # current turn's tokens per slot
        waiting = list(range(rows))

        def blocks(slots, seqs):
            """(slot ids, tokens, valid) per compiled call: at most cfg.fill_rows rows each, padded
            rows and width; padding rows go to an id past the last slot, so their writes drop."""
            for a, b, r in fill_calls(len(slots), cfg.fill_rows):
                width = sampling.round_up(max(len(x) for x in seqs[a:b]), 16)
                toks, valid = sampling.right_pad(seqs[a:b], width, smp.pad_id, num_rows=r)
                ids = np.full(r, num, np.int32)
                ids[: b - a] = slots[a:b]
                yield ids, toks, valid

        def fill(gen, slots, seqs):
            """Prefills seqs into slots."""
            for s, x in zip(slots, seqs):
                lengths[s] = len(x)
            for ids, toks, valid in blocks(slots, seqs):
                gen = smp.refill(params, gen, ids, toks, valid)
            return gen

        while True:
            free = np.flatnonzero(slot_ep < 0)[: len(waiting)]
            if len(free):
                new, waiting = waiting[: len(free)], waiting[len(free) :]
                slot_ep[free] = new
                count[free], matcher[free] = 0, 0
                for s in free:
                    buf[s] = ([], [])
                gen = fill(gen, free, [episodes[i].tokens for i in new])
            active = slot_ep >= 0
            if not active.any():
                break
            ep_ids = np.where(active, slot_ep, 0)
            gen, out = smp.decode(
                params, gen, rng, max_new=cfg.decode_chunk, sampling=cfg.sampling_params, active=active,
                budget=np.full(num, cfg.max_response_length, np.int32), count=count, matcher=matcher,
                seq_ids=ep_ids, turns=turn[ep_ids], until="any", lengths=lengths,
            )
            out = to_host(out)  # every process needs every row: host-side work is replicated
            self._count(gen, out)
            nexts: dict[int, str] = {}  # episode -> what follows its finished turn
            slot_of: dict[int, int] = {}
            for s in np.flatnonzero(active):
                k = int(out.num_tokens[s])
                ids, lps = buf[s]
                ids += out.tokens[s, :k].tolist()
                lps += out.logprobs[s, :k].tolist()
                lengths[s] += k
                count[s] += k
                matcher[s] = out.matcher[s]
                reason = int(out.stop_reason[s])
                if reason == sampling.RUNNING:
                    continue
                i = int(slot_ep[s])
                nexts[i] = self._end_turn(episodes[i], ids, lps, reason, int(turn[i]))
                slot_of[i] = s
            obs = self._observations(episodes, nexts)
            resume: list[int] = []
            for i, what in nexts.items():
                s = slot_of[i]
                if what != "done" and len(obs[i]) + 1 > max_len - lengths[s]:
                    self._no_room(episodes[i])
                    what = "done"
                if what == "done":
                    slot_ep[s] = -1
                    continue
                self._add_observation(episodes[i], obs[i], int(turn[i]))
                turn[i] += 1
                count[s], matcher[s] = 0, 0
                buf[s] = ([], [])
                resume.append(i)
            if not resume:
                continue
            slots = [slot_of[i] for i in resume]
            if cfg.resume == "reprefill":
                gen = fill(gen, slots, [episodes[i].tokens for i in resume])
                continue
            for ids, toks, valid in blocks(slots, [obs[i] for i in resume]):
                gen = smp.append(params, gen, toks, valid, ids, lengths=lengths)
            for i, s in zip(resume, slots):
                lengths[s] += len(obs[i])

    def _run_lockstep(self, params, episodes: list[Episode], rng) -> None:
        """Every row in one cache; a turn decodes all live rows until the last one stops."""
        cfg, smp = self.cfg, self.sampler
        rows = len(episodes)
        b = sampling.round_up(rows, smp.row_multiple)
        width = sampling.round_up(max(e.prompt_len for e in episodes), 16)
        max_len = cfg.cache_length(width)
        alive = np.arange(b) < rows
        seq_ids = np.arange(b)
        gen = smp.prefill(params, *sampling.left_pad([e.tokens for e in episodes], width, smp.pad_id, num_rows=b),
                          max_len=max_len)
        lengths = np.full(b, width)
        for turn in range(cfg.num_turns):
            if not alive.any():
                break
            if cfg.resume == "reprefill" and turn > 0:
                seqs = [ep.tokens for ep in episodes]
                w = sampling.round_up(max(len(x) for x in seqs), 16)
                gen = smp.prefill(params, *sampling.left_pad(seqs, w, smp.pad_id, num_rows=b), max_len=max_len)
                lengths[:] = w
            gen, out = smp.decode(
                params, gen, rng, max_new=cfg.max_response_length, sampling=cfg.sampling_params, active=alive,
                seq_ids=seq_ids, turns=np.full(b, turn), lengths=lengths,
            )
            out = to_host(out)  # every process needs every row: host-side work is replicated
            self._count(gen, out)
            lengths += out.num_tokens
            nexts = {}
            for i in np.flatnonzero(alive):
                k = int(out.num_tokens[i])
                nexts[i] = self._end_turn(episodes[i], out.tokens[i, :k].tolist(), out.logprobs[i, :k].tolist(),
                                          int(out.stop_reason[i]), turn)
            obs = self._observations(episodes, nexts)
            for i, what in nexts.items():
                if what != "done" and len(obs[i]) + 1 > max_len - lengths[i]:
                    self._no_room(episodes[i])
                    what = "done"
                if what == "done":
                    alive[i] = False
                    obs.pop(i, None)
                else:
                    self._add_observation(episodes[i], obs[i], turn)
            if not obs or cfg.resume == "reprefill":
                continue
            w = sampling.round_up(max(len(v) for v in obs.values()), 16)
            gen = smp.append(params, gen, *sampling.right_pad([obs.get(i, []) for i in range(b)], w, smp.pad_id),
                             lengths=lengths)
            for i, v in obs.items():
                lengths[i] += len(v)
