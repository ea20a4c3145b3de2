"""The generate command line on tiny checkpoints: output records against transformers' generate,
search episodes through a real index, the training-workdir path, and its error messages."""

import json

import jax
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import random_hf_model, tiny_hf_config
from scripted_model import scripted_model, successor_map
from tspo_jax import generate, rollout
from tspo_jax.checkpointing import Checkpointer
from tspo_jax.demo_task import demo_paths
from tspo_jax.model import params as params_lib
from tspo_jax.policy import params_of, save_policy_config, save_run_config
from tspo_jax.retrieval.build_index import build_index
from tspo_jax.retrieval.local import LocalRetriever
from tspo_jax.tokenizer import load_tokenizer

TOK_DIR = str(demo_paths()["tokenizer"])
PROMPT = "Hoser Seni is a painter. Hoser Seni was born in"
LONG_PROMPT = "Dodoles is a city in Lesador. It lies on a wide river. " * 3
MESSAGES = [{"role": "user", "content": "In which city was Debal Tibur born?"}]
QUESTION = "In which city was Dreror Tibur born?"
NEW = 12


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory, tok):
    """A random Qwen2 whose vocabulary is the demo tokenizer's, saved as an HF directory."""
    cfg = tiny_hf_config(
        tie=False, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id
    )
    hf = random_hf_model(cfg, seed=3)
    d = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(d)
    params_lib.copy_tokenizer_files(TOK_DIR, d)
    return d, hf


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(open(demo_paths()["corpus"]).readlines()[:40]))
    build_index(str(corpus), str(d / "index"), mode="exact", progress=False)
    return str(d / "index")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _hf_greedy(hf, ids, eos_id, n=NEW):
    """transformers' greedy continuation of one prompt and the log-softmax of its scores."""
    out = hf.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    gen = out.sequences[0, len(ids) :].tolist()
    logp = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, gen)]
    return gen, np.asarray(logp)


def test_mixed_file_matches_transformers_greedy(hf_ckpt, index_dir, tok, tmp_path):
    ckpt, hf = hf_ckpt
    rows = [
        {"prompt": PROMPT, "id": "p"},
        {"messages": MESSAGES},
        "",  # blank lines are skipped
        {"question": QUESTION, "id": 7},
        {"prompt": LONG_PROMPT},
    ]
    out = tmp_path / "out.jsonl"
    argv = [
        "generate",
        f"--checkpoint={ckpt}",
        f"--prompts={_write_jsonl(tmp_path / 'in.jsonl', rows)}",
        f"--out={out}",
        "--greedy",
        f"--max_new_tokens={NEW}",
        "--batch_size=2",  # three text batches' worth: ordering across batches is exercised
        f"--retriever={index_dir}",
        "--max_turns=0",  # one final turn: multi-turn episodes are test_question_runs_a_search_episode's
        "--topk=2",
    ]
    returned = generate.cli(argv)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == json.loads(json.dumps(returned))
    assert [r["kind"] for r in written] == ["prompt", "messages", "question", "prompt"]
    assert written[0]["id"] == "p" and written[2]["id"] == 7 and "id" not in written[1]

    # An independent reference for the prompt ids: transformers' tokenizer on the same files.
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    prompt_ids = {
        0: hf_tok(PROMPT, add_special_tokens=False)["input_ids"],
        1: hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False),
        3: hf_tok(LONG_PROMPT, add_special_tokens=False)["input_ids"],
    }
    for i, ids in prompt_ids.items():
        rec = written[i]
        assert rec["prompt_tokens"] == len(ids)
        expect, expect_logp = _hf_greedy(hf, ids, tok.eos_id)
        assert rec["token_ids"] == expect, i
        assert rec["stop"] == ("eos" if expect[-1] == tok.eos_id else "length")
        lp = np.asarray(rec["logprobs"])
        assert lp.shape == (len(expect),) and (lp <= 0).all()
        assert np.abs(lp - expect_logp).max() <= 1e-4
        shown = expect[:-1] if rec["stop"] == "eos" else expect
        assert rec["text"] == tok.decode(shown)

    # The question's episode: structure only (a random model rarely emits a valid action).
    ep = written[2]
    assert set(ep) >= {"text", "token_ids", "logprobs", "stop", "turns", "answer", "stop_reason", "loss_mask"}
    n = len(ep["token_ids"])
    assert len(ep["logprobs"]) == len(ep["loss_mask"]) == n > 0
    assert all(lp <= 0 for lp in ep["logprobs"])
    assert all(lp == 0 for lp, m in zip(ep["logprobs"], ep["loss_mask"]) if not m)
    assert len(ep["turns"]) == 1 and ep["turns"][0]["observation"] is None
    assert ep["text"] == "".join(t["text"] + (t["observation"] or "") for t in ep["turns"])
    assert ep["stop_reason"] in ("answer", "max_turns", "context")
    for t in ep["turns"]:
        assert t["action"] in ("answer", "invalid", "search_disabled")
        assert t["stop"] in ("eos", "stop_string", "length", "context")


