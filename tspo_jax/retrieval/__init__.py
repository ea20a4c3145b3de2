"""Retrieval: ScaNN/exact passage index, Search-R1 compatible HTTP server and client.

The rollout only needs `make_retriever(spec).search(queries, topk)` and `format_docs(docs)`.
"""

from __future__ import annotations

import os

from tspo_jax.retrieval.base import (OBSERVATION_HEAD, OBSERVATION_TAIL, Doc, Retriever, RetrieverError,
                                     format_docs, wrap_observation)
from tspo_jax.retrieval.client import HttpRetriever

__all__ = [
    "Doc",
    "HttpRetriever",
    "LocalRetriever",
    "OBSERVATION_HEAD",
    "OBSERVATION_TAIL",
    "Retriever",
    "RetrieverError",
    "format_docs",
    "make_retriever",
    "wrap_observation",
]


def __getattr__(name: str):
    # LocalRetriever pulls in JAX and ScaNN; import it only when asked for.
    if name == "LocalRetriever":
        from tspo_jax.retrieval.local import LocalRetriever

        return LocalRetriever
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_retriever(spec: str, *, timeout_s: float = 30.0, retries: int = 2, max_outage_s: float = 600.0,
                   corpus_path: str | None = None) -> Retriever:
    """'http(s)://host:port[/retrieve]' -> HttpRetriever; an index directory -> LocalRetriever.

    `corpus_path`: the index's corpus where it is now (a shared index cache names the absolute
    path it was built from, which another clone may have moved or deleted)."""
    spec = str(spec)
    if spec.startswith(("http://", "https://")):
        return HttpRetriever(spec, timeout_s=timeout_s, retries=retries, max_outage_s=max_outage_s)
    if os.path.isdir(spec):
        from tspo_jax.retrieval.local import LocalRetriever

        return LocalRetriever(spec, corpus_path=corpus_path)
    raise ValueError(
        f"Retriever spec {spec!r} is neither an http(s):// URL nor an existing index directory; "
        "pass e.g. http://127.0.0.1:8000 or a directory made by tspo_jax.retrieval.build_index."
    )
