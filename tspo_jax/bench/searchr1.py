"""The Search-R1 episode loop (its `LLMGenerationManager.run_llm_loop`), in PyTorch with transformers.

Each turn: left-pad every active row's whole context so far, `generate` up to the per-turn limit
(no stop strings: the model runs on past `</search>` until EOS or the limit), decode the responses,
cut each after its first `</search>` (else its first `</answer>`) in Python, re-tokenize the cut
text, run the batch's searches in one retriever call, append the observation, and go round again
on the grown context, prefilled from scratch. After max_turns, one last turn with search off.

Observation and invalid-action token ids are made with our rollout's functions so the episodes
can be compared token for token with ours; everything that costs time is Search-R1's method.
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np

from tspo_jax import rollout
from tspo_jax.retrieval.base import format_docs

_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


@dataclasses.dataclass
class SearchR1Episode:
    tokens: list[int]
    prompt_len: int
    turn_texts: list[str]
    queries: list[str]
    answer: str | None = None


def cut_response(text: str) -> str:
    """Search-R1's `_postprocess_responses`: keep up to the first </search>, else the first </answer>."""
    if rollout.SEARCH_CLOSE in text:
        return text.split(rollout.SEARCH_CLOSE)[0] + rollout.SEARCH_CLOSE
    if rollout.ANSWER_CLOSE in text:
        return text.split(rollout.ANSWER_CLOSE)[0] + rollout.ANSWER_CLOSE
    return text


def parse(text: str) -> tuple[str | None, str]:
    """Search-R1's `postprocess_predictions`: the first <search>/<answer> element."""
    m = _ACTION.search(text)
    return (m.group(1), m.group(2).strip()) if m else (None, "")


def run_episodes(model, tokenizer, retriever, prompts, cfg: rollout.RolloutConfig, stats: dict | None = None):
    """Greedy Search-R1 episodes for token-id prompts. `stats` collects generated / processed
    token counts and retrieval time."""
    import torch
    import transformers

    stats = {} if stats is None else stats
    stats.update(generated_tokens=0, prefilled_tokens=0, retrieval_s=0.0, turns=0)
    episodes = [SearchR1Episode(list(p), len(p), [], []) for p in prompts]
    active = [True] * len(episodes)
    dev = model.device
    pad = tokenizer.pad_id
    gc = transformers.GenerationConfig(
        max_new_tokens=cfg.max_response_length, do_sample=False, eos_token_id=tokenizer.eos_id, pad_token_id=pad
    )
    invalid_ids = tokenizer.encode(rollout.INVALID_ACTION_MESSAGE)
    for turn in range(cfg.num_turns):
        rows = [i for i, a in enumerate(active) if a]
        if not rows:
            break
        search_allowed = turn < cfg.max_turns
        width = max(len(episodes[i].tokens) for i in rows)
        ids = np.full((len(rows), width), pad, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for j, i in enumerate(rows):
            n = len(episodes[i].tokens)
            ids[j, width - n :] = episodes[i].tokens
            mask[j, width - n :] = 1
        with torch.inference_mode():
            out = model.generate(
                torch.as_tensor(ids, device=dev), attention_mask=torch.as_tensor(mask, device=dev), generation_config=gc
            )
        gen = out[:, width:].cpu().numpy()
        stats["generated_tokens"] += int(gen.size)
        stats["prefilled_tokens"] += int(mask.sum())
        stats["turns"] += 1
        texts = tokenizer.backend.decode_batch([g.tolist() for g in gen], skip_special_tokens=True)
        searches = []
        for j, i in enumerate(rows):
            ep = episodes[i]
            text = cut_response(texts[j])
            ep.tokens += tokenizer.encode(text)
            ep.turn_texts.append(text)
            action, content = parse(text)
            if action == "answer":
                ep.answer, active[i] = content, False
            elif not search_allowed:
                active[i] = False
            elif action == "search":
                ep.queries.append(content)
                searches.append(i)
            else:
                ep.tokens += invalid_ids
        if searches:
            t0 = time.perf_counter()
            results = retriever.search([episodes[i].queries[-1] for i in searches], cfg.docs_per_search)
            stats["retrieval_s"] += time.perf_counter() - t0
            for i, docs in zip(searches, results):
                episodes[i].tokens += rollout.observation_ids(tokenizer, format_docs(docs), cfg.max_obs_length)
    return episodes
