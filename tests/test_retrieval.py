"""Retrieval stack: corpus offsets, exact/ScaNN index vs brute force, index builder, LocalRetriever,
the Search-R1 HTTP API (server + client), and failure modes (dead or slow server)."""

import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import transformers

from tspo_jax.model import encoder as encoder_lib
from tspo_jax.retrieval import Doc, HttpRetriever, RetrieverError, format_docs, make_retriever
from tspo_jax.retrieval import index as index_lib
from tspo_jax.retrieval.build_index import build_index
from tspo_jax.retrieval.build_index import main as build_index_main
from tspo_jax.retrieval.corpus import Corpus, iter_passages
from tspo_jax.retrieval.local import LocalRetriever
from tspo_jax.retrieval.server import RetrievalServer


# ----------------------------------------------------------------------------- helpers


def vocab_words():
    with open(os.path.join(encoder_lib.default_encoder_path(), "vocab.txt")) as f:
        return [w.strip() for w in f if re.fullmatch(r"[a-z]{4,}", w.strip())]


def write_corpus(path, n, words_per_passage, seed):
    """wiki-18 style JSONL: quoted title line, then the passage text; ids are not line numbers."""
    rng, words = random.Random(seed), vocab_words()
    rows = []
    for i in range(n):
        title = '"' + " ".join(rng.choice(words).capitalize() for _ in range(2)) + '"'
        text = " ".join(rng.choice(words) for _ in range(words_per_passage))
        rows.append({"id": f"doc-{1000 + i}", "contents": f"{title}\n{text}"})
    rows[1]["contents"] += "\nsecond line of text, caf\u00e9 \u2013 \u6771\u4eac"  # multi-line, multi-byte
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps(row, ensure_ascii=i % 2 == 0) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are skipped, not passages
    return rows


def search_r1_passages2string(results):
    """Search-R1's _passages2string, re-typed here as the reference for format_docs."""
    out = ""
    for idx, item in enumerate(results):
        content = item["document"]["contents"]
        title = content.split("\n")[0]
        text = "\n".join(content.split("\n")[1:])
        out += f"Doc {idx + 1}(Title: {title}) {text}\n"
    return out


def clustered(rng, n, dim, clusters, noise):
    centers = rng.normal(size=(clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(queries, db, k):
    """Reference top-k: every score, one float32 dot product per (query, passage), full stable sort."""
    scores = np.array([[np.dot(q, x) for x in db] for q in queries], np.float32)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, 1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, payload, timeout=10):
    request = urllib.request.Request(
        url + "/retrieve",
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class StubServer:
    """A loopback server whose POST handler is `respond(handler, n_calls)`; for failure-mode tests."""

    def __init__(self, respond, port: int = 0):
        calls = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                calls.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                respond(self, len(calls))

            def log_message(self, *args):
                pass

        self.calls = calls
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(handler, status, payload):
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory):
    """30 short passages, real MiniLM, exact mode, e5-style prefixes (exercises the plumbing)."""
    root = tmp_path_factory.mktemp("minilm")
    rows = write_corpus(root / "corpus.jsonl", 30, 12, seed=0)
    manifest = build_index(
        str(root / "corpus.jsonl"),
        str(root / "index"),
        mode="exact",
        batch_size=16,
        query_prefix="query: ",
        passage_prefix="passage: ",
        progress=False,
    )
    return root / "index", rows, manifest


@pytest.fixture(scope="module")
def local(minilm_index):
    retriever = LocalRetriever(str(minilm_index[0]))
    yield retriever
    retriever.close()


@pytest.fixture(scope="module")
def server(local):
    srv = RetrievalServer(local, "127.0.0.1", 0, default_topk=3)
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A random 1-layer BERT over MiniLM's real tokenizer: fast enough to index hundreds of passages."""
    path = tmp_path_factory.mktemp("tiny_encoder")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(path, safe_serialization=True)
    shutil.copy(os.path.join(encoder_lib.default_encoder_path(), "tokenizer.json"), path / "tokenizer.json")
    return path


# ----------------------------------------------------------------------------- docs and corpus


def test_format_docs_matches_search_r1():
    contents = [
        '"Hamlet"\nHamlet is a tragedy by William Shakespeare.',
        "Title only, no newline",
        "T\nline one\nline two\n",
        "\ntext under an empty title",
    ]
    docs = [Doc.from_contents(str(i), c, 1.0 - i / 10) for i, c in enumerate(contents)]
    expected = search_r1_passages2string([{"document": {"contents": c}} for c in contents])
    assert format_docs(docs) == expected
    assert docs[0] == Doc(
        id="0", title='"Hamlet"', text="Hamlet is a tragedy by William Shakespeare.", score=1.0
    )
    assert format_docs([]) == ""


def test_corpus_offsets_read_back_every_line(tmp_path):
    rows = write_corpus(tmp_path / "c.jsonl", 12, 5, seed=1)
    found = list(iter_passages(str(tmp_path / "c.jsonl")))
    assert [r for _, _, r in found] == rows  # the blank line is skipped
    corpus = Corpus(str(tmp_path / "c.jsonl"), np.array([(o, n) for o, n, _ in found]))
    assert len(corpus) == 12
    assert [corpus[i] for i in (11, 1, 0, 4)] == [rows[11], rows[1], rows[0], rows[4]]


def test_corpus_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "0", "contents": "T\\nx"}\n{"id": "1", "text": "no contents"}\n')
    with pytest.raises(ValueError, match=r"line 2\).*contents"):
        list(iter_passages(str(bad)))
    bad.write_text('{"id": "0", "contents": "T\\nx"}\nnot json\n')
    with pytest.raises(ValueError, match=r"line 2\).*not valid JSON"):
        list(iter_passages(str(bad)))
    with pytest.raises(ValueError, match="does not exist"):
        list(iter_passages(str(tmp_path / "missing.jsonl")))


