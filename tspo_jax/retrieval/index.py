"""Inner-product top-k over passage embeddings: exact (NumPy matmul) or ScaNN, saved in an index directory.

An index directory holds:
  manifest.json   IndexManifest: encoder, prefixes, dim, count, mode, corpus path, ScaNN parameters
  offsets.npy     int64 [count, 2]: (byte offset, byte length) of each passage line in the corpus JSONL
  embeddings.npy  float32 [count, dim] (exact mode)
  scann/          the serialised ScaNN searcher (scann mode)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

MANIFEST = "manifest.json"
OFFSETS = "offsets.npy"
EMBEDDINGS = "embeddings.npy"
SCANN_DIR = "scann"
FORMAT_VERSION = 1
MODES = ("exact", "scann")
MIN_SCANN_POINTS = 256  # below this the k-means tree and the AH codebooks have too little to train on
DEFAULT_ENCODER = "default"  # manifest value for the packaged all-MiniLM-L6-v2
MIN_SCANNED = 4096  # candidate points a query scores, at least
AUTO_EXACT_MAX = 20_000  # mode "auto": brute force is fast enough up to here


@dataclasses.dataclass(frozen=True)
class IndexManifest:
    encoder: str  # checkpoint directory, or DEFAULT_ENCODER
    query_prefix: str
    passage_prefix: str
    max_length: int
    pooling: str
    dim: int
    count: int
    mode: str
    corpus: str  # absolute path of the JSONL the offsets point into
    corpus_bytes: int
    scann: dict | None = None
    format_version: int = FORMAT_VERSION

    def save(self, index_dir: str) -> None:
        with open(os.path.join(index_dir, MANIFEST), "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def load(cls, index_dir: str) -> IndexManifest:
        if not os.path.isdir(index_dir):
            raise ValueError(
                f"Index directory {index_dir!r} does not exist; build one with "
                "`python -m tspo_jax.retrieval.build_index --corpus=FILE.jsonl --out=DIR`."
            )
        path = os.path.join(index_dir, MANIFEST)
        if not os.path.isfile(path):
            raise ValueError(
                f"{index_dir!r} has no {MANIFEST}; it is not a finished index. Rebuild it with "
                "`python -m tspo_jax.retrieval.build_index`."
            )
        with open(path) as f:
            raw = json.load(f)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format_version {raw.get('format_version')}, this code reads "
                f"{FORMAT_VERSION}; rebuild the index."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def _check_queries(queries: np.ndarray, dim: int, k: int, count: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"query embeddings must be [Q, {dim}], got shape {queries.shape}.")
    if not 0 < k <= count:
        raise ValueError(f"k must be in [1, {count}] (the index size), got {k}.")
    return queries


def _rank(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the k best of each row, best first; equal scores go to the lower id (duplicate
    passages are common in wiki dumps, and results must not depend on block boundaries)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores, top_ids = np.take_along_axis(scores, part, 1), np.take_along_axis(ids, part, 1)
        kth = top_scores.min(axis=1, keepdims=True)
        # argpartition cuts ties arbitrarily; redo the (rare) rows where ties straddle the cut.
        for r in np.flatnonzero((scores >= kth).sum(axis=1) > k):
            cols = np.flatnonzero(scores[r] >= kth[r])
            keep = cols[np.lexsort((ids[r, cols], -scores[r, cols]))[:k]]
            top_scores[r], top_ids[r] = scores[r, keep], ids[r, keep]
        scores, ids = top_scores, top_ids
    order = np.lexsort((ids, -scores), axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


class ExactIndex:
    """Brute-force inner product over [query_block x block] score tiles (<= 64 MiB at the defaults)."""

    mode = "exact"

    def __init__(self, embeddings: np.ndarray, block: int = 65_536, query_block: int = 256):
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, dim] array, got shape {embeddings.shape}.")
        self.embeddings, self.block, self.query_block = embeddings, block, query_block

    @property
    def count(self) -> int:
        return self.embeddings.shape[0]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids (int64) and inner-product scores (float32) per query, best first."""
        queries = _check_queries(queries, self.embeddings.shape[1], k, self.count)
        results = [
            self._search(queries[i : i + self.query_block], k)
            for i in range(0, len(queries), self.query_block)
        ]
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        best_ids = np.zeros((len(queries), 0), np.int64)
        best_scores = np.zeros((len(queries), 0), np.float32)
        for start in range(0, self.count, self.block):
            block = np.asarray(self.embeddings[start : start + self.block], np.float32)
            scores = queries @ block.T
            ids = np.broadcast_to(np.arange(start, start + len(block), dtype=np.int64), scores.shape)
            best_ids, best_scores = _rank(
                np.concatenate([best_scores, scores], 1), np.concatenate([best_ids, ids], 1), k
            )
        return best_ids, best_scores

    def save(self, index_dir: str) -> None:
        np.save(os.path.join(index_dir, EMBEDDINGS), self.embeddings)

    @classmethod
    def load(cls, index_dir: str) -> ExactIndex:
        path = os.path.join(index_dir, EMBEDDINGS)
        if not os.path.isfile(path):
            raise ValueError(
                f"{index_dir!r} is an exact index but {EMBEDDINGS} is missing; rebuild the index."
            )
        return cls(np.load(path, mmap_mode="r"))


