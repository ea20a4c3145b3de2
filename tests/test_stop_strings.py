"""Stop strings on tokens: a row stops on exactly the first token after which its decoded text
contains a stop string, checked against decoding with the real tokenizers on fuzzed text."""

import functools

import pytest
from hypothesis import given, settings, strategies as st

from tspo_jax.demo_task import demo_paths
from tspo_jax.stop_strings import build_stop_table, first_stop_in_text
from tspo_jax.tokenizer import load_tokenizer, qwen25_tokenizer

STOPS = ("</search>", "</answer>", "\n\nUser:")


@functools.lru_cache(maxsize=None)
def _tok_and_table(name):
    tok = qwen25_tokenizer() if name == "qwen2.5" else load_tokenizer(demo_paths()["tokenizer"])
    return tok, build_stop_table(STOPS, tok.token_bytes)


def _walk(table, ids):
    """(index of the token that completed a stop string, which one) or (-1, -1)."""
    state = 0
    for i, t in enumerate(ids):
        hit = table.completes[state, t]
        if hit >= 0:
            return i, int(hit)
        state = table.next_state[state, t]
    return -1, -1


def _reference(tok, ids):
    for i in range(len(ids)):
        which = first_stop_in_text(tok.decode_bytes(ids[: i + 1]).decode("utf-8", "replace"), STOPS)
        if which >= 0:
            return i, which
    return -1, -1


PIECES = st.sampled_from(
    [
        "</search>",
        "</answer>",
        "</",
        "search>",
        "</sear",
        "ch>",
        " </search>",
        "<search>",
        "</search>\n",
        "x</search>",
        "\n\nUser:",
        "\n\n",
        "User",
        ":",
        "</answer.",
        "<<//",
        "é",
        "中文",
        "🙂",
        " the",
        "\t",
        "  ",
        "42",
        "def f():",
        ">",
    ]
)
TEXT = st.lists(st.one_of(PIECES, st.text(max_size=6)), max_size=14).map("".join)


@pytest.mark.parametrize("name", ["qwen2.5", "demo"])
@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_stop_index_equals_decoding_each_prefix(name, text):
    tok, table = _tok_and_table(name)
    ids = tok.encode(text)
    assert _walk(table, ids) == _reference(tok, ids)


@pytest.mark.parametrize("name", ["qwen2.5", "demo"])
def test_stop_string_spelled_by_different_token_splits(name):
    tok, table = _tok_and_table(name)
    by_text = {tok.decode([i]): i for i in range(tok.vocab_size)}
    # Hand-made splittings of "</search>" from whole vocabulary tokens, none of them one token.
    for parts in (["</", "search", ">"], ["<", "/", "search", ">"], ["</", "se", "arch", ">"]):
        if not all(p in by_text for p in parts):
            continue
        ids = [by_text["x"]] + [by_text[p] for p in parts]
        assert _walk(table, ids) == (len(ids) - 1, 0)
        assert _walk(table, ids[:-1]) == (-1, -1)  # never earlier


def test_token_that_overshoots_the_stop_string_still_stops_there():
    tok, table = _tok_and_table("qwen2.5")
    ids = tok.encode("query</search>\n\nmore")
    i, which = _walk(table, ids)
    assert which == 0 and "</search>" in tok.decode(ids[: i + 1]) and "</search>" not in tok.decode(ids[:i])


def test_empty_stop_string_is_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        build_stop_table(["", "</a>"], [b"a"])