# ----------------------------------------------------------------------------- vector indexes


def test_exact_index_equals_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    db, queries = rng.normal(size=(1000, 24)).astype(np.float32), rng.normal(size=(37, 24)).astype(np.float32)
    index = index_lib.ExactIndex(db, block=300, query_block=16)  # several tiles: running top-k merge
    for k in (1, 10, 1000):
        ids, scores = index.search(queries, k)
        ref_ids, ref_scores = brute_force(queries, db, k)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
    index.save(str(tmp_path))
    loaded = index_lib.ExactIndex.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.search(queries, 10)[0], index.search(queries, 10)[0])
    with pytest.raises(ValueError, match="k must be in"):
        index.search(queries, 1001)
    with pytest.raises(ValueError, match="k must be in"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match=r"\[Q, 24\]"):
        index.search(queries[:, :5], 3)


def test_exact_index_breaks_ties_by_lower_id():
    # Duplicated passages: ties straddle the top-k cut and the block boundaries.
    db = np.array(
        [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.0]], np.float32
    )
    query = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    for block in (1, 2, 3, 7):
        ids, _ = index_lib.ExactIndex(db, block=block).search(query, 2)
        assert ids.tolist() == [[1, 3], [0, 2]]
        ids, _ = index_lib.ExactIndex(db, block=block).search(query, 5)
        assert ids.tolist() == [[1, 3, 4, 5, 6], [0, 2, 1, 3, 4]]
    # Many duplicates of 6 integer vectors (dot products exact in float32): large enough that
    # argpartition's arbitrary tie cut shows up, compared with a stable full sort.
    rng = np.random.default_rng(0)
    db = rng.integers(-3, 4, size=(6, 8)).astype(np.float32)[rng.integers(0, 6, 1000)]
    queries = rng.integers(-3, 4, size=(20, 8)).astype(np.float32)
    for block in (300, 1000):
        np.testing.assert_array_equal(
            index_lib.ExactIndex(db, block=block).search(queries, 10)[0], brute_force(queries, db, 10)[0]
        )


