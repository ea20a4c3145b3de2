"""A small byte-level BPE tokenizer for the demo policy, trained on the demo task's own text.

Tag strings (<think>, <search>, ...) are added tokens: one id each, decoded back as text (not
"special", so skip_special_tokens keeps them). ChatML markers are special tokens, as in Qwen2.5.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

TAGS = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>",
        "<information>", "</information>")
EOS = "<|endoftext|>"
CHATML = (EOS, "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 1024  # Learned vocabulary incl. the 3 ChatML ids; the 8 tags come on top.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_TAG_SPLIT = re.compile("|".join(re.escape(t) for t in TAGS + CHATML))


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Trains byte-level BPE on `texts` (tags cut out first: they are whole tokens anyway)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(CHATML),  # Ids 0, 1, 2.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # Any byte stays encodable.
    pieces = (piece for text in texts for piece in _TAG_SPLIT.split(text) if piece)
    tokenizer.train_from_iterator(pieces, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """Writes tokenizer.json and a tokenizer_config.json that transformers.AutoTokenizer reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "additional_special_tokens": list(CHATML[1:]),
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
