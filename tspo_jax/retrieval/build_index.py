"""Corpus JSONL -> passage embeddings -> exact or ScaNN index directory.

    python -m tspo_jax.retrieval.build_index --corpus=wiki-18.jsonl --out=index/ \\
        [--encoder=DIR] [--mode=auto|scann|exact] [--batch_size=64] [--query_prefix= --passage_prefix=]

e5-style encoders want --query_prefix="query: " --passage_prefix="passage: "; MiniLM wants none.
"""

from __future__ import annotations

import argparse
import array
import itertools
import json
import os
import time

import numpy as np
from tqdm import tqdm

from tspo_jax.model import encoder as encoder_lib
from tspo_jax.retrieval import corpus as corpus_lib
from tspo_jax.retrieval import index as index_lib


def build_index(
    corpus: str,
    out: str,
    *,
    encoder: str | None = None,
    mode: str = "auto",
    batch_size: int = 64,
    query_prefix: str = "",
    passage_prefix: str = "",
    max_length: int | None = None,
    overwrite: bool = False,
    chunk_size: int = 4096,
    progress: bool = True,
) -> index_lib.IndexManifest:
    """Embeds every passage of `corpus` and writes a searchable index to `out`; returns its manifest."""
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"Output directory {out!r} is not empty; pick a new --out or pass overwrite=True.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    corpus = os.path.abspath(corpus)
    # Pass 1: validate every line and record where it lives, holding no text.
    flat = array.array("q")  # compact even for 21M passages
    for offset, length, _ in corpus_lib.iter_passages(corpus):
        flat.extend((offset, length))
    offsets = np.frombuffer(flat, np.int64).reshape(-1, 2).copy()
    count = len(offsets)
    if count == 0:
        raise ValueError(f"Corpus {corpus!r} has no passages.")
    mode = index_lib.resolve_mode(mode, count)
    if mode == "scann":
        index_lib.scann_params_for(count)  # fail before the slow encoding if the corpus is too small

    model, tokenizer, cfg = encoder_lib.load_encoder(encoder, max_length=max_length)
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, index_lib.MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an index without a manifest reads as unfinished
    np.save(os.path.join(out, index_lib.OFFSETS), offsets)

    # Pass 2: stream passages in chunks into an on-disk [count, dim] array.
    emb_path = os.path.join(out, index_lib.EMBEDDINGS)
    embeddings = np.lib.format.open_memmap(
        emb_path, mode="w+", dtype=np.float32, shape=(count, cfg.hidden_size)
    )
    t0 = time.perf_counter()
    rows = (row["contents"] for _, _, row in corpus_lib.iter_passages(corpus))
    with tqdm(total=count, desc="embed passages", unit="passage", disable=not progress) as bar:
        done = 0
        while chunk := list(itertools.islice(rows, chunk_size)):
            embeddings[done : done + len(chunk)] = encoder_lib.encode(
                model, tokenizer, chunk, batch_size=batch_size, prefix=passage_prefix
            )
            done += len(chunk)
            bar.update(len(chunk))
    embeddings.flush()
    encode_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    scann_params = None
    if mode == "scann":
        vectors = index_lib.ScannIndex.build(np.asarray(embeddings))
        vectors.save(out)
        scann_params = vectors.params
        del embeddings
        os.remove(emb_path)  # ScaNN keeps its own copy of the vectors for re-scoring
    # exact mode: embeddings.npy, already on disk, is the whole index.
    index_s = time.perf_counter() - t0

    manifest = index_lib.IndexManifest(
        encoder=os.path.abspath(encoder) if encoder else index_lib.DEFAULT_ENCODER,
        query_prefix=query_prefix,
        passage_prefix=passage_prefix,
        max_length=cfg.max_length,
        pooling=cfg.pooling,
        dim=cfg.hidden_size,
        count=count,
        mode=mode,
        corpus=corpus,
        corpus_bytes=os.path.getsize(corpus),
        scann=scann_params,
    )
    manifest.save(out)  # written last: its presence marks a complete index
    if progress:
        print(
            f"indexed {count} passages in {encode_s:.1f}s encode ({count / encode_s:.1f} passages/s) "
            f"+ {index_s:.1f}s {mode} index -> {out}",
            flush=True,
        )
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help='JSONL, one {"id", "contents": "Title\\ntext"} per line')
    p.add_argument("--out", required=True, help="index directory to create")
    p.add_argument(
        "--encoder", default=None, help="HF BERT checkpoint dir (default: packaged all-MiniLM-L6-v2)"
    )
    p.add_argument(
        "--mode",
        default="auto",
        choices=["auto", *index_lib.MODES],
        help=f"auto = exact up to {index_lib.AUTO_EXACT_MAX} passages, else scann",
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=None, help="tokens per passage (default 256)")
    p.add_argument("--query_prefix", default="")
    p.add_argument("--passage_prefix", default="")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty --out directory")
    args = p.parse_args(argv)
    manifest = build_index(
        args.corpus,
        args.out,
        encoder=args.encoder,
        mode=args.mode,
        batch_size=args.batch_size,
        query_prefix=args.query_prefix,
        passage_prefix=args.passage_prefix,
        max_length=args.max_length,
        overwrite=args.overwrite,
    )
    print(json.dumps({"out": args.out, "count": manifest.count, "dim": manifest.dim, "mode": manifest.mode}))


if __name__ == "__main__":
    main()
