"""What every retriever shares: the Doc record, the Retriever interface, errors, observation text."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence


class RetrieverError(RuntimeError):
    """The retriever could not answer (down, too slow, or a malformed reply)."""


@dataclasses.dataclass(frozen=True)
class Doc:
    """One retrieved passage; `title` is the first line of the corpus `contents`, `text` the rest."""

    id: str
    title: str
    text: str
    score: float

    @classmethod
    def from_contents(cls, id: str, contents: str, score: float) -> Doc:
        # Split exactly as Search-R1's _passages2string does.
        lines = contents.split("\n")
        return cls(id=str(id), title=lines[0], text="\n".join(lines[1:]), score=float(score))


def format_docs(docs: Sequence[Doc]) -> str:
    """Search-R1's observation body: one 'Doc i(Title: t) text' line per document, 1-based."""
    return "".join(f"Doc {i}(Title: {d.title}) {d.text}\n" for i, d in enumerate(docs, 1))


# Search-R1's observation `\n\n<information>{docs.strip()}</information>\n\n`, in one place.
OBSERVATION_HEAD, OBSERVATION_TAIL = "\n\n<information>", "</information>\n\n"


def wrap_observation(docs_text: str) -> str:
    """The text the environment appends after a search (Search-R1 strips the docs string)."""
    return f"{OBSERVATION_HEAD}{docs_text.strip()}{OBSERVATION_TAIL}"


def check_request(queries: Sequence[str], topk: int, count: int | None = None) -> None:
    """Raises ValueError for a request no retriever should try; `count` is the corpus size if known."""
    if isinstance(queries, str):
        raise ValueError("queries must be a list of strings, got one string; wrap it in a list.")
    if len(queries) == 0:
        raise ValueError("queries is empty; pass at least one query string.")
    bad = [i for i, q in enumerate(queries) if not isinstance(q, str)]
    if bad:
        raise ValueError(f"queries[{bad[0]}] is {type(queries[bad[0]]).__name__}, not a string.")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk must be a positive integer, got {topk!r}.")
    if count is not None and topk > count:
        raise ValueError(f"topk={topk} exceeds the corpus size {count}; ask for at most {count} documents.")


class Retriever(abc.ABC):
    """Batched top-k search: one list of Docs (best first) per query."""

    @abc.abstractmethod
    def search(self, queries: list[str], topk: int) -> list[list[Doc]]: ...

    def close(self) -> None:
        """Releases resources; a no-op unless a subclass holds any."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
