"""QA prompts: Search-R1 parquet/JSONL loading, array_record sources, a resumable prompt stream.

Search-R1's `scripts/data_process/*.py` write parquet rows with `question`, `golden_answers` (a
list), `data_source`, usually an `id`, the golds again under `reward_model.ground_truth.target`,
and `prompt`: the chat messages a Search-R1-trained checkpoint expects. We accept either gold
field, and JSONL files with the same keys.

prompt_source (config.data.prompt_source) says where the policy's prompt comes from:
  "template"  the question, put into rollout.template (the default);
  "column"    the row's own `prompt` messages, through the chat template, as verl does. The
              question (for FOLR's guard and the eval table) is then the `question` column, or
              the text after the last "Question:" of the last user message.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GOLD_COLUMN = "golden_answers"
GOLD_FALLBACK_PATH = ("reward_model", "ground_truth", "target")
SUPPORTED_SUFFIXES = (".parquet", ".jsonl")
PROMPT_SOURCES = ("template", "column")


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One prompt. `uid` is unique per prompt across data sets: it keys the rollout groups.
    `prompt` holds the row's chat messages as (role, content) pairs with prompt_source="column"."""

    uid: str
    question: str
    golds: list[str]
    data_source: str
    prompt: tuple[tuple[str, str], ...] = ()

    @property
    def policy_input(self) -> str | list[dict[str, str]]:
        """What the rollout builds the prompt from: the row's messages if it has them, else the
        question (which rollout.template wraps)."""
        if self.prompt:
            return [{"role": role, "content": content} for role, content in self.prompt]
        return self.question


# ----------------------------------------------------------------------------- loading


def load_qa(path: str | os.PathLike, default_data_source: str | None = None, *,
            prompt_source: str = "template") -> list[QAExample]:
    """Reads a Search-R1 style QA file (.parquet or .jsonl) into QAExamples, in file order.

    uid = f"{data_source}/{id}" when the row has an `id`, else f"{data_source}/row-{i}" with i
    the row's index in the file (test sets such as FlashRAG's may lack ids and repeat a
    question). Rows without `data_source` use `default_data_source`. prompt_source: see above.
    """
    if prompt_source not in PROMPT_SOURCES:
        raise ValueError(f"prompt_source={prompt_source!r} is not one of {PROMPT_SOURCES}: 'template' puts "
                         "the question into rollout.template, 'column' uses each row's `prompt` messages.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"QA file not found: {str(path)!r}. Pass a Search-R1 style .parquet or .jsonl file "
            f"(the demo task's are listed by tspo_jax.demo_task.demo_paths()).")
    if path.suffix == ".parquet":
        rows, columns = _read_parquet(path, with_prompt=prompt_source == "column")
    elif path.suffix == ".jsonl":
        rows, columns = _read_jsonl(path)
    else:
        raise ValueError(f"Unsupported QA file type {path.suffix!r} for {str(path)!r}; "
                         f"expected one of {SUPPORTED_SUFFIXES}.")
    if not rows:
        raise ValueError(f"QA file {str(path)!r} has no rows.")
    _check_columns(path, columns, default_data_source, prompt_source)
    examples = [_row_to_example(path, i, row, default_data_source, prompt_source) for i, row in enumerate(rows)]
    _check_unique_uids(path, examples)
    return examples


def _read_parquet(path: Path, with_prompt: bool) -> tuple[list[dict[str, Any]], list[str]]:
    import pyarrow.parquet as pq  # Only parquet users pay for the import.

    columns = list(pq.read_schema(path).names)
    # Read only what we use: Search-R1 files also carry the whole prompt text per row.
    wanted = [c for c in ("id", "question", "data_source", GOLD_COLUMN, GOLD_FALLBACK_PATH[0])
              + (("prompt",) if with_prompt else ()) if c in columns]
    return pq.read_table(path, columns=wanted).to_pylist(), columns


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, columns = [], {}
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{str(path)!r} line {line_no} is not valid JSON ({e}); each "
                                 f"line must be one JSON object.") from None
            if not isinstance(row, dict):
                raise ValueError(f"{str(path)!r} line {line_no} is a JSON {type(row).__name__}; "
                                 f"expected an object with 'question' and '{GOLD_COLUMN}'.")
            rows.append(row)
            columns.update(dict.fromkeys(row))  # Ordered union of keys, for error messages.
    return rows, list(columns)


def _check_columns(path: Path, columns: list[str], default_data_source: str | None,
                   prompt_source: str) -> None:
    missing = []
    if prompt_source == "column" and "prompt" not in columns:
        missing.append("'prompt' (a list of chat messages; or set data.prompt_source='template')")
    if "question" not in columns and prompt_source != "column":
        missing.append("'question'")
    if GOLD_COLUMN not in columns and GOLD_FALLBACK_PATH[0] not in columns:
        missing.append(f"'{GOLD_COLUMN}' (or '{'.'.join(GOLD_FALLBACK_PATH)}')")
    if "data_source" not in columns and default_data_source is None:
        missing.append("'data_source' (or pass default_data_source=...)")
    if missing:
        raise ValueError(f"QA file {str(path)!r} is missing column(s) {', '.join(missing)}; "
                         f"columns found: {columns}.")


