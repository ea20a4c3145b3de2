"""Our Qwen2 on the real Qwen2.5-Coder-0.5B-Instruct checkpoint against transformers (fp32, eager
attention): logits of a left-padded batch of chat prompts, and greedy generation token for token.

Skipped unless the checkpoint is built: `python -m tspo_jax.model.build_offline_checkpoint`.
One torch model and one JAX model (~2 GB each) live for the module; the logits are compared at
the valid positions only.
"""

import gc

import numpy as np
import pytest

from hf_reference import hf_logits
from tspo_jax import generate
from tspo_jax.model import build_offline_checkpoint as builder
from tspo_jax.model.qwen2 import apply

pytestmark = pytest.mark.real_checkpoint

CHATS = [
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    [{"role": "user", "content": "Capital of France, in one word?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Explain in two sentences what a key-value cache does in a transformer."},
    ],
]
NEW_TOKENS = 16
# Measured on this 2-core CPU: max |logit diff| 4.86e-5 over the 112 valid positions.
LOGIT_TOL = 1e-3


@pytest.fixture(scope="module")
def checkpoint_dir():
    path = builder.default_checkpoint_dir()
    if not builder.is_complete(path):
        pytest.skip(
            f"the real checkpoint is not built at {path}: run `python -m tspo_jax.model.build_offline_checkpoint`"
        )
    return str(path)


@pytest.fixture(scope="module")
def models(checkpoint_dir):
    import torch
    import transformers

    # One thread: on a busy 2-core machine two torch threads spin against each other (5x slower).
    torch.set_num_threads(1)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    policy = generate.load_policy(checkpoint_dir)
    yield hf, policy
    del hf, policy
    gc.collect()


@pytest.fixture(scope="module")
def batch(models, checkpoint_dir):
    """The chats through the chat template, left-padded; checked against transformers' tokenizer."""
    import transformers

    _, policy = models
    tok = policy.tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint_dir)
    prompts = [tok.encode(tok.apply_chat_template(c, add_generation_prompt=True)) for c in CHATS]
    for c, ids in zip(CHATS, prompts):
        assert ids == hf_tok.apply_chat_template(
            c, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    t = max(map(len, prompts))
    assert len(set(map(len, prompts))) == 3  # the batch really is ragged
    ids = np.full((len(prompts), t), tok.pad_id, np.int32)
    mask = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = p
        mask[i, t - len(p) :] = 1
    return prompts, ids, mask


def test_logits_match_transformers_on_left_padded_chats(models, batch):
    hf, policy = models
    _, ids, mask = batch
    ref = hf_logits(hf, ids, mask)
    ours, _ = apply(policy.graphdef, policy.params, ids, valid=mask.astype(bool))
    ours = np.asarray(ours)
    valid = mask.astype(bool)
    diff = np.abs(ours[valid] - ref[valid]).max()
    print(f"max |logit diff| over {valid.sum()} valid positions: {diff:.3g}")
    assert diff <= LOGIT_TOL
    # Same next-token argmax everywhere it matters.
    assert (ours[valid].argmax(-1) == ref[valid].argmax(-1)).all()


def test_greedy_generation_matches_transformers_token_for_token(models, batch):
    import torch

    hf, policy = models
    prompts, ids, mask = batch
    requests = [generate.Request(i + 1, "messages", c) for i, c in enumerate(CHATS)]
    opts = generate.GenerateOptions(greedy=True, max_new_tokens=NEW_TOKENS, batch_size=len(CHATS))
    records = generate.generate_records(policy, requests, opts)

    eos = list(policy.eos_ids)
    assert set(eos) == {151643, 151645}  # <|endoftext|> and <|im_end|>, as generation_config.json says
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=policy.tokenizer.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    t = ids.shape[1]
    for i, rec in enumerate(records):
        expect = out.sequences[i, t:].tolist()
        stops = [k for k, tok in enumerate(expect) if tok in eos]
        if stops:
            expect = expect[: stops[0] + 1]
        assert rec["prompt_tokens"] == len(prompts[i])
        assert rec["token_ids"] == expect, (i, policy.tokenizer.decode(rec["token_ids"]))
        ref_logp = [
            torch.log_softmax(out.scores[k][i].float(), -1)[tok].item() for k, tok in enumerate(expect)
        ]
        assert np.abs(np.asarray(rec["logprobs"]) - ref_logp).max() <= 1e-3
    print([r["text"] for r in records])
