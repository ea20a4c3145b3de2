"""The embedded demo task: reproducible files, reachable golds, demonstrations, the tokenizer."""
import json
import os
import random
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest

from tspo_jax.data import QAExample, load_qa
from tspo_jax.demo_task import (OBSERVATION, POLICY, TWO_HOP_MIX, DemonstrationUnavailable,
                                demo_paths, demonstrations, one_hop_demonstrations,
                                weak_searcher_demonstrations)
from tspo_jax.demo_task.generate import generate

TAGS = ("<think>", "</think>", "<search>", "</search>", "<answer>", "</answer>",
        "<information>", "</information>")
CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
PERSON_Q = re.compile(r"^In which (city|country) was (\w+ \w+) born\?$")
CITY_Q = re.compile(r"^In which country is the city of (\w+)\?$")


def _normalize(text):
    """Search-R1's normalize_answer, written out independently of the package."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def paths():
    return demo_paths()


@pytest.fixture(scope="module")
def passages(paths):
    """Title -> text, from the committed corpus."""
    out = {}
    for row in _read_jsonl(paths["corpus"]):
        title, text = row["contents"].split("\n", 1)
        assert title not in out, f"duplicate title {title!r}"
        out[title] = text
    return out


@pytest.fixture(scope="module")
def examples(paths):
    return {"train": load_qa(paths["train"]), "test": load_qa(paths["test"])}


def _exact_title_search(passages, k=3, seed=0):
    """Returns the passage titled `query` (if any) at a random rank among k-1 random others."""
    rng = random.Random(seed)
    titles = sorted(passages)

    def search(query):
        others = [t for t in rng.sample(titles, k) if t != query][:k - 1]
        hits = others[:]
        if query in passages:
            hits.insert(rng.randrange(len(hits) + 1), query)
        return [(t, passages[t]) for t in hits[:k]]

    return search


# ----------------------------------------------------------------------------- files


def test_generation_is_byte_identical(tmp_path, paths):
    generate(tmp_path)
    committed = {p.relative_to(paths["corpus"].parent): p
                 for key in ("corpus", "train", "test") for p in [paths[key]]}
    committed.update({p.relative_to(paths["corpus"].parent): p
                      for p in paths["tokenizer"].iterdir()})
    produced = {p.relative_to(tmp_path): p for p in tmp_path.rglob("*") if p.is_file()}
    assert set(produced) == set(committed)
    for rel, path in committed.items():
        assert produced[rel].read_bytes() == path.read_bytes(), f"{rel} differs from the seed"


def test_cli_is_deterministic_across_hash_seeds(tmp_path, paths):
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "tspo_jax.demo_task.generate", "--out_dir",
                    str(tmp_path)], check=True, env=env, capture_output=True)
    for name in ("corpus.jsonl", "train.jsonl", "test.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (paths["corpus"].parent / name).read_bytes()


def test_files_are_small(paths):
    files = [paths["corpus"], paths["train"], paths["test"], *paths["tokenizer"].iterdir()]
    assert sum(f.stat().st_size for f in files) < 1_000_000


def test_corpus_format(paths):
    rows = _read_jsonl(paths["corpus"])
    assert [set(r) for r in rows] == [{"id", "contents"}] * len(rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(isinstance(r["id"], str) and r["contents"].count("\n") == 1 for r in rows)


def test_split_and_mix(passages, examples):
    people = {split: {PERSON_Q.match(ex.question).group(2) for ex in exs if ex.data_source != "demo_city"}
              for split, exs in examples.items()}
    assert not people["train"] & people["test"], "test people must be held out of training"
    assert 180 <= len(people["train"] | people["test"]) <= 220
    assert len(people["test"]) >= 40
    assert people["train"] | people["test"] <= set(passages)  # The corpus covers everyone.

    everything = examples["train"] + examples["test"]
    about_people = [ex for ex in everything if ex.data_source != "demo_city"]
    two_hop = sum(ex.data_source == "demo_2hop" for ex in about_people) / len(about_people)
    assert 0.6 <= two_hop <= 0.8
    assert {ex.data_source for ex in examples["train"]} == {"demo_1hop", "demo_2hop", "demo_city"}
    assert {ex.data_source for ex in examples["test"]} == {"demo_1hop", "demo_2hop"}
    assert len({ex.uid for ex in everything}) == len(everything)
    # One city question per city of the corpus, in training only.
    cities = {t for t, x in passages.items() if re.fullmatch(rf"{re.escape(t)} is a city in \w+\..*", x)}
    asked = [CITY_Q.match(ex.question).group(1) for ex in examples["train"] if ex.data_source == "demo_city"]
    assert sorted(asked) == sorted(cities) and len(cities) == 40


def test_every_gold_is_reachable_and_first_seen_at_the_right_hop(passages, examples):
    cities = {t for t, x in passages.items()
              if re.fullmatch(rf"{re.escape(t)} is a city in \w+\..*", x)}
    for ex in examples["train"] + examples["test"]:
        assert len(ex.golds) == 1
        gold = _normalize(ex.golds[0])
        if ex.data_source == "demo_city":
            city = CITY_Q.match(ex.question).group(1)
            assert city in cities and gold not in _normalize(ex.question)
            assert re.fullmatch(rf"{re.escape(city)} is a city in (\w+)\..*", passages[city]).group(1) == ex.golds[0]
            continue
        kind, name = PERSON_Q.match(ex.question).groups()
        person = passages[name]
        assert gold not in _normalize(ex.question), ex
        city = re.search(r"was born in (\w+)\.", person).group(1)
        assert city in cities
        if kind == "city":
            assert ex.data_source == "demo_1hop"
            assert gold == _normalize(city) and gold in _normalize(f"{name} {person}")
        else:
            assert ex.data_source == "demo_2hop"
            city_text = _normalize(f"{city} {passages[city]}")
            assert gold in city_text
            assert gold not in _normalize(f"{name} {person}"), ex
            # No passage mentioning the person reveals the country either.
            for title, text in passages.items():
                if name in text and title != city:
                    assert gold not in _normalize(f"{title} {text}"), (ex, title)


# ----------------------------------------------------------------------------- demonstrations


def _reference_observation(docs):
    body = "".join(f"Doc {i + 1}(Title: {t}) {x}\n" for i, (t, x) in enumerate(docs))
    return "\n\n<information>" + body.strip() + "</information>\n\n"


def _check_tags(text):
    """Tags come in order: think, then search+information or answer; never nested or unclosed."""
    parts = re.findall(r"</?(?:think|search|answer|information)>", text)
    expected_next = {"<think>": "</think>", "<search>": "</search>", "<answer>": "</answer>",
                     "<information>": "</information>"}
    assert len(parts) % 2 == 0
    for open_tag, close_tag in zip(parts[::2], parts[1::2]):
        assert expected_next.get(open_tag) == close_tag, parts
    for tag in TAGS:
        assert text.count(tag) == parts.count(tag)


def test_demonstrations_follow_search_r1_format(passages, examples):
    search_log = []
    search = _exact_title_search(passages, seed=1)

    def logged_search(query):
        docs = search(query)
        search_log.append((query, docs))
        return docs

    for ex in examples["train"] + examples["test"]:
        search_log.clear()
        segments = demonstrations(ex, logged_search)
        if ex.data_source == "demo_city":
            kind, name = "city", CITY_Q.match(ex.question).group(1)
        else:
            kind, name = PERSON_Q.match(ex.question).groups()
        hops = 1 if kind == "city" else 2
        assert [r for r, _ in segments] == [POLICY, OBSERVATION] * hops + [POLICY]
        assert len(search_log) == hops
        for i, (query, docs) in enumerate(search_log):
            policy = segments[2 * i][1]
            assert policy.startswith("<think> ") and policy.endswith(f"<search> {query} </search>")
            assert re.fullmatch(r"<think> [^<>]+ </think>\n<search> [^<>]+ </search>", policy)
            assert segments[2 * i + 1][1] == _reference_observation(docs)
        assert search_log[0][0] == name
        if hops == 2:
            assert search_log[1][0] == re.search(r"born in (\w+)\.", passages[name]).group(1)
        last = segments[-1][1]
        assert re.fullmatch(r"<think> [^<>]+ </think>\n<answer> [^<>]+ </answer>", last)
        assert re.search(r"<answer> (.*) </answer>$", last).group(1) == ex.golds[0]
        _check_tags("".join(text for _, text in segments))


def _answer(segments):
    return re.search(r"<answer> (.*) </answer>$", segments[-1][1]).group(1)


def test_weak_searcher_mix_and_one_hop_demonstrations(passages, examples):
    titles = sorted(passages)

    def search(query):  # deterministic: the passage titled `query` second of three
        i = titles.index(query)
        return [(t, passages[t]) for t in (titles[i - 1], query, titles[(i + 7) % len(titles)])]

    assert dict(TWO_HOP_MIX) == {"stop": 5, "unused": 2, "chain": 1}
    seen = set()
    for ex in examples["train"]:
        variants = weak_searcher_demonstrations(ex, search)
        if ex.data_source != "demo_2hop":
            assert variants == [demonstrations(ex, search)]
            assert one_hop_demonstrations(ex, search)[-1] == variants[0][-1]
            seen.add(ex.data_source)
            continue
        with pytest.raises(DemonstrationUnavailable):
            one_hop_demonstrations(ex, search)
        name = PERSON_Q.match(ex.question).group(2)
        city = re.search(r"born in (\w+)\.", passages[name]).group(1)
        assert len(variants) == 8
        searches = [sum(r == OBSERVATION for r, _ in v) for v in variants]
        answers = [_answer(v) for v in variants]
        # 5 stop after one search with the city, 2 search the city and still answer it, 1 chains.
        assert searches == [1] * 5 + [2] * 3
        assert answers == [city] * 7 + [ex.golds[0]]
        # Every variant starts with the same first turn, so the choice comes after the first search.
        assert len({v[0] for v in variants}) == 1
        assert variants[-1][1:] == demonstrations(ex, search)[1:]
        for v in variants:
            _check_tags("".join(text for _, text in v))
        seen.add(ex.data_source)
    assert seen == {"demo_1hop", "demo_2hop", "demo_city"}


def test_demonstration_errors(passages, examples):
    ex = next(e for e in examples["train"] if e.data_source == "demo_2hop")
    name = PERSON_Q.match(ex.question).group(2)
    city = re.search(r"born in (\w+)\.", passages[name]).group(1)
    full = _exact_title_search(passages)

    def misses_city(query):
        return [d for d in full(query) if d[0] != city]

    with pytest.raises(DemonstrationUnavailable, match=rf"no passage titled '{city}'"):
        demonstrations(ex, misses_city)
    with pytest.raises(DemonstrationUnavailable, match=rf"'{name}'"):
        demonstrations(ex, lambda q: [])
    wrong = QAExample(ex.uid, ex.question, ["Atlantis"], ex.data_source)
    with pytest.raises(ValueError, match="golds"):
        demonstrations(wrong, full)
    other = QAExample("nq/1", "who wrote hamlet?", ["Shakespeare"], "nq")
    with pytest.raises(ValueError, match="Not a demo-task question"):
        demonstrations(other, full)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def demo_texts(passages, examples):
    texts = [f"{t}\n{x}" for t, x in passages.items()]
    search = _exact_title_search(passages, seed=2)
    for ex in examples["train"] + examples["test"]:
        texts.append(ex.question)
        segments = demonstrations(ex, search)
        texts += [text for _, text in segments]
        texts.append("".join(text for _, text in segments))
    return texts


def test_tokenizer_round_trips_and_keeps_tags_whole(paths, demo_texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(paths["tokenizer"] / "tokenizer.json"))
    assert 1000 <= tok.get_vocab_size() <= 2100
    tag_ids = {}
    for tag in TAGS + CHATML:
        ids = tok.encode(tag, add_special_tokens=False).ids
        assert len(ids) == 1, (tag, ids)
        tag_ids[tag] = ids[0]
    assert len(set(tag_ids.values())) == len(tag_ids)
    for text in demo_texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        for tag in TAGS:
            assert ids.count(tag_ids[tag]) == text.count(tag), (tag, text)
    # Tags are text, not specials: skipping special tokens keeps them, drops ChatML markers.
    ids = tok.encode("<|im_start|>assistant\n<answer> Oslo </answer><|im_end|>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<answer> Oslo </answer>"
    # Byte-level: text never seen in training still round-trips.
    odd = "Zürich, 東京 & naïve 🙂 <search>x</search>\t\n"
    assert tok.decode(tok.encode(odd).ids, skip_special_tokens=False) == odd


def test_tokenizer_loads_in_transformers(paths, demo_texts):
    import transformers
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(paths["tokenizer"] / "tokenizer.json"))
    tok = transformers.AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == raw.token_to_id("<|endoftext|>")
    assert len(tok) == raw.get_vocab_size()
    for text in demo_texts[-20:]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "In which city was X born?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>user\nIn which city was X born?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_demo_paths(paths):
    assert set(paths) == {"corpus", "train", "test", "tokenizer"}
    assert all(p.exists() for p in paths.values())
    assert (paths["tokenizer"] / "tokenizer_config.json").is_file()
