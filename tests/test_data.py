"""tspo_jax.data: Search-R1 QA loading, array_record round trips, the resumable prompt stream."""
import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo_jax.data import (PromptStream, QAExample, build_array_record, load_qa,
                           open_qa_source)

_ALPHABET = "abcdefghijklmnopqrstuvwxyzÉéüß東京 -'"


def _random_rows(n, seed, with_ids=True):
    """Search-R1 style rows with ragged gold lists and non-ASCII text."""
    rng = random.Random(seed)

    def word():
        return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(3, 9))).strip() or "x"

    rows = []
    for i in range(n):
        golds = [word() for _ in range(rng.randint(1, 4))]
        row = {"question": f"q{i} {word()} {word()}?", "golden_answers": golds,
               "data_source": rng.choice(["nq", "hotpotqa", "bamboogle"])}
        if with_ids:
            row["id"] = f"train_{i}"
        rows.append(row)
    return rows


def _expected(rows):
    out = []
    for i, r in enumerate(rows):
        rid = r.get("id") or f"row-{i}"
        out.append(QAExample(uid=f"{r['data_source']}/{rid}", question=r["question"].strip(),
                             golds=list(r["golden_answers"]), data_source=r["data_source"]))
    return out


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _write_search_r1_parquet(path, rows, gold_column=True):
    """The layout of Search-R1's scripts/data_process/nq_search.py output."""
    table = {
        "id": [r["id"] for r in rows],
        "question": [r["question"] for r in rows],
        "data_source": [r["data_source"] for r in rows],
        "prompt": [[{"role": "user", "content": f"Answer the given question. {r['question']}"}]
                   for r in rows],
        "ability": ["fact-reasoning"] * len(rows),
        "reward_model": [{"style": "rule", "ground_truth": {"target": r["golden_answers"]}}
                         for r in rows],
        "extra_info": [{"split": "train", "index": i} for i in range(len(rows))],
    }
    if gold_column:
        table["golden_answers"] = [r["golden_answers"] for r in rows]
    pq.write_table(pa.table(table), path)
    return path


# ----------------------------------------------------------------------------- loading


def test_parquet_round_trip(tmp_path):
    rows = _random_rows(23, seed=1)
    rows[0]["question"] = "  who wrote it  "  # Stripped on load.
    got = load_qa(_write_search_r1_parquet(tmp_path / "train.parquet", rows))
    assert got == _expected(rows)


def test_parquet_golds_from_reward_model(tmp_path):
    rows = _random_rows(11, seed=2)
    got = load_qa(_write_search_r1_parquet(tmp_path / "t.parquet", rows, gold_column=False))
    assert got == _expected(rows)


def test_jsonl_round_trip_with_and_without_ids(tmp_path):
    rows = _random_rows(17, seed=3, with_ids=False)
    rows[4]["id"] = 12345  # Ids may be ints; the uid uses their text.
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    (tmp_path / "qa.jsonl").write_text(path.read_text() + "\n\n", encoding="utf-8")  # Blank lines.
    got = load_qa(path)
    assert got == _expected(rows)
    assert got[4].uid == f"{rows[4]['data_source']}/12345"
    assert got[0].uid == f"{rows[0]['data_source']}/row-0"  # no id: the row (issue 12, finding 6)


def test_parquet_and_jsonl_agree(tmp_path):
    rows = _random_rows(9, seed=4)
    assert load_qa(_write_search_r1_parquet(tmp_path / "a.parquet", rows)) == \
        load_qa(_write_jsonl(tmp_path / "a.jsonl", rows))


def test_same_question_in_two_data_sets_gets_two_uids(tmp_path):
    rows = [{"question": "Who?", "golden_answers": ["x"], "data_source": "nq"},
            {"question": "Who?", "golden_answers": ["x"], "data_source": "triviaqa"}]
    uids = [ex.uid for ex in load_qa(_write_jsonl(tmp_path / "a.jsonl", rows))]
    assert len(set(uids)) == 2


def test_test_set_without_ids_and_with_repeated_questions_loads(tmp_path):
    """Finding 6: FlashRAG-style test sets may lack `id` and repeat a question; the uid is then
    (data_source, row), so loading does not fail and every row keeps its own group."""
    rows = [{"question": "Who wrote Ozymandias?", "golden_answers": ["Shelley"], "data_source": "popqa"},
            {"question": "Who wrote Ozymandias?", "golden_answers": ["Percy Shelley"], "data_source": "popqa"},
            {"question": "Who wrote Ozymandias?", "golden_answers": ["Shelley"], "data_source": "nq"},
            {"question": "Capital of France?", "golden_answers": ["Paris"], "data_source": "popqa"}]
    for path in (_write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "t.parquet"):
        if path.suffix == ".parquet":
            pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), path)
        got = load_qa(path)
        assert [ex.uid for ex in got] == ["popqa/row-0", "popqa/row-1", "nq/row-2", "popqa/row-3"]
        assert [ex.golds for ex in got] == [r["golden_answers"] for r in rows]


