"""Regenerates every demo-task file from the seed: `python -m tspo_jax.demo_task.generate`.

Writes corpus.jsonl, train.jsonl, test.jsonl and tokenizer/ into --out_dir (default: this package),
byte-identical on every run.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tspo_jax.data import QAExample
from tspo_jax.demo_task import episodes
from tspo_jax.demo_task import train_tokenizer, world

PACKAGE_DIR = Path(__file__).resolve().parent
CORPUS, TRAIN, TEST, TOKENIZER = "corpus.jsonl", "train.jsonl", "test.jsonl", "tokenizer"


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _title_search(corpus: Sequence[dict], k: int = 3):
    """Exact-title lookup plus the next k-1 passages: stand-in search results for tokenizer text."""
    titles = [r["contents"].split("\n", 1)[0] for r in corpus]
    docs = [tuple(r["contents"].split("\n", 1)) for r in corpus]
    index = {t: i for i, t in enumerate(titles)}

    def search(query: str) -> list[tuple[str, str]]:
        i = index[query]
        return [docs[(i + j) % len(docs)] for j in range(k)]

    return search


def _as_example(row: dict) -> QAExample:
    return QAExample(uid=f"{row['data_source']}/{row['id']}", question=row["question"],
                     golds=list(row["golden_answers"]), data_source=row["data_source"])


def generate(out_dir: str | Path = PACKAGE_DIR, seed: int = world.SEED) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    w = world.build_world(seed)
    corpus = world.corpus_records(w, seed)
    splits = {TRAIN: world.qa_records(w, "train", seed), TEST: world.qa_records(w, "test", seed)}
    _write_jsonl(out_dir / CORPUS, corpus)
    for name, rows in splits.items():
        _write_jsonl(out_dir / name, rows)

    search = _title_search(corpus)
    texts = [episodes.INSTRUCTION] + [r["contents"] for r in corpus]
    for rows in splits.values():
        for row in rows:
            texts.append(row["question"])
            segments = episodes.demonstrations(_as_example(row), search)
            texts.append("".join(text for _, text in segments))
    tokenizer = train_tokenizer.train_tokenizer(texts)
    train_tokenizer.save_tokenizer(tokenizer, out_dir / TOKENIZER)
    return {"corpus": out_dir / CORPUS, "train": out_dir / TRAIN, "test": out_dir / TEST,
            "tokenizer": out_dir / TOKENIZER}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(PACKAGE_DIR), help="where to write the files")
    parser.add_argument("--seed", type=int, default=world.SEED,
                        help="world seed (the committed files use the default)")
    args = parser.parse_args(argv)
    for name, path in generate(args.out_dir, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