def _row_to_example(path: Path, index: int, row: Mapping[str, Any],
                    default_data_source: str | None, prompt_source: str = "template") -> QAExample:
    where = f"{str(path)!r} row {index}"
    prompt = _messages_of(row.get("prompt"), where) if prompt_source == "column" else ()
    question = row.get("question")
    if question is None and prompt:
        question = _question_in(prompt)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r}.")
    question = question.strip()

    golds = _golds_of(row, where)
    if not golds:
        raise ValueError(f"{where} (question {question!r}) has no non-empty gold answer; every "
                         f"prompt needs at least one answer string in '{GOLD_COLUMN}' (or "
                         f"'{'.'.join(GOLD_FALLBACK_PATH)}'): fix or drop the row.")

    data_source = row.get("data_source")
    if data_source is None or not str(data_source).strip():
        data_source = default_data_source
    if data_source is None:
        raise ValueError(f"{where}: 'data_source' is empty; fill it in or pass "
                         f"default_data_source=...")
    data_source = str(data_source).strip()

    row_id = row.get("id")
    if row_id is None or not str(row_id).strip():
        row_id = f"row-{index}"  # the row, not the question: a test set may repeat a question
    return QAExample(uid=f"{data_source}/{str(row_id).strip()}", question=question, golds=golds,
                     data_source=data_source, prompt=prompt)


def _messages_of(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A row's `prompt` column (a list of {role, content}) as (role, content) pairs."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: 'prompt' must be a non-empty list of chat messages "
                         f"{{'role': ..., 'content': ...}}, got {value!r}; or set data.prompt_source='template'.")
    messages = []
    for m in value:
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each 'prompt' message needs string 'role' and 'content', got {m!r}.")
        messages.append((m["role"], m["content"]))
    return tuple(messages)


def _question_in(prompt: tuple[tuple[str, str], ...]) -> str:
    """The question inside Search-R1's prompt ('... Question: {question}\n'), else the whole
    last user message."""
    users = [content for role, content in prompt if role == "user"] or [prompt[-1][1]]
    text = users[-1]
    cut = text.rfind("Question:")
    return text[cut + len("Question:"):] if cut >= 0 else text


def _golds_of(row: Mapping[str, Any], where: str) -> list[str]:
    """Gold aliases as stripped, non-empty strings (possibly none)."""
    value = row.get(GOLD_COLUMN)
    if value is None:
        value = row
        for key in GOLD_FALLBACK_PATH:
            value = value.get(key) if isinstance(value, Mapping) else None
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, float)):
        value = [value]
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    elif not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: gold answers must be a string or a list of strings, got "
                         f"{type(value).__name__} {value!r}.")
    golds = []
    for g in value:
        g = g.decode("utf-8") if isinstance(g, bytes) else str(g)
        if g.strip():
            golds.append(g.strip())
    return golds


def _check_unique_uids(path: Path, examples: list[QAExample]) -> None:
    first_row: dict[str, int] = {}
    dups = []
    for i, ex in enumerate(examples):
        if ex.uid in first_row:
            dups.append(f"{ex.uid!r} (rows {first_row[ex.uid]} and {i})")
        first_row.setdefault(ex.uid, i)
    if dups:
        more = f" and {len(dups) - 3} more" if len(dups) > 3 else ""
        raise ValueError(f"{str(path)!r} has duplicate prompt uids {dups[:3]}{more}; uids key "
                         f"the rollout groups, so give each row a unique 'id' (rows without one are told "
                         f"apart by their position).")


# ----------------------------------------------------------------------------- array_record

_TFDS_NAME = "tspo_qa"
_TFDS_VERSION = "1.0.0"


def build_array_record(qa_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       split: str = "train", overwrite: bool = False) -> Path:
    """Writes a QA file as a TFDS array_record data set under out_dir; TensorFlow is not needed.

    Row i of the file is record i (shuffling is PromptStream's job). Returns the data set folder.
    """
    import tensorflow_datasets as tfds

    examples = load_qa(qa_path)
    builder = _qa_builder_class()(examples=examples, split=split, data_dir=os.fspath(out_dir),
                                  file_format="array_record")
    if builder.is_prepared() and not overwrite:
        raise FileExistsError(f"{builder.data_dir} already holds a built QA source; pass "
                              f"overwrite=True or choose another out_dir.")
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return Path(builder.data_dir)


