"""Generate text, or run whole search episodes, from an HF checkpoint or a training workdir.

  python -m tspo_jax.generate --checkpoint=HF_OR_WORKDIR --prompts=IN.jsonl --out=OUT.jsonl \\
      [--greedy] [--max_new_tokens=256] [--temperature=1 --top_p=1 --top_k=0 --seed=0] \\
      [--retriever=URL_OR_INDEX_DIR --topk=3 --max_turns=4] [--batch_size=8]

Each input line is one JSON object with exactly one of
  {"prompt": "raw text"}                       encoded as is (no template, no special tokens added)
  {"messages": [{"role": ..., "content": ...}]} the tokenizer's chat template, generation prompt on
  {"question": "..."}                           a search episode (Search-R1 tags) with --retriever
and optionally an "id", echoed back. Each output line (same order) has `text`, `token_ids` (what
came after the prompt), `logprobs` (of those tokens under the sampling distribution) and `stop`.
Episode lines add `turns`, `answer`, `stop_reason` and `loss_mask`: their `token_ids` hold the
policy's tokens and the retrieved observations (loss_mask 0, logprob 0), as the trainer sees them.

Plain prompts are sorted by length and decoded in batches of --batch_size (the sampler pads to
its compile buckets); questions run as batches of episodes. With sampling on, a row's draw
depends on the batch it lands in, so --seed reproduces a whole file, not one line on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import jax
from absl import app, flags

from tspo_jax import rollout, sampling
from tspo_jax.model import params as params_lib
from tspo_jax.policy import saved_rollout
from tspo_jax.retrieval import make_retriever
from tspo_jax.runtime import Runtime
from tspo_jax.tokenizer import TokenizerError

log = logging.getLogger("tspo_jax.generate")

INPUT_KEYS = ("prompt", "messages", "question")


class GenerateError(ValueError):
    """Bad input to the generate command; the message names the problem and the fix."""


# --- input ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Request:
    line: int  # 1-based line number in the input file
    kind: str  # one of INPUT_KEYS
    value: Any  # the prompt text, the message list or the question
    id: Any = None


def read_requests(path: str) -> list[Request]:
    """Parses the input JSONL; blank lines are skipped, anything else must be a valid request."""
    if not os.path.isfile(path):
        raise GenerateError(f"--prompts file {path!r} does not exist (one JSON object per line)")
    requests = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerateError(f"{where} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise GenerateError(f"{where} must be a JSON object, got {type(obj).__name__}")
            kinds = [k for k in INPUT_KEYS if k in obj]
            if len(kinds) != 1:
                raise GenerateError(
                    f"{where} needs exactly one of the keys {list(INPUT_KEYS)}, got keys {sorted(obj)}"
                )
            kind = kinds[0]
            value = obj[kind]
            if kind in ("prompt", "question") and (not isinstance(value, str) or not value.strip()):
                raise GenerateError(f"{where}: {kind!r} must be a non-empty string, got {value!r}")
            if kind == "messages" and (not isinstance(value, list) or not value):
                raise GenerateError(
                    f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects"
                )
            requests.append(Request(line_no, kind, value, obj.get("id")))
    if not requests:
        raise GenerateError(f"--prompts file {path!r} has no requests")
    return requests


# --- the policy -------------------------------------------------------------------------------------
def load_policy(checkpoint: str, *, tokenizer_dir: str | None = None, dtype: str = "float32") -> Runtime:
    """An HF checkpoint directory (config.json + safetensors) or a tspo_jax training workdir
    (policy_config.json + checkpoints/), on the default device."""
    try:
        return Runtime.for_inference(checkpoint, tokenizer_dir=tokenizer_dir, dtype=dtype)
    except FileNotFoundError as e:
        raise GenerateError(f"--checkpoint: {e}") from None
    except ValueError as e:
        if isinstance(e, (params_lib.CheckpointError, TokenizerError)):
            raise
        raise GenerateError(f"--checkpoint: {e}") from None


# --- generation -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 256  # per request; per turn for episodes
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 8
    docs_per_search: int = 3  # documents per search (the --topk flag)
    max_turns: int = 4
    max_obs_length: int = 500
    template: str | None = None  # episode prompt template (contains {question}); None: the default
    chat_template: bool = True  # wrap episode prompts in the tokenizer's chat template

    def __post_init__(self):
        for name, flag in (("max_new_tokens", "max_new_tokens"), ("batch_size", "batch_size"),
                           ("docs_per_search", "topk"), ("max_obs_length", "max_obs_length")):
            if getattr(self, name) < 1:
                raise GenerateError(f"--{flag} must be at least 1, got {getattr(self, name)}")
        if self.max_turns < 0:
            raise GenerateError(f"--max_turns must be >= 0, got {self.max_turns}")
        try:
            self.sampling_params
        except ValueError as e:
            raise GenerateError(str(e)) from None

    @property
    def sampling_params(self) -> sampling.SamplingParams:
        return sampling.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, greedy=self.greedy
        )

    def rollout_config(self) -> rollout.RolloutConfig:
        extra = {"template": self.template} if self.template is not None else {}
        return rollout.RolloutConfig(
            max_turns=self.max_turns,
            max_response_length=self.max_new_tokens,
            max_obs_length=self.max_obs_length,
            docs_per_search=self.docs_per_search,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            greedy=self.greedy,
            use_chat_template=self.chat_template,
            **extra,
        )


def _prompt_ids(policy: Runtime, req: Request) -> list[int]:
    tok = policy.tokenizer
    where = f"line {req.line}"
    if req.kind == "prompt":
        ids = tok.encode(req.value)
    else:
        try:
            ids = tok.encode(tok.apply_chat_template(req.value, add_generation_prompt=True))
        except TokenizerError as e:
            raise GenerateError(f"{where}: {e}") from None
    if not ids:
        raise GenerateError(f"{where}: the prompt encodes to no tokens")
    return ids


def _text_record(policy: Runtime, req: Request, prompt_len: int, result: dict) -> dict:
    ids = result["token_ids"]
    # The EOS token that ended a row is in token_ids but not in the text.
    shown = ids[:-1] if result["stop"] == "eos" else ids
    return {
        "kind": req.kind,
        "text": policy.tokenizer.decode(shown),
        "token_ids": ids,
        "logprobs": result["logprobs"],
        "stop": result["stop"],
        "stop_string": result["stop_string"],
        "prompt_tokens": prompt_len,
    }


def _episode_record(ep: rollout.Episode) -> dict:
    p = ep.prompt_len
    return {
        "kind": "question",
        "text": ep.response_text,
        "token_ids": ep.tokens[p:],
        "logprobs": ep.logprobs[p:],
        "loss_mask": ep.loss_mask[p:],
        "stop": ep.turns[-1].stop if ep.turns else "",
        "prompt_tokens": p,
        "turns": [
            {
                "action": t.action,
                "text": t.text,
                "query": t.query,
                "doc_ids": [d.id for d in t.docs],
                "observation": t.observation,
                "stop": t.stop,
            }
            for t in ep.turns
        ],
        "answer": ep.answer,
        "stop_reason": ep.stop_reason,
    }


def _chunks(items: Sequence, size: int):
    for s in range(0, len(items), size):
        yield s // size, items[s : s + size]


def generate_records(
    policy: Runtime, requests: Sequence[Request], options: GenerateOptions, retriever=None
) -> list[dict]:
    """One output record per request, in request order."""
    texts = [r for r in requests if r.kind != "question"]
    questions = [r for r in requests if r.kind == "question"]
    if questions and retriever is None:
        raise GenerateError(
            f"line {questions[0].line} asks a question (a search episode) but no --retriever was given: "
            "pass an index directory or a retrieval server URL"
        )
    tok, cfg = policy.tokenizer, policy.model_cfg
    key = jax.random.key(options.seed)
    records: dict[int, dict] = {}

    if texts:
        prompts = {r.line: _prompt_ids(policy, r) for r in texts}
        for r in texts:
            need = len(prompts[r.line]) + options.max_new_tokens
            if need > cfg.max_position_embeddings:
                raise GenerateError(
                    f"line {r.line}: {len(prompts[r.line])} prompt tokens + --max_new_tokens="
                    f"{options.max_new_tokens} exceed the model's {cfg.max_position_embeddings} positions"
                )
        smp = policy.text_sampler()
        # Similar lengths share a batch, so little of each batch is padding.
        by_length = sorted(texts, key=lambda r: len(prompts[r.line]))
        for b, chunk in _chunks(by_length, options.batch_size):
            results = smp.generate(
                policy.params,
                [prompts[r.line] for r in chunk],
                max_new_tokens=options.max_new_tokens,
                sampling=options.sampling_params,
                rng=jax.random.fold_in(key, b),
            )
            for r, res in zip(chunk, results):
                records[r.line] = _text_record(policy, r, len(prompts[r.line]), res)

    if questions:
        smp = policy.sampler
        try:
            rollout_cfg = options.rollout_config()
        except ValueError as e:
            raise GenerateError(str(e)) from None
        runner = rollout.EpisodeRunner(smp, tok, retriever, rollout_cfg)
        episode_key = jax.random.fold_in(key, 1 << 20)  # apart from the text batches' keys
        for b, chunk in _chunks(questions, options.batch_size):
            episodes = runner.run(
                policy.params,
                [r.value for r in chunk],
                [str(r.line) for r in chunk],
                rng=jax.random.fold_in(episode_key, b),
            )
            for r, ep in zip(chunk, episodes):
                records[r.line] = _episode_record(ep)

    out = []
    for r in requests:
        rec = records[r.line]
        if r.id is not None:
            rec = {"id": r.id, **rec}
        out.append(rec)
    return out


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    """All lines or none: written beside the target, then renamed over it."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(
    checkpoint: str,
    prompts: str,
    out: str,
    options: GenerateOptions = GenerateOptions(),
    *,
    retriever: str | None = None,
    tokenizer_dir: str | None = None,
    dtype: str = "float32",
) -> list[dict]:
    """The whole command: read, load, generate, write. Returns the records it wrote."""
    requests = read_requests(prompts)  # fail on bad input before the slow model load
    needs_retriever = any(r.kind == "question" for r in requests)
    if needs_retriever and not retriever:
        line = next(r.line for r in requests if r.kind == "question")
        raise GenerateError(
            f"{prompts}:{line} asks a question (a search episode) but no --retriever was given: pass an "
            "index directory (python -m tspo_jax.retrieval.build_index) or a retrieval server URL"
        )
    template = None
    if options.template is not None:
        if not os.path.isfile(options.template):
            raise GenerateError(f"--template file {options.template!r} does not exist")
        with open(options.template, encoding="utf-8") as f:
            template = f.read()
        options = dataclasses.replace(options, template=template)

    t0 = time.perf_counter()
    policy = load_policy(checkpoint, tokenizer_dir=tokenizer_dir, dtype=dtype)
    log.info("loaded %s (%s) in %.1fs", checkpoint, policy.source, time.perf_counter() - t0)
    saved = saved_rollout(os.path.expanduser(checkpoint)) if policy.source.startswith("workdir") else None
    if template is None and saved and "template" in saved:
        # Episodes are prompted the way the workdir's policy was trained.
        options = dataclasses.replace(
            options, template=saved["template"], chat_template=saved.get("use_chat_template", True))
    ret = None
    if needs_retriever:
        try:
            ret = make_retriever(retriever)
        except ValueError as e:
            raise GenerateError(f"--retriever: {e}") from None
    try:
        t0 = time.perf_counter()
        records = generate_records(policy, requests, options, ret)
        log.info("generated %d records in %.1fs", len(records), time.perf_counter() - t0)
    finally:
        if ret is not None:
            ret.close()
    write_jsonl(out, records)
    return records


