"""HTTP client for a Search-R1 style retrieval server (ours or Search-R1's own retrieval_server.py)."""

from __future__ import annotations

import http.client
import json
import logging
import math
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from tspo_jax.retrieval.base import Doc, Retriever, RetrieverError, check_request

log = logging.getLogger(__name__)
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}
_RETRY_STATUS = {429, 500, 502, 503, 504}


def retrieve_url(url: str) -> str:
    """'http://host:port' -> 'http://host:port/retrieve'; a URL with a path is kept as given."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"Retriever URL {url!r} must look like http://host:port (optionally ending in /retrieve)."
        )
    if parts.path in ("", "/"):
        parts = parts._replace(path="/retrieve")
    return urllib.parse.urlunsplit(parts)


def _doc(item, where: str) -> Doc:
    """One result entry -> Doc; accepts {"document": row, "score": s} and bare rows."""
    if not isinstance(item, dict):
        raise RetrieverError(f"{where}: expected a JSON object, got {type(item).__name__}.")
    row, score = (item["document"], item.get("score", math.nan)) if "document" in item else (item, math.nan)
    if not isinstance(row, dict):
        raise RetrieverError(f"{where}: 'document' is not a JSON object.")
    doc_id = str(row.get("id", row.get("docid", "")))
    if isinstance(row.get("contents"), str):
        return Doc.from_contents(doc_id, row["contents"], score)
    if isinstance(row.get("title"), str) and isinstance(row.get("text"), str):
        return Doc(id=doc_id, title=row["title"], text=row["text"], score=float(score))
    raise RetrieverError(f"{where}: document has neither 'contents' nor 'title'+'text': {str(row)[:200]}")


class HttpRetriever(Retriever):
    """POSTs {queries, topk, return_scores: true} to `url`.

    Each attempt waits at most `timeout_s` per socket operation. A failed attempt is retried
    `retries` times with a short growing pause; after that, an outage is waited out with
    exponential backoff and jitter (each wait logged) until `max_outage_s` have passed since the
    first failure, so a retrieval server restart does not end a multi-day run. Jitter keeps the
    hosts of a pod from hammering a recovering server in lockstep."""

    MAX_WAIT_S = 30.0  # the longest single pause while waiting out an outage

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5,
                 max_outage_s: float = 600.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}.")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}.")
        if max_outage_s < 0:
            raise ValueError(f"max_outage_s must be >= 0, got {max_outage_s}.")
        self.url = retrieve_url(url)
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self.max_outage_s = float(max_outage_s)
        host = urllib.parse.urlsplit(self.url).hostname
        # A loopback server never sits behind the user's HTTP proxy.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    def _fail(self, attempts: int, outage_s: float, why: str) -> RetrieverError:
        waited = f" over {outage_s:.0f}s" if self.max_outage_s else ""
        return RetrieverError(
            f"Retriever at {self.url} failed after {attempts} attempt(s){waited} with a {self.timeout_s:g}s timeout: "
            f"{why}. Check that the server is up and reachable (start one with `python -m tspo_jax.retrieval.server "
            "--index=DIR --port=PORT`), or raise retriever.timeout_s / retriever.max_outage_s if it is only slow."
        )

    def _pause(self, attempts: int, first_failure: float) -> float | None:
        """Seconds to wait before the next attempt, or None when the outage budget is spent."""
        if attempts <= self.retries:
            return self.backoff_s * attempts
        outage = time.monotonic() - first_failure
        if outage >= self.max_outage_s:
            return None
        n = attempts - self.retries
        wait = min(self.MAX_WAIT_S, self.backoff_s * 2.0**n) * random.uniform(0.5, 1.0)
        return min(wait, self.max_outage_s - outage)

    def _post(self, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        attempts, why, first_failure = 0, "", None
        while True:
            if attempts:
                pause = self._pause(attempts, first_failure)
                if pause is None:
                    raise self._fail(attempts, time.monotonic() - first_failure, why)
                if attempts > self.retries:
                    log.warning("retriever at %s is unavailable (%s); retrying in %.1fs (outage so far %.0fs of "
                                "retriever.max_outage_s=%.0fs)", self.url, why, pause,
                                time.monotonic() - first_failure, self.max_outage_s)
                time.sleep(pause)
            attempts += 1
            request = urllib.request.Request(
                self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                why = f"HTTP {e.code}: {detail}"
                if e.code in _RETRY_STATUS:
                    first_failure = first_failure or time.monotonic()
                    continue
                raise RetrieverError(
                    f"Retriever at {self.url} rejected the request (HTTP {e.code}): {detail}"
                ) from e
            except (
                urllib.error.URLError,
                TimeoutError,
                socket.timeout,
                ConnectionError,
                http.client.HTTPException,
                OSError,
            ) as e:
                reason = getattr(e, "reason", e)
                why = f"{type(reason).__name__}: {reason}"
                first_failure = first_failure or time.monotonic()
                continue
            if attempts > 1:
                log.info("retriever at %s answered again after %d attempt(s)", self.url, attempts)
            try:
                return json.loads(raw)
            except json.JSONDecodeError as e:
                raise RetrieverError(f"Retriever at {self.url} answered with non-JSON: {raw[:200]!r}") from e

    def search(self, queries: list[str], topk: int) -> list[list[Doc]]:
        check_request(queries, topk)
        reply = self._post({"queries": list(queries), "topk": topk, "return_scores": True})
        result = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            got = f"{len(result)} result lists" if isinstance(result, list) else f"{str(reply)[:200]}"
            raise RetrieverError(
                f"Retriever at {self.url} sent {got} for {len(queries)} queries; expected "
                '{"result": [[...], ...]} with one list per query.'
            )
        docs = []
        for q, hits in enumerate(result):
            if not isinstance(hits, list):
                raise RetrieverError(f"Retriever at {self.url}: result[{q}] is not a list.")
            if not hits:
                log.warning("Retriever at %s returned no documents for query %r.", self.url, queries[q])
            docs.append(
                [_doc(item, f"Retriever at {self.url}: result[{q}][{j}]") for j, item in enumerate(hits)]
            )
        return docs