def open_qa_source(out_dir: str | os.PathLike, *, split: str = "train") -> QASource:
    """Random-access QAExamples from a folder written by build_array_record."""
    import tensorflow_datasets as tfds

    builder_dir = Path(out_dir) / _TFDS_NAME / _TFDS_VERSION
    if not (builder_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(f"No QA array_record source under {str(out_dir)!r} (looked for "
                                f"{str(builder_dir)!r}); build one with "
                                f"build_array_record(qa_path, out_dir).")
    builder = tfds.builder_from_directory(builder_dir)
    if split not in builder.info.splits:
        raise ValueError(f"Split {split!r} is not in {str(builder_dir)!r}; available: "
                         f"{sorted(builder.info.splits)}.")
    return QASource(builder.as_data_source(split=split))


class QASource(Sequence):
    """A random-access sequence of QAExample over a TFDS array_record data source."""

    def __init__(self, records):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"QASource index {index} out of range for {len(self)} examples.")
        return _record_to_example(self._records[index])


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _record_to_example(record: Mapping[str, Any]) -> QAExample:
    return QAExample(uid=_text(record["uid"]), question=_text(record["question"]),
                     golds=[_text(g) for g in record["golds"]],
                     data_source=_text(record["data_source"]))


_BUILDER_CLASS = None


def _qa_builder_class():
    """Defines the TFDS builder on first use, so that importing this module skips TFDS."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is not None:
        return _BUILDER_CLASS
    import tensorflow_datasets as tfds

    class TspoQa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(_TFDS_VERSION)
        # Nothing is downloaded, so there are no URL checksums to find; TFDS's default lookup
        # would import `importlib_resources`, which tensorflow-datasets 4.9.10 does not install.
        code_path = None

        def __init__(self, *, examples: Sequence[QAExample] = (), split: str = "train", **kwargs):
            self._examples, self._split = examples, split
            super().__init__(**kwargs)

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                disable_shuffling=True,  # Keep record i == row i.
                description="QA prompts (uid, question, gold aliases, data source) for tspo_jax.",
                features=tfds.features.FeaturesDict({
                    "uid": text, "question": text, "data_source": text,
                    "golds": tfds.features.Sequence(tfds.features.Text())}))

        def _split_generators(self, dl_manager):
            del dl_manager
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            for i, ex in enumerate(self._examples):
                if ex.prompt:
                    raise ValueError(f"example {ex.uid!r} carries chat messages (prompt_source='column'), "
                                     "which an array_record QA source does not hold; read the parquet file "
                                     "instead, or load it with prompt_source='template'.")
                yield i, {k: v for k, v in dataclasses.asdict(ex).items() if k != "prompt"}

    if TspoQa.name != _TFDS_NAME:
        raise AssertionError(f"TFDS named the builder {TspoQa.name!r}, expected {_TFDS_NAME!r}.")
    _BUILDER_CLASS = TspoQa
    return TspoQa


# ----------------------------------------------------------------------------- prompt stream


class PromptStream(Iterator[list[QAExample]]):
    """Endless, deterministic batches of prompts, reshuffled every epoch.

    Epoch e visits the examples in a permutation seeded by (seed, e). The tail that cannot fill a
    batch is dropped, so a batch never holds one prompt twice (that would merge two groups); the
    next epoch's shuffle gives those prompts their turn. `state()` is a small dict of ints for a
    checkpoint and `from_state` resumes at exactly the next batch.
    """

    def __init__(self, examples: Sequence[QAExample], batch_size: int, seed: int, *,
                 epoch: int = 0, index: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        if batch_size > len(examples):
            raise ValueError(f"batch_size={batch_size} exceeds the {len(examples)} examples; use "
                             f"a smaller batch or more data (a batch never repeats a prompt).")
        if epoch < 0 or index < 0 or index % batch_size or index + batch_size > len(examples):
            raise ValueError(f"Invalid stream position epoch={epoch}, index={index} for "
                             f"batch_size={batch_size} over {len(examples)} examples.")
        self._examples = examples
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        self._epoch, self._index = int(epoch), int(index)
        self._order, self._order_epoch = None, None

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def batches_per_epoch(self) -> int:
        return len(self._examples) // self._batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices that epoch `epoch` walks through."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self._seed, epoch])
            self._order, self._order_epoch = rng.permutation(len(self._examples)), epoch
        return self._order

    def __iter__(self) -> PromptStream:
        return self

    def __next__(self) -> list[QAExample]:
        order = self.epoch_order(self._epoch)
        batch = [self._examples[int(i)]
                 for i in order[self._index:self._index + self._batch_size]]
        self._index += self._batch_size
        if self._index + self._batch_size > len(self._examples):
            self._epoch, self._index = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """Where the next batch starts, plus what a restore must match."""
        return {"epoch": self._epoch, "index": self._index, "seed": self._seed,
                "batch_size": self._batch_size, "num_examples": len(self._examples)}

    @classmethod
    def from_state(cls, examples: Sequence[QAExample], state: Mapping[str, Any]) -> PromptStream:
        """A stream over `examples` positioned where `state()` was taken."""
        keys = ("epoch", "index", "seed", "batch_size", "num_examples")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"PromptStream state lacks {missing}; pass a dict from state(), got "
                             f"keys {sorted(state)}.")
        if int(state["num_examples"]) != len(examples):
            raise ValueError(f"PromptStream state was saved over {int(state['num_examples'])} "
                             f"examples but {len(examples)} were given; resume on the same data.")
        return cls(examples, int(state["batch_size"]), int(state["seed"]),
                   epoch=int(state["epoch"]), index=int(state["index"]))