def test_scann_recall_against_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    db = clustered(rng, 20_000, 64, clusters=100, noise=0.8)
    queries = clustered(rng, 200, 64, clusters=100, noise=0.8)
    index = index_lib.ScannIndex.build(db)
    assert index.params == index_lib.scann_params_for(20_000)
    assert index.params["leaves_to_search"] < index.params["num_leaves"] / 3  # really approximate
    ids, scores = index.search(queries, 10)
    ref_ids = np.argsort(-(queries @ db.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref_ids)])
    assert recall >= 0.9, recall
    # Returned scores are exact inner products of the returned ids (float32 re-scoring).
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, db[ids]), atol=1e-5)
    # Serialised with relative paths: a moved directory still loads and answers the same.
    index.save(str(tmp_path / "a"))
    shutil.move(tmp_path / "a", tmp_path / "b")
    loaded = index_lib.ScannIndex.load(str(tmp_path / "b"), 20_000, 64, index.params)
    np.testing.assert_array_equal(loaded.search(queries, 10)[0], ids)


def test_scann_large_k_gives_k_real_neighbours():
    rng = np.random.default_rng(1)
    db = clustered(rng, 600, 16, clusters=10, noise=0.3)
    index = index_lib.ScannIndex.build(db)
    ids, scores = index.search(db[:5], 500)  # more than the searched leaves hold
    assert np.isfinite(scores).all() and all(len(set(row)) == 500 for row in ids)
    assert (ids >= 0).all() and (ids < 600).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_scann_refuses_tiny_corpora_and_auto_mode_picks_exact():
    with pytest.raises(ValueError, match="mode='exact'"):
        index_lib.ScannIndex.build(np.ones((100, 8), np.float32))
    assert index_lib.resolve_mode("auto", 5000) == "exact"
    assert index_lib.resolve_mode("auto", 10**6) == "scann"
    with pytest.raises(ValueError, match="mode="):
        index_lib.resolve_mode("faiss", 10)


# ----------------------------------------------------------------------------- builder + LocalRetriever


def test_local_retriever_finds_a_passage_from_its_own_text(minilm_index, local):
    index_dir, rows, manifest = minilm_index
    assert (manifest.count, manifest.dim, manifest.mode) == (30, 384, "exact")
    assert (manifest.query_prefix, manifest.passage_prefix, manifest.encoder) == (
        "query: ",
        "passage: ",
        "default",
    )
    assert sorted(os.listdir(index_dir)) == ["embeddings.npy", "manifest.json", "offsets.npy"]
    picks = [0, 1, 7, 29]
    queries = [rows[i]["contents"].split("\n", 1)[1] for i in picks]
    results = local.search(queries, 3)
    assert [r[0].id for r in results] == [rows[i]["id"] for i in picks]
    top = results[1][0]
    assert (top.title, top.text) == tuple(rows[1]["contents"].split("\n", 1))
    assert all(len(r) == 3 and r[0].score >= r[1].score >= r[2].score for r in results)


def test_local_scores_are_brute_force_over_the_encoder(minilm_index, local):
    index_dir, rows, _ = minilm_index
    model, tokenizer = local.encoder, local.tokenizer
    db = encoder_lib.encode(
        model, tokenizer, [r["contents"] for r in rows], batch_size=16, prefix="passage: "
    )
    np.testing.assert_allclose(np.load(index_dir / "embeddings.npy"), db, atol=1e-6)
    query = "capital city of france"
    q = encoder_lib.encode(model, tokenizer, [query], prefix="query: ")
    ref_ids, ref_scores = brute_force(q, db, 5)
    docs = local.search([query], 5)[0]
    assert [d.id for d in docs] == [rows[i]["id"] for i in ref_ids[0]]
    np.testing.assert_allclose([d.score for d in docs], ref_scores[0], atol=1e-5)