# --- command line -----------------------------------------------------------------------------------
def define_flags(fv: flags.FlagValues) -> None:
    d = GenerateOptions()
    flags.DEFINE_string("checkpoint", None, "HF checkpoint dir or tspo_jax training workdir", flag_values=fv)
    flags.DEFINE_string("prompts", None, "input JSONL: prompt / messages / question per line", flag_values=fv)
    flags.DEFINE_string("out", None, "output JSONL, one line per input line", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer dir (default: the checkpoint's)", flag_values=fv)
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "parameter and compute dtype", flag_values=fv
    )
    flags.DEFINE_bool("greedy", d.greedy, "argmax decoding", flag_values=fv)
    flags.DEFINE_integer(
        "max_new_tokens", d.max_new_tokens, "tokens per request (per turn for episodes)", flag_values=fv
    )
    flags.DEFINE_float("temperature", d.temperature, "sampling temperature", flag_values=fv)
    flags.DEFINE_float("top_p", d.top_p, "nucleus mass (1: off)", flag_values=fv)
    flags.DEFINE_integer("top_k", d.top_k, "sample from the k best (0: off)", flag_values=fv)
    flags.DEFINE_integer("seed", d.seed, "sampling seed", flag_values=fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "requests decoded together", flag_values=fv)
    flags.DEFINE_string("retriever", None, "index dir or http(s) URL, for question lines", flag_values=fv)
    flags.DEFINE_integer("topk", d.docs_per_search, "documents per search", flag_values=fv)
    flags.DEFINE_integer(
        "max_turns", d.max_turns, "turns that may search (then one final turn)", flag_values=fv
    )
    flags.DEFINE_integer("max_obs_length", d.max_obs_length, "observation tokens per search", flag_values=fv)
    flags.DEFINE_string(
        "template", None, "file with the episode prompt template ({question})", flag_values=fv
    )
    flags.DEFINE_bool(
        "chat_template", d.chat_template, "wrap episode prompts in the chat template", flag_values=fv
    )


def run_from_flags(fv: flags.FlagValues) -> list[dict]:
    missing = [n for n in ("checkpoint", "prompts", "out") if not fv[n].value]
    if missing:
        raise GenerateError(f"missing required flag(s): {', '.join('--' + n for n in missing)}")
    options = GenerateOptions(
        max_new_tokens=fv.max_new_tokens,
        greedy=fv.greedy,
        temperature=fv.temperature,
        top_p=fv.top_p,
        top_k=fv.top_k,
        seed=fv.seed,
        batch_size=fv.batch_size,
        docs_per_search=fv.topk,
        max_turns=fv.max_turns,
        max_obs_length=fv.max_obs_length,
        template=fv.template,
        chat_template=fv.chat_template,
    )
    return run(
        fv.checkpoint,
        fv.prompts,
        fv.out,
        options,
        retriever=fv.retriever,
        tokenizer_dir=fv.tokenizer,
        dtype=fv.dtype,
    )


def cli(argv: Sequence[str]) -> list[dict]:
    """Parses `argv` (argv[0] is the program name) into fresh flags and runs; for tests and scripts."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv(list(argv))
    return run_from_flags(fv)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        records = run_from_flags(flags.FLAGS)
    except (GenerateError, TokenizerError, params_lib.CheckpointError) as e:
        print(f"generate: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {len(records)} lines to {flags.FLAGS.out}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
