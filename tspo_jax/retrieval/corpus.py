"""A JSONL passage corpus (wiki-18 format: {"id", "contents": "Title\\ntext"}) read lazily by byte offset."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np


def _parse(line: bytes, path: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} ({where}): not valid JSON ({e.msg}); each line must be one JSON object."
        ) from e
    if not isinstance(row, dict) or not isinstance(row.get("contents"), str):
        raise ValueError(
            f'{path} ({where}): missing a string "contents" field; each line must look like '
            '{"id": "...", "contents": "Title\\ntext"}.'
        )
    return row


def iter_passages(path: str) -> Iterator[tuple[int, int, dict]]:
    """Yields (byte offset, byte length, row) for every non-blank line, validating each row."""
    if not os.path.isfile(path):
        raise ValueError(f"Corpus file {path!r} does not exist; pass a JSONL file with one passage per line.")
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield offset, len(line), _parse(line, path, f"line {line_no}")
            offset += len(line)


class Corpus:
    """Random access to passages through (offset, length) pairs; reads one line per lookup."""

    def __init__(self, path: str, offsets: np.ndarray):
        if not os.path.isfile(path):
            raise ValueError(f"Corpus file {path!r} does not exist; rebuild the index or pass corpus_path=.")
        offsets = np.asarray(offsets, np.int64)
        if offsets.ndim != 2 or offsets.shape[1] != 2:
            raise ValueError(f"offsets must be an [N, 2] (offset, length) array, got shape {offsets.shape}.")
        if len(offsets) and offsets[-1].sum() > os.path.getsize(path):
            raise ValueError(
                f"Corpus {path!r} is shorter than the index expects; it changed after the index was "
                "built. Rebuild the index."
            )
        self.path, self.offsets = path, offsets
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        offset, length = self.offsets[i]
        # pread keeps lookups thread-safe: no shared file position.
        line = os.pread(self._fd, int(length), int(offset))
        return _parse(line, self.path, f"passage {i} at byte {offset}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
