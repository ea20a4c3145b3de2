"""In-process retriever: the index directory's encoder, vector index and corpus in this Python process."""

from __future__ import annotations

import os

from tspo_jax.model import encoder as encoder_lib
from tspo_jax.retrieval import index as index_lib
from tspo_jax.retrieval.base import Doc, Retriever, check_request
from tspo_jax.retrieval.corpus import Corpus


class LocalRetriever(Retriever):
    """Loads an index built by build_index; `corpus_path`/`encoder_path` override moved files."""

    def __init__(
        self,
        index_dir: str,
        *,
        corpus_path: str | None = None,
        encoder_path: str | None = None,
        batch_size: int = 64,
    ):
        self.index_dir = str(index_dir)
        self.manifest = m = index_lib.IndexManifest.load(self.index_dir)
        corpus_path = corpus_path or m.corpus
        if not os.path.isfile(corpus_path):
            raise ValueError(
                f"Corpus {corpus_path!r} named by {self.index_dir}/{index_lib.MANIFEST} does not exist; "
                "pass corpus_path= (server: --corpus=) with the JSONL the index was built from."
            )
        if os.path.getsize(corpus_path) != m.corpus_bytes:
            raise ValueError(
                f"Corpus {corpus_path!r} has {os.path.getsize(corpus_path)} bytes but the index was "
                f"built from {m.corpus_bytes}; it is a different file. Rebuild the index."
            )
        self.corpus = Corpus(corpus_path, index_lib.load_offsets(self.index_dir, m.count))
        self.vectors = index_lib.load_vector_index(self.index_dir, m)
        path = encoder_path or (None if m.encoder == index_lib.DEFAULT_ENCODER else m.encoder)
        self.encoder, self.tokenizer, cfg = encoder_lib.load_encoder(
            path, max_length=m.max_length, pooling=m.pooling
        )
        if cfg.hidden_size != m.dim:
            raise ValueError(
                f"Encoder {path or 'default'} gives {cfg.hidden_size}-d vectors but the index holds "
                f"{m.dim}-d ones; use the encoder the index was built with."
            )
        self.batch_size = batch_size

    @property
    def count(self) -> int:
        return self.manifest.count

    def search_rows(self, queries: list[str], topk: int) -> list[list[tuple[dict, float]]]:
        """Top-k (corpus row as stored, score) pairs per query: what the HTTP server sends on."""
        check_request(queries, topk, self.count)
        emb = encoder_lib.encode(
            self.encoder,
            self.tokenizer,
            list(queries),
            batch_size=self.batch_size,
            prefix=self.manifest.query_prefix,
        )
        ids, scores = self.vectors.search(emb, topk)
        return [
            [(self._row(int(i)), float(s)) for i, s in zip(id_row, score_row)]
            for id_row, score_row in zip(ids, scores)
        ]

    def _row(self, i: int) -> dict:
        row = self.corpus[i]
        row.setdefault("id", str(i))  # wiki-18 always has ids; others get their line position
        return row

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        return [
            [Doc.from_contents(row["id"], row["contents"], score) for row, score in hits]
            for hits in self.search_rows(queries, topk)
        ]

    def close(self) -> None:
        self.corpus.close()
