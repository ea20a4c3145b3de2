"""Stop strings matched on tokens, exactly as if matched on the decoded text.

BPE spells `</search>` many ways (`</`, `search`, `>` or ` </`, `search`, `>\\n`, or merged with
the character before). We run an Aho-Corasick automaton over the *bytes* of the generated text:
its state is the longest suffix of the bytes so far that is a prefix of some stop string. For
every (state, token) pair we precompute, on the host and vectorised over the vocabulary, the
state after the token's bytes and which stop string (if any) the token completed first. Inside
the jitted decode loop a stop check is then two table lookups per row, and a row stops on
exactly the first token after which its text contains a stop string.

Byte matching equals text matching because UTF-8 is self-synchronising: a valid UTF-8 string
occurs in a decoded text iff its bytes occur in the byte stream.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class StopTable:
    stop_strings: tuple[str, ...]
    next_state: np.ndarray  # [num_states, vocab] int32
    completes: np.ndarray  # [num_states, vocab] int32: index of the stop string completed, or -1


def _automaton(patterns: Sequence[bytes]):
    """Aho-Corasick goto/fail closure as a dense [states, 256] DFA plus the pattern each state ends."""
    goto = [dict()]
    out = [-1]
    for pi, pat in enumerate(patterns):
        s = 0
        for b in pat:
            if b not in goto[s]:
                goto.append(dict())
                out.append(-1)
                goto[s][b] = len(goto) - 1
            s = goto[s][b]
        if out[s] == -1:
            out[s] = pi
    n = len(goto)
    fail = [0] * n
    delta = np.zeros((n, 256), np.int32)
    for b, s in goto[0].items():
        delta[0, b] = s
    queue = deque(goto[0].values())
    while queue:
        s = queue.popleft()
        if out[s] == -1 and out[fail[s]] != -1:
            out[s] = out[fail[s]]  # a shorter pattern ends here too
        for b in range(256):
            if b in goto[s]:
                t = goto[s][b]
                fail[t] = delta[fail[s], b]
                delta[s, b] = t
                queue.append(t)
            else:
                delta[s, b] = delta[fail[s], b]
    return delta, np.asarray(out, np.int32)


def build_stop_table(stop_strings: Sequence[str], token_bytes: Sequence[bytes]) -> StopTable:
    """Per-(state, token) transitions for the given stop strings over a vocabulary's byte strings."""
    stop_strings = tuple(stop_strings)
    if any(not s for s in stop_strings):
        raise ValueError("stop strings must be non-empty")
    vocab = len(token_bytes)
    if not stop_strings:
        return StopTable((), np.zeros((1, vocab), np.int32), np.full((1, vocab), -1, np.int32))
    delta, out = _automaton([s.encode("utf-8") for s in stop_strings])
    lengths = np.fromiter((len(b) for b in token_bytes), np.int64, vocab)
    width = int(lengths.max()) if vocab else 0
    mat = np.zeros((vocab, max(width, 1)), np.uint8)
    for i, b in enumerate(token_bytes):
        mat[i, : len(b)] = np.frombuffer(b, np.uint8)
    n = delta.shape[0]
    next_state = np.empty((n, vocab), np.int32)
    completes = np.full((n, vocab), -1, np.int32)
    for s in range(n):
        cur = np.full(vocab, s, np.int32)
        first = np.full(vocab, -1, np.int32)
        for j in range(width):
            live = j < lengths
            nxt = delta[cur, mat[:, j]]
            cur = np.where(live, nxt, cur)
            hit = live & (first == -1) & (out[cur] != -1)
            first = np.where(hit, out[cur], first)
        next_state[s] = cur
        completes[s] = first
    return StopTable(stop_strings, next_state, completes)


def first_stop_in_text(text: str, stop_strings: Sequence[str]) -> int:
    """Reference: index of the stop string that ends first in `text` (ties: listed first), or -1."""
    best, best_end = -1, None
    for i, s in enumerate(stop_strings):
        j = text.find(s)
        if j >= 0 and (best_end is None or j + len(s) < best_end):
            best, best_end = i, j + len(s)
    return best