def test_golds_are_cleaned(tmp_path):
    rows = [{"question": "q?", "golden_answers": [" Paris ", "", 1912], "data_source": "nq"},
            {"question": "r?", "golden_answers": "single", "data_source": "nq"}]
    got = load_qa(_write_jsonl(tmp_path / "a.jsonl", rows))
    assert got[0].golds == ["Paris", "1912"] and got[1].golds == ["single"]


def test_default_data_source(tmp_path):
    rows = [{"question": "q?", "golden_answers": ["a"]},
            {"question": "r?", "golden_answers": ["b"], "data_source": "nq"}]
    path = _write_jsonl(tmp_path / "a.jsonl", rows)
    got = load_qa(path, default_data_source="mine")
    assert [ex.data_source for ex in got] == ["mine", "nq"]
    with pytest.raises(ValueError, match="data_source"):
        load_qa(_write_jsonl(tmp_path / "b.jsonl", rows[:1]))


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_qa(tmp_path / "nope.parquet")


def test_unsupported_suffix_error(tmp_path):
    (tmp_path / "a.csv").write_text("question,golden_answers\n")
    with pytest.raises(ValueError, match=r"\.csv.*\.parquet"):
        load_qa(tmp_path / "a.csv")


def test_missing_columns_error_lists_columns(tmp_path):
    pq.write_table(pa.table({"query": ["q?"], "answers": [["a"]], "data_source": ["nq"]}),
                   tmp_path / "a.parquet")
    with pytest.raises(ValueError) as err:
        load_qa(tmp_path / "a.parquet")
    msg = str(err.value)
    assert "'question'" in msg and "golden_answers" in msg
    assert "columns found" in msg and "'query'" in msg and "'answers'" in msg


def test_empty_golds_error_names_row(tmp_path):
    rows = _random_rows(5, seed=5)
    rows[3]["golden_answers"] = ["", "  "]
    with pytest.raises(ValueError, match="row 3.*gold"):
        load_qa(_write_jsonl(tmp_path / "a.jsonl", rows))
    rows[3]["golden_answers"] = []
    with pytest.raises(ValueError, match="row 3.*gold"):
        load_qa(_write_search_r1_parquet(tmp_path / "a.parquet", rows))


def test_bad_rows_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question": "q?", "golden_answers": ["a"], "data_source": "nq"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_qa(path)
    path.write_text('["q?", "a"]\n')
    with pytest.raises(ValueError, match="line 1 is a JSON list"):
        load_qa(path)
    path.write_text("")
    with pytest.raises(ValueError, match="no rows"):
        load_qa(path)
    _write_jsonl(path, [{"question": " ", "golden_answers": ["a"], "data_source": "nq"}])
    with pytest.raises(ValueError, match="non-empty string"):
        load_qa(path)


def test_duplicate_uids_error(tmp_path):
    rows = _random_rows(6, seed=6)
    rows[5]["id"], rows[5]["data_source"] = rows[2]["id"], rows[2]["data_source"]
    with pytest.raises(ValueError, match="duplicate prompt uids.*rows 2 and 5"):
        load_qa(_write_jsonl(tmp_path / "a.jsonl", rows))


# ----------------------------------------------------------------------------- array_record


def test_array_record_round_trip(tmp_path):
    rows = _random_rows(37, seed=7)
    qa = _write_search_r1_parquet(tmp_path / "train.parquet", rows)
    build_array_record(qa, tmp_path / "ar")
    source = open_qa_source(tmp_path / "ar")
    expected = load_qa(qa)
    assert len(source) == len(expected)
    assert [source[i] for i in range(len(source))] == expected
    assert source[-1] == expected[-1] and source[np.int64(5)] == expected[5]
    assert source[3:9:2] == expected[3:9:2]
    with pytest.raises(IndexError):
        source[len(expected)]

    # Rebuilding needs overwrite=True, which replaces the content.
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_array_record(qa, tmp_path / "ar")
    smaller = _write_jsonl(tmp_path / "small.jsonl", rows[:4])
    build_array_record(smaller, tmp_path / "ar", overwrite=True)
    assert list(open_qa_source(tmp_path / "ar")) == expected[:4]