def scann_params_for(count: int) -> dict:
    """Tree + AH + reorder settings scaled with corpus size (ScaNN's sqrt(N) leaves rule of thumb)."""
    if count < MIN_SCANN_POINTS:
        raise ValueError(
            f"ScaNN needs at least {MIN_SCANN_POINTS} passages to train its partitions, got {count}; "
            "use mode='exact' (brute force) for a corpus this small."
        )
    num_leaves = max(8, min(int(round(math.sqrt(count))), 8192))
    # Search 5% of the leaves, but at least MIN_SCANNED points' worth: tiny corpora get scanned
    # (almost) fully, which is cheap, while 21M passages search ~1M AH-scored candidates.
    leaves_to_search = max(num_leaves // 20, math.ceil(MIN_SCANNED * num_leaves / count))
    return dict(
        num_leaves=num_leaves,
        leaves_to_search=min(num_leaves, leaves_to_search),
        training_sample_size=min(count, 250_000),
        min_partition_size=max(1, min(50, count // (4 * num_leaves))),
        dims_per_block=2,
        anisotropic_quantization_threshold=0.2,
        reorder=min(count, 200),
    )


class ScannIndex:
    """ScaNN tree-AH searcher with exact float32 re-scoring of its candidates."""

    mode = "scann"

    def __init__(self, searcher, count: int, dim: int, params: dict):
        self.searcher, self.count, self.dim, self.params = searcher, count, dim, params

    @classmethod
    def build(cls, embeddings: np.ndarray, params: dict | None = None) -> ScannIndex:
        import scann

        embeddings = np.ascontiguousarray(embeddings, np.float32)
        count, dim = embeddings.shape
        params = params or scann_params_for(count)
        searcher = (
            scann.scann_ops_pybind.builder(embeddings, 10, "dot_product")
            .tree(
                num_leaves=params["num_leaves"],
                num_leaves_to_search=params["leaves_to_search"],
                training_sample_size=params["training_sample_size"],
                min_partition_size=params["min_partition_size"],
            )
            .score_ah(
                params["dims_per_block"],
                anisotropic_quantization_threshold=params["anisotropic_quantization_threshold"],
            )
            .reorder(params["reorder"])
            .build()
        )
        return cls(searcher, count, dim, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k ids (int64) and inner-product scores (float32) per query, best first."""
        queries = _check_queries(queries, self.dim, k, self.count)
        pre = min(self.count, max(self.params["reorder"], 2 * k))
        ids, scores = self.searcher.search_batched(
            queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre
        )
        ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)
        # The searched leaves may hold fewer than k points: ScaNN pads with NaN. Redo those
        # queries over every leaf so a valid k <= count always gets k real results.
        short = np.isnan(scores).any(axis=1)
        if short.any():
            i2, s2 = self.searcher.search_batched(
                queries[short],
                final_num_neighbors=k,
                pre_reorder_num_neighbors=self.count,
                leaves_to_search=self.params["num_leaves"],
            )
            ids[short], scores[short] = np.asarray(i2, np.int64), np.asarray(s2, np.float32)
        return ids, scores

    def save(self, index_dir: str) -> None:
        path = os.path.join(index_dir, SCANN_DIR)
        os.makedirs(path, exist_ok=True)
        self.searcher.serialize(path, relative_path=True)  # relative: the directory can be moved

    @classmethod
    def load(cls, index_dir: str, count: int, dim: int, params: dict) -> ScannIndex:
        import scann

        path = os.path.join(index_dir, SCANN_DIR)
        if not os.path.isfile(os.path.join(path, "scann_assets.pbtxt")):
            raise ValueError(
                f"{index_dir!r} is a ScaNN index but {SCANN_DIR}/scann_assets.pbtxt is missing; "
                "rebuild the index."
            )
        return cls(scann.scann_ops_pybind.load_searcher(path), count, dim, params)


def validate_mode(mode: str) -> None:
    if mode != "auto" and mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES + ('auto',)}.")


def resolve_mode(mode: str, count: int) -> str:
    """'auto' -> exact for small corpora, scann otherwise; validates explicit modes."""
    validate_mode(mode)
    if mode == "auto":
        return "exact" if count <= AUTO_EXACT_MAX else "scann"
    return mode


def load_vector_index(index_dir: str, manifest: IndexManifest) -> ExactIndex | ScannIndex:
    if manifest.mode == "exact":
        index = ExactIndex.load(index_dir)
        if index.embeddings.shape != (manifest.count, manifest.dim):
            raise ValueError(
                f"{EMBEDDINGS} has shape {index.embeddings.shape}, manifest says "
                f"({manifest.count}, {manifest.dim}); rebuild the index."
            )
        return index
    if manifest.mode == "scann":
        if not manifest.scann:
            raise ValueError(
                f"{index_dir!r}: manifest of a ScaNN index has no 'scann' parameters; rebuild it."
            )
        return ScannIndex.load(index_dir, manifest.count, manifest.dim, manifest.scann)
    raise ValueError(f"manifest mode {manifest.mode!r} is not one of {MODES}; rebuild the index.")


def load_offsets(index_dir: str, count: int) -> np.ndarray:
    path = os.path.join(index_dir, OFFSETS)
    if not os.path.isfile(path):
        raise ValueError(f"{index_dir!r} is missing {OFFSETS}; rebuild the index.")
    offsets = np.load(path)
    if offsets.shape != (count, 2):
        raise ValueError(f"{OFFSETS} has shape {offsets.shape}, expected ({count}, 2); rebuild the index.")
    return offsets