@pytest.fixture(scope="module")
def scripted_ckpt(tmp_path_factory, tok):
    """A Qwen2 whose greedy policy searches "Dravel", then answers: exported as an HF directory."""
    prompt = rollout.build_prompt(tok, QUESTION, rollout.RolloutConfig())
    obs_end = rollout.observation_ids(tok, "x", 64)[-1]
    chains = [
        [prompt[-1]] + tok.encode("<think>find</think><search>Dravel</search>"),
        [obs_end] + tok.encode("<answer>Oskaria</answer>") + [tok.eos_id],
    ]
    model = scripted_model(tok.vocab_size, successor_map(chains), seed=1)
    d = str(tmp_path_factory.mktemp("scripted"))
    params_lib.export_hf_checkpoint(model, d, tokenizer_dir=TOK_DIR)
    return d


def test_question_runs_a_search_episode(scripted_ckpt, index_dir, tok, tmp_path):
    out = tmp_path / "out.jsonl"
    src = _write_jsonl(tmp_path / "in.jsonl", [{"question": QUESTION}])
    opts = generate.GenerateOptions(greedy=True, max_new_tokens=24, max_turns=2, docs_per_search=3, max_obs_length=128)
    (ep,) = generate.run(scripted_ckpt, src, str(out), opts, retriever=index_dir)
    assert [t["action"] for t in ep["turns"]] == ["search", "answer"]
    assert ep["turns"][0]["query"] == "Dravel" and ep["turns"][0]["stop"] == "stop_string"
    with LocalRetriever(index_dir) as r:
        docs = r.search(["Dravel"], 3)[0]
    assert ep["turns"][0]["doc_ids"] == [d.id for d in docs]
    assert ep["turns"][0]["observation"].startswith("\n\n<information>Doc 1(Title: " + docs[0].title)
    assert ep["answer"] == "Oskaria" and ep["stop_reason"] == "answer"
    # Token layout: policy tokens, the observation (loss_mask 0), policy tokens.
    search_ids = tok.encode("<think>find</think><search>Dravel</search>")
    answer_ids = tok.encode("<answer>Oskaria</answer>")
    obs_len = len(ep["token_ids"]) - len(search_ids) - len(answer_ids)
    assert ep["loss_mask"] == [1] * len(search_ids) + [0] * obs_len + [1] * len(answer_ids)
    assert (
        ep["token_ids"][: len(search_ids)] == search_ids and ep["token_ids"][-len(answer_ids) :] == answer_ids
    )
    assert tok.decode(ep["token_ids"][len(search_ids) : -len(answer_ids)]) == ep["turns"][0]["observation"]