def test_array_record_stream_matches_list(tmp_path):
    rows = _random_rows(21, seed=8)
    qa = _write_jsonl(tmp_path / "qa.jsonl", rows)
    build_array_record(qa, tmp_path / "ar", split="test")
    source = open_qa_source(tmp_path / "ar", split="test")
    examples = load_qa(qa)

    def take(stream):
        return [b for _, b in zip(range(7), stream)]

    assert take(PromptStream(source, 4, seed=11)) == take(PromptStream(examples, 4, seed=11))
    with pytest.raises(ValueError, match="Split 'train'.*available.*test"):
        open_qa_source(tmp_path / "ar", split="train")


def test_open_missing_source_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_array_record"):
        open_qa_source(tmp_path)


def test_array_record_needs_no_tensorflow(tmp_path):
    rows = _random_rows(3, seed=9)
    qa = _write_jsonl(tmp_path / "qa.jsonl", rows)
    code = (f"import sys; from tspo_jax.data import build_array_record, open_qa_source;"
            f"build_array_record({str(qa)!r}, {str(tmp_path / 'ar')!r});"
            f"assert len(open_qa_source({str(tmp_path / 'ar')!r})) == 3;"
            f"print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# ----------------------------------------------------------------------------- prompt stream


def _examples(n):
    return [QAExample(uid=f"ds/{i}", question=f"q{i}?", golds=[f"a{i}"], data_source="ds")
            for i in range(n)]


def _reference_batches(n, batch_size, seed, num_batches):
    """Plain-Python spec: epoch e walks permutation(seed, e) in full batches, tail dropped."""
    out, epoch = [], 0
    while len(out) < num_batches:
        perm = np.random.default_rng([seed, epoch]).permutation(n).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            out.append([f"ds/{i}" for i in perm[start:start + batch_size]])
        epoch += 1
    return out[:num_batches]


def test_stream_matches_reference_and_covers_each_epoch():
    n, b = 23, 5
    stream = PromptStream(_examples(n), b, seed=42)
    got = [[ex.uid for ex in next(stream)] for _ in range(13)]
    assert got == _reference_batches(n, b, 42, 13)
    per_epoch = n // b
    assert stream.batches_per_epoch == per_epoch
    for e in range(3):
        seen = [u for batch in got[e * per_epoch:(e + 1) * per_epoch] for u in batch]
        assert len(seen) == len(set(seen)) == per_epoch * b  # Nothing repeats inside an epoch.
    assert got[:per_epoch] != got[per_epoch:2 * per_epoch]  # Reshuffled.
    assert got != [[ex.uid for ex in next(PromptStream(_examples(n), b, seed=43))]
                   for _ in range(13)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_stream_resume_equals_uninterrupted(n, data):
    b = data.draw(st.integers(1, n))
    seed = data.draw(st.integers(0, 2**31 - 1))
    k = data.draw(st.integers(0, 3 * max(n // b, 1) + 2))
    m = 6
    examples = _examples(n)
    straight = PromptStream(examples, b, seed)
    want = [next(straight) for _ in range(k + m)]

    first = PromptStream(examples, b, seed)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state()))  # Survives a checkpoint as plain JSON.
    resumed = PromptStream.from_state(examples, state)
    assert resumed.state() == first.state()
    assert [next(resumed) for _ in range(m)] == want[k:]
    assert all(isinstance(v, int) for v in state.values())


def test_stream_state_at_epoch_boundary():
    stream = PromptStream(_examples(10), 5, seed=0)
    next(stream), next(stream)
    assert {k: stream.state()[k] for k in ("epoch", "index")} == {"epoch": 1, "index": 0}


def test_stream_errors():
    ex = _examples(4)
    with pytest.raises(ValueError, match="batch_size=5 exceeds the 4 examples"):
        PromptStream(ex, 5, seed=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            PromptStream(ex, bad, seed=0)
    state = PromptStream(ex, 2, seed=0).state()
    with pytest.raises(ValueError, match="saved over 4 examples but 5"):
        PromptStream.from_state(_examples(5), state)
    with pytest.raises(ValueError, match=r"lacks \['seed'\]"):
        PromptStream.from_state(ex, {k: v for k, v in state.items() if k != "seed"})
    with pytest.raises(ValueError, match="Invalid stream position"):
        PromptStream.from_state(ex, {**state, "index": 1})
