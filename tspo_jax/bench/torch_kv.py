"""A PyTorch episode loop that keeps its KV cache between turns: the strongest PyTorch method here.

transformers' `DynamicCache` is kept for the whole episode batch: the prompts are prefilled once,
each turn decodes every live row in lockstep until the last one stops (transformers has no
continuous batching), and an observation goes in as one right-padded block for the rows that
searched, on the same cache; only new tokens are ever fed. That is what the GPU stacks' prefix
caching buys them, without its block granularity or evictions. The LM head runs only at each
row's last valid position, as ours does.

Stops as ours: the first `</search>` or `</answer>` (matched on the decoded text of the turn),
EOS, or the per-turn limit. `forced` (per row, per turn, the token ids a reference run produced)
replaces the argmax, so sampled episodes can be replayed here: same tokens, same forward work.
"""

from __future__ import annotations

import time

import numpy as np

from tspo_jax import rollout
from tspo_jax.retrieval.base import format_docs


def run_episodes(model, tokenizer, retriever, prompts, cfg: rollout.RolloutConfig, *, forced=None,
                 stats: dict | None = None) -> list[list[int]]:
    """Token ids of each row's episode (greedy, or `forced`). `stats` gets generated tokens,
    retrieval seconds and the cache's peak bytes."""
    import torch
    from transformers import DynamicCache

    stats = {} if stats is None else stats
    stats.update(generated_tokens=0, retrieval_s=0.0, kv_bytes=0)
    dev = model.device
    b = len(prompts)
    pad = tokenizer.pad_id
    eos = tokenizer.eos_id
    tokens = [list(p) for p in prompts]
    cache = DynamicCache()
    state = {"mask": None, "pos": torch.zeros(b, dtype=torch.long, device=dev)}
    invalid_ids = tokenizer.encode(cfg.invalid_action_message)

    def forward(ids: np.ndarray, mask: np.ndarray, logits):
        """Feeds a [b, C] block on the cache; rows with a valid token get new next-token logits."""
        ids_t = torch.as_tensor(ids, device=dev)
        mask_t = torch.as_tensor(mask, device=dev, dtype=torch.long)
        full = mask_t if state["mask"] is None else torch.cat([state["mask"], mask_t], 1)
        pos = (state["pos"][:, None] + torch.cumsum(mask_t, 1) - 1).clamp(min=0)
        with torch.inference_mode():
            hidden = model.model(input_ids=ids_t, attention_mask=full, position_ids=pos, past_key_values=cache,
                                 use_cache=True).last_hidden_state
            has = mask.any(1)
            last = np.where(has, mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1), 0)
            picked = hidden[torch.arange(b, device=dev), torch.as_tensor(last, device=dev)]
            new = model.lm_head(picked).float()
        state["mask"], state["pos"] = full, state["pos"] + mask_t.sum(1)
        keep = torch.as_tensor(has, device=dev)[:, None]
        return new if logits is None else torch.where(keep, new, logits)

    width = max(len(p) for p in prompts)
    ids = np.full((b, width), pad, np.int64)
    mask = np.zeros((b, width), bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = True
    logits = forward(ids, mask, None)
    live = np.ones(b, bool)
    for turn in range(cfg.max_turns + 1):
        if not live.any():
            break
        turn_toks: list[list[int]] = [[] for _ in range(b)]
        running = live.copy()
        for _ in range(cfg.max_response_length):
            if not running.any():
                break
            best = logits.argmax(-1).cpu().numpy()
            tok = np.full(b, pad, np.int64)
            stopped = np.zeros(b, bool)
            for i in np.flatnonzero(running):
                t = int(best[i]) if forced is None else forced[i][turn][len(turn_toks[i])]
                turn_toks[i].append(t)
                tok[i] = t
                if forced is not None:
                    stopped[i] = len(turn_toks[i]) == len(forced[i][turn])
                else:
                    tail = tokenizer.decode(turn_toks[i][-8:])
                    stopped[i] = t == eos or any(s in tail for s in rollout.STOP_STRINGS)
                stopped[i] |= len(turn_toks[i]) >= cfg.max_response_length
            stats["generated_tokens"] += int(running.sum())
            logits = forward(tok[:, None], running[:, None], logits)
            running &= ~stopped
        searches, obs = [], {}
        for i in np.flatnonzero(live):
            tokens[i] += turn_toks[i]
            action, content = rollout.parse_action(tokenizer.decode(turn_toks[i]))
            ended_on_stop = any(s in tokenizer.decode(turn_toks[i][-8:]) for s in rollout.STOP_STRINGS)
            if not ended_on_stop:
                action = "invalid"
            if action == "answer" or turn >= cfg.max_turns:
                live[i] = False
            elif action == "search":
                searches.append((i, content[: rollout.MAX_QUERY_CHARS]))
            else:
                obs[i] = invalid_ids
        if searches:
            t0 = time.perf_counter()
            results = retriever.search([q for _, q in searches], cfg.docs_per_search)
            stats["retrieval_s"] += time.perf_counter() - t0
            for (i, _), docs in zip(searches, results):
                obs[i] = rollout.observation_ids(tokenizer, format_docs(docs), cfg.max_obs_length)
        if obs:
            w = max(len(v) for v in obs.values())
            ids = np.full((b, w), pad, np.int64)
            mask = np.zeros((b, w), bool)
            for i, v in obs.items():
                ids[i, : len(v)] = v
                mask[i, : len(v)] = True
                tokens[i] += v
            logits = forward(ids, mask, logits)
    stats["kv_bytes"] = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return tokens
