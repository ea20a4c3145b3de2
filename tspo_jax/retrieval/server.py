"""HTTP retrieval server speaking Search-R1's API, stdlib only.

    python -m tspo_jax.retrieval.server --index=DIR --host=127.0.0.1 --port=8000 [--topk=3]

POST /retrieve {"queries": [...], "topk": 3, "return_scores": true}
  -> {"result": [[{"document": {"id": ..., "contents": "Title\\ntext"}, "score": 0.83}, ...], ...]}
  (with return_scores false: {"result": [[{"id": ..., "contents": ...}, ...], ...]})
  An empty "queries" list gets {"result": []}, as from Search-R1's server: Search-R1's trainer
  posts one request every turn, also when no row searched.
GET /health -> {"status": "ok", "count": N, "mode": "exact"|"scann"}
Bad requests get HTTP 400 with {"error": message}.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tspo_jax.retrieval.base import Retriever, check_request

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 16 << 20


def _rows(retriever: Retriever, queries: list[str], topk: int) -> list[list[tuple[dict, float]]]:
    """Corpus rows as stored when the retriever has them (LocalRetriever), else rebuilt from Docs."""
    if hasattr(retriever, "search_rows"):
        return retriever.search_rows(queries, topk)
    return [
        [({"id": d.id, "contents": f"{d.title}\n{d.text}"}, d.score) for d in docs]
        for docs in retriever.search(queries, topk)
    ]


class _Handler(BaseHTTPRequestHandler):
    server: RetrievalServer

    def _send(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok", **self.server.info})
        else:
            self._send(404, {"error": f"unknown path {self.path}; use POST /retrieve or GET /health"})

    def do_POST(self):
        if self.path.rstrip("/") != "/retrieve":
            self._send(404, {"error": f"unknown path {self.path}; use POST /retrieve"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._send(
                400 if length <= 0 else 413,
                {"error": f"need a JSON body of 1..{MAX_BODY_BYTES} bytes with Content-Length"},
            )
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object {queries, topk, return_scores}")
            queries = request.get("queries")
            topk = request.get("topk") or self.server.default_topk  # Search-R1: missing/0 -> default
            return_scores = bool(request.get("return_scores", False))
            if not isinstance(queries, list):
                raise ValueError('"queries" must be a JSON list of strings')
            if not queries:  # nothing to search: Search-R1's server answers with no results
                self._send(200, {"result": []})
                return
            check_request(queries, topk, self.server.count)
            with self.server.lock:  # one search at a time: bounded memory, no jit races
                rows = _rows(self.server.retriever, queries, topk)
        except ValueError as e:  # JSONDecodeError included
            self._send(400, {"error": str(e)})
            return
        except Exception as e:  # noqa: BLE001 -- report, keep serving
            log.exception("retrieval failed")
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
            return
        if return_scores:
            result = [[{"document": row, "score": score} for row, score in hits] for hits in rows]
        else:
            result = [[row for row, _ in hits] for hits in rows]
        self._send(200, {"result": result})

    def log_message(self, fmt, *args):  # per-request lines at debug level, not on stderr
        log.debug("%s " + fmt, self.address_string(), *args)


class RetrievalServer(ThreadingHTTPServer):
    """Serves `retriever` on (host, port); port 0 picks a free one (see .url)."""

    daemon_threads = True  # a stuck client never blocks shutdown

    def __init__(
        self, retriever: Retriever, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3
    ):
        super().__init__((host, port), _Handler)
        self.retriever, self.default_topk, self.lock = retriever, default_topk, threading.Lock()
        self.count = getattr(retriever, "count", None)
        manifest = getattr(retriever, "manifest", None)
        self.info = {"count": self.count, "mode": getattr(manifest, "mode", None)}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serves in a daemon thread (tests, notebooks); stop with shutdown() then server_close()."""
        thread = threading.Thread(target=self.serve_forever, name="retrieval-server", daemon=True)
        thread.start()
        return thread


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index directory from tspo_jax.retrieval.build_index")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--topk", type=int, default=3, help="documents per query when a request gives no topk")
    p.add_argument("--corpus", default=None, help="corpus JSONL, if it moved since the index was built")
    p.add_argument("--encoder", default=None, help="encoder directory, if it moved since the index was built")
    p.add_argument("--batch_size", type=int, default=64, help="queries per encoder batch")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tspo_jax.retrieval.local import LocalRetriever  # heavy (JAX, ScaNN): only when serving

    retriever = LocalRetriever(
        args.index, corpus_path=args.corpus, encoder_path=args.encoder, batch_size=args.batch_size
    )
    retriever.search(["warm-up query"], 1)  # compile the short-query program before the first client
    server = RetrievalServer(retriever, args.host, args.port, default_topk=args.topk)
    log.info("serving %d passages (%s) on %s/retrieve", retriever.count, retriever.manifest.mode, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