def _perturbed(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def test_training_workdir_restores_the_latest_params(hf_ckpt, tmp_path):
    ckpt, hf = hf_ckpt
    model = params_lib.load_hf_checkpoint(ckpt)
    params = params_of(model)
    workdir = tmp_path / "run"
    workdir.mkdir()
    save_policy_config(str(workdir), model, ckpt)
    tx = optax.adamw(1e-3)
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    for step, p in ((1, _perturbed(params, 0)), (2, params)):  # the latest step holds the HF weights
        checkpointer.save(
            step,
            {"params": p, "opt_state": tx.init(p), "step": jax.numpy.int32(step)},
            {"data": {}},
            force=True,
        )
    checkpointer.close()

    policy = generate.load_policy(str(workdir))
    assert policy.source == "workdir@2"
    got, want = jax.tree.leaves(policy.params), jax.tree.leaves(params)
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert nnx.graphdef(model) == policy.graphdef

    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": PROMPT}])
    opts = generate.GenerateOptions(greedy=True, max_new_tokens=NEW)
    (rec,) = generate.run(str(workdir), src, str(tmp_path / "out.jsonl"), opts)
    assert rec["token_ids"] == _hf_greedy(hf, policy.tokenizer.encode(PROMPT), policy.tokenizer.eos_id)[0]


def test_questions_to_a_workdir_use_its_saved_prompt_template(hf_ckpt, index_dir, tmp_path):
    ckpt, _ = hf_ckpt
    model = params_lib.load_hf_checkpoint(ckpt)
    workdir = tmp_path / "run"
    workdir.mkdir()
    save_policy_config(str(workdir), model, ckpt)
    template = "Find out with search. Q: {question}\n"
    run_cfg = ml_collections.ConfigDict({"rollout": {"template": template, "use_chat_template": False}})
    save_run_config(str(workdir), run_cfg)
    checkpointer = Checkpointer(str(workdir / "checkpoints"))
    p = params_of(model)
    state = {"params": p, "opt_state": optax.adamw(1e-3).init(p), "step": jax.numpy.int32(1)}
    checkpointer.save(1, state, {"data": {}}, force=True)
    checkpointer.close()
    src = _write_jsonl(tmp_path / "in.jsonl", [{"question": QUESTION}])
    opts = generate.GenerateOptions(greedy=True, max_new_tokens=4, max_turns=0)
    (ep,) = generate.run(str(workdir), src, str(tmp_path / "out.jsonl"), opts, retriever=index_dir)
    tok = generate.load_policy(str(workdir)).tokenizer
    assert ep["prompt_tokens"] == len(tok.encode(template.format(question=QUESTION)))


@pytest.mark.parametrize(
    "rows,match",
    [
        (['{"prompt": "a"}', '{"prompt": "b",}'], r"in\.jsonl:2 is not valid JSON"),
        (['{"prompt": "a"}', '{"text": "b"}'], r"in\.jsonl:2 needs exactly one of the keys"),
        (['{"prompt": "a", "question": "b"}'], r"in\.jsonl:1 needs exactly one of the keys"),
        (['["prompt"]'], "must be a JSON object"),
        (['{"prompt": ""}'], "'prompt' must be a non-empty string"),
        (['{"messages": "hi"}'], "'messages' must be a non-empty list"),
        (['{"prompt": "a"}', '{"question": "who?"}'], r"in\.jsonl:2 asks a question .* no --retriever"),
        ([""], "has no requests"),
    ],
)
def test_bad_input_lines_are_named(rows, match, tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(generate.GenerateError, match=match):
        generate.run(str(tmp_path), src, str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_checkpoint_and_files(hf_ckpt, tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}])
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(generate.GenerateError, match="does not exist"):
        generate.run(hf_ckpt[0], str(tmp_path / "missing.jsonl"), out)
    with pytest.raises(
        generate.GenerateError, match="neither an HF checkpoint .* nor a tspo_jax training workdir"
    ):
        generate.run(str(tmp_path), src, out)
    with pytest.raises(generate.GenerateError, match="is not a directory"):
        generate.run(str(tmp_path / "nowhere"), src, out)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "policy_config.json").write_text(
        json.dumps({"hf_config": json.load(open(f"{hf_ckpt[0]}/config.json")), "tokenizer": TOK_DIR})
    )
    with pytest.raises(generate.GenerateError, match="no checkpoints/ directory yet"):
        generate.run(str(workdir), src, out)
    (workdir / "checkpoints").mkdir()
    with pytest.raises(generate.GenerateError, match="no finished checkpoint step"):
        generate.run(str(workdir), src, out)
    # --tokenizer overrides the checkpoint's: here one without a chat template, for a messages line.
    plain_tok = tmp_path / "plain_tok"
    plain_tok.mkdir()
    (plain_tok / "tokenizer.json").write_text(open(f"{TOK_DIR}/tokenizer.json").read())
    config = json.load(open(f"{TOK_DIR}/tokenizer_config.json"))
    config.pop("chat_template")
    (plain_tok / "tokenizer_config.json").write_text(json.dumps(config))
    chat = _write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a"}, {"messages": MESSAGES}])
    with pytest.raises(generate.GenerateError, match="line 2: this tokenizer has no chat template"):
        generate.run(hf_ckpt[0], chat, out, tokenizer_dir=str(plain_tok))
    with pytest.raises(generate.GenerateError, match="--batch_size must be at least 1"):
        generate.GenerateOptions(batch_size=0)
    with pytest.raises(generate.GenerateError, match="temperature must be > 0"):
        generate.GenerateOptions(temperature=0.0)
    with pytest.raises(generate.GenerateError, match="missing required flag"):
        generate.cli(["generate", f"--prompts={src}"])