def test_scann_index_built_by_the_cli(tmp_path, tiny_encoder, capsys):
    rows = write_corpus(tmp_path / "c.jsonl", 400, 20, seed=3)
    build_index_main(
        [
            f"--corpus={tmp_path / 'c.jsonl'}",
            f"--out={tmp_path / 'idx'}",
            f"--encoder={tiny_encoder}",
            "--mode=scann",
            "--batch_size=128",
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(tmp_path / "idx"), "count": 400, "dim": 32, "mode": "scann"}
    assert sorted(os.listdir(tmp_path / "idx")) == ["manifest.json", "offsets.npy", "scann"]
    manifest = index_lib.IndexManifest.load(str(tmp_path / "idx"))
    assert (manifest.encoder, manifest.max_length, manifest.scann) == (
        str(tiny_encoder),
        64,
        index_lib.scann_params_for(400),
    )
    with make_retriever(str(tmp_path / "idx")) as retriever:
        assert isinstance(retriever, LocalRetriever)
        picks = [0, 1, 123, 399]
        results = retriever.search([rows[i]["contents"] for i in picks], 2)
    assert [r[0].id for r in results] == [rows[i]["id"] for i in picks]
    assert all(abs(r[0].score - 1.0) < 1e-4 for r in results)  # identical text: cosine 1


def test_builder_rejects_bad_inputs(tmp_path, tiny_encoder):
    corpus = tmp_path / "c.jsonl"
    write_corpus(corpus, 20, 5, seed=4)
    with pytest.raises(ValueError, match="mode='exact'"):
        build_index(str(corpus), str(tmp_path / "a"), encoder=str(tiny_encoder), mode="scann", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        build_index(str(corpus), str(tmp_path / "full"), encoder=str(tiny_encoder), progress=False)
    with open(corpus, "a") as f:
        f.write('{"id": "x", "title": "no contents"}\n')
    with pytest.raises(ValueError, match="line 22.*contents"):
        build_index(str(corpus), str(tmp_path / "b"), encoder=str(tiny_encoder), progress=False)


def test_local_retriever_errors(tmp_path, minilm_index, local):
    index_dir, rows, _ = minilm_index
    with pytest.raises(ValueError, match="does not exist"):
        LocalRetriever(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="manifest.json"):
        LocalRetriever(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(index_dir, broken)
    os.remove(broken / "offsets.npy")
    with pytest.raises(ValueError, match="offsets.npy"):
        LocalRetriever(str(broken))
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    with pytest.raises(ValueError, match="different file"):
        LocalRetriever(str(index_dir), corpus_path=str(moved))
    with pytest.raises(ValueError, match="exceeds the corpus size 30"):
        local.search(["q"], 31)
    with pytest.raises(ValueError, match="positive integer"):
        local.search(["q"], 0)
    with pytest.raises(ValueError, match="queries is empty"):
        local.search([], 3)
    with pytest.raises(ValueError, match="wrap it in a list"):
        local.search("a single string", 3)


def test_config_corpus_wins_over_a_moved_manifest_path(tmp_path, minilm_index, local):
    """A shared index cache (the demo's ~/.cache/tspo_jax/demo_index) names the absolute corpus path
    of the clone that built it; another clone must read it through its own config's corpus."""
    import ml_collections

    from tspo_jax import runtime

    index_dir, rows, _ = minilm_index
    cache = tmp_path / "cache_index"
    shutil.copytree(index_dir, cache)
    manifest = json.loads((cache / index_lib.MANIFEST).read_text())
    manifest["corpus"] = str(tmp_path / "deleted_clone" / "corpus.jsonl")
    (cache / index_lib.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not exist"):
        LocalRetriever(str(cache))
    here = tmp_path / "this_clone_corpus.jsonl"
    shutil.copyfile(index_dir.parent / "corpus.jsonl", here)
    cfg = ml_collections.ConfigDict(dict(spec="", corpus=str(here), index_dir=str(cache), mode="exact",
                                         timeout_s=5.0, retries=0))
    queries = [rows[3]["contents"], rows[17]["contents"]]
    with runtime.build_retriever(cfg, workdir=None) as moved:
        got = moved.search(queries, 3)
    want = local.search(queries, 3)
    assert [[d.id for d in r] for r in got] == [[d.id for d in r] for r in want]
    assert np.allclose([[d.score for d in r] for r in got], [[d.score for d in r] for r in want], atol=1e-6)


def test_make_retriever_dispatch(tmp_path):
    assert make_retriever("http://127.0.0.1:8000").url == "http://127.0.0.1:8000/retrieve"
    assert make_retriever("http://host:1/custom/retrieve").url == "http://host:1/custom/retrieve"
    with pytest.raises(ValueError, match="neither"):
        make_retriever(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="http://host:port"):
        HttpRetriever("ftp://x")


# ----------------------------------------------------------------------------- HTTP API


def test_http_round_trip_equals_local(server, local, minilm_index):
    rows = minilm_index[1]
    queries = [rows[2]["contents"].split("\n", 1)[1], "some unrelated question?", rows[1]["contents"]]
    remote = HttpRetriever(server.url, timeout_s=30, retries=0).search(queries, 4)
    assert remote == local.search(queries, 4)  # ids, titles, texts, and float scores survive JSON


def test_concurrent_clients_get_their_own_answers(server, local, minilm_index):
    rows = minilm_index[1]
    queries = [rows[i]["contents"].split("\n", 1)[1] for i in range(8)]
    answers = [None] * len(queries)

    def ask(i):
        answers[i] = HttpRetriever(server.url, timeout_s=30, retries=0).search([queries[i]], 2)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(queries))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [a[0].id for a in answers] == [rows[i]["id"] for i in range(8)]


def test_server_speaks_search_r1_json(server, local, minilm_index):
    rows = {r["id"]: r for r in minilm_index[1]}
    with_scores = post(server.url, {"queries": ["alpha", "beta"], "topk": 2, "return_scores": True})
    assert list(with_scores) == ["result"] and len(with_scores["result"]) == 2
    for hits, docs in zip(with_scores["result"], local.search(["alpha", "beta"], 2)):
        assert [h["document"] for h in hits] == [rows[d.id] for d in docs]  # the corpus row as stored
        assert [set(h) for h in hits] == [{"document", "score"}] * 2
        np.testing.assert_allclose([h["score"] for h in hits], [d.score for d in docs], atol=1e-6)
    bare = post(server.url, {"queries": ["alpha"], "topk": 2, "return_scores": False})
    assert bare == {"result": [[h["document"] for h in with_scores["result"][0]]]}
    default_k = post(server.url, {"queries": ["alpha"]})  # topk missing: server default, no scores
    assert len(default_k["result"][0]) == 3 and set(default_k["result"][0][0]) == {"id", "contents"}
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "count": 30, "mode": "exact"}


@pytest.mark.parametrize(
    "payload,message",
    [
        ({"queries": ["q"], "topk": 31}, "exceeds the corpus size"),
        ({"queries": ["q"], "topk": -2}, "positive integer"),
        ({"queries": "q", "topk": 3}, "JSON list of strings"),
        ({"queries": ["q", 5], "topk": 3}, r"queries\[1\]"),
    ],
)
def test_server_rejects_bad_requests_with_400(server, payload, message):
    with pytest.raises(urllib.error.HTTPError) as e:
        post(server.url, payload)
    assert e.value.code == 400 and re.search(message, json.loads(e.value.read())["error"])


def test_server_answers_search_r1s_empty_batch(server):
    """Search-R1's trainer posts every turn, also when no row searched: exactly its request, by
    `requests` as its generation.py sends it, must get 200 {"result": []} (Search-R1's answer)."""
    import requests

    payload = {"queries": [], "topk": 3, "return_scores": True}
    response = requests.post(server.url + "/retrieve", json=payload, timeout=10)
    assert response.status_code == 200 and response.json() == {"result": []}
    assert post(server.url, {"queries": [], "topk": 3, "return_scores": False}) == {"result": []}
    # A non-empty request right after still works.
    assert len(post(server.url, {"queries": ["alpha"], "topk": 3, "return_scores": True})["result"]) == 1


def test_client_reports_server_rejection_without_retrying(server):
    client = HttpRetriever(server.url, timeout_s=30, retries=3)
    with pytest.raises(RetrieverError, match=r"HTTP 400.*exceeds the corpus size"):
        client.search(["q"], 100)
    with pytest.raises(ValueError, match="queries is empty"):
        client.search([], 3)


def test_dead_server_raises_retriever_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = HttpRetriever(url, timeout_s=0.5, retries=1, backoff_s=0.01, max_outage_s=0)
    with pytest.raises(RetrieverError) as e:
        client.search(["q"], 3)
    message = str(e.value)
    assert url in message and "0.5s timeout" in message and "2 attempt" in message
    assert "tspo_jax.retrieval.server" in message  # the fix


def test_slow_server_times_out_with_retriever_error():
    release = threading.Event()
    stub = StubServer(lambda handler, n: release.wait(30))  # never answers in time
    try:
        client = HttpRetriever(stub.url, timeout_s=0.5, retries=1, backoff_s=0.01, max_outage_s=0)
        with pytest.raises(RetrieverError, match=r"after 2 attempt\(s\) with a 0.5s timeout.*[Tt]imeout"):
            client.search(["q"], 3)
        assert len(stub.calls) == 2
    finally:
        release.set()
        stub.close()


def test_client_retries_transient_errors_and_reads_search_r1_variants():
    hit = {"document": {"id": "7", "contents": '"T"\nbody', "title": "T", "text": "body"}, "score": 0.5}

    def respond(handler, n):
        if n == 1:
            reply(handler, 503, {"error": "warming up"})
        else:
            reply(handler, 200, {"result": [[hit, {"id": "8", "title": "Only", "text": "fields"}]]})

    stub = StubServer(respond)
    try:
        docs = HttpRetriever(stub.url, timeout_s=5, retries=1, backoff_s=0.01).search(["q"], 2)
        assert stub.calls[-1] == {"queries": ["q"], "topk": 2, "return_scores": True}
        assert docs[0][0] == Doc(id="7", title='"T"', text="body", score=0.5)
        assert (docs[0][1].id, docs[0][1].title, docs[0][1].text) == ("8", "Only", "fields")
        assert np.isnan(docs[0][1].score)
    finally:
        stub.close()


def test_client_rejects_malformed_replies():
    replies = iter([{"result": []}, {"oops": 1}, {"result": [[{"document": {"id": "1"}}]]}])
    stub = StubServer(lambda handler, n: reply(handler, 200, next(replies)))
    try:
        client = HttpRetriever(stub.url, timeout_s=5, retries=0)
        with pytest.raises(RetrieverError, match="0 result lists for 1 queries"):
            client.search(["q"], 1)
        with pytest.raises(RetrieverError, match="expected"):
            client.search(["q"], 1)
        with pytest.raises(RetrieverError, match="neither 'contents'"):
            client.search(["q"], 1)
    finally:
        stub.close()


def test_client_waits_out_a_server_restart(caplog):
    """Connections are refused for 3 s (the server is restarting), then it answers: the search
    succeeds, each wait is logged, and nothing is raised."""
    port = free_port()
    hit = {"document": {"id": "1", "contents": "T\nbody"}, "score": 1.0}
    started = {}

    def start_later():
        time.sleep(3.0)
        started["stub"] = StubServer(lambda handler, n: reply(handler, 200, {"result": [[hit]]}), port=port)

    threading.Thread(target=start_later, daemon=True).start()
    client = HttpRetriever(f"http://127.0.0.1:{port}", timeout_s=2, retries=1, backoff_s=0.2, max_outage_s=60)
    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="tspo_jax.retrieval.client"):
            docs = client.search(["q"], 1)
    finally:
        for _ in range(50):
            if "stub" in started:
                break
            time.sleep(0.1)
        started["stub"].close()
    assert docs[0][0].id == "1"
    assert 3.0 <= time.monotonic() - t0 < 30.0
    waits = [r for r in caplog.records if "retrying in" in r.getMessage()]
    assert waits and all("max_outage_s=60" in r.getMessage() for r in waits)


def test_outage_longer_than_max_outage_s_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing ever listens there
    client = HttpRetriever(url, timeout_s=0.5, retries=0, backoff_s=0.05, max_outage_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(RetrieverError, match=r"attempt\(s\) over \d+s .*max_outage_s"):
        client.search(["q"], 3)
    assert 1.0 <= time.monotonic() - t0 < 10.0
