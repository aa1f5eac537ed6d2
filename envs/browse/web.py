"""The offline website: an aiohttp app over one corpus, its BM25 search, and a server shared per process.

Owns:
  * ``SearchIndex`` -- BM25 (the ``bm25s`` library) over titles and over texts, summed with the
    title weighted x2, with a snippet around the first query term.
  * ``make_app`` -- routes ``GET /page/<docid>`` (the page's HTML; 404 for unknown docids),
    ``GET /page?url=<original url>`` (302 to the page of the document with that original URL) and
    ``GET /search?q=<query>&k=<n>`` (JSON ``{"query", "results": [{"url", "title", "snippet",
    "score"}]}``; 400 with ``{"error"}`` for an empty or over-long query).
  * ``Site`` -- the app served on a free port of 127.0.0.1 by a background thread with its own event
    loop; ``site(corpus)`` returns this process's one ``Site`` per corpus, started on first use and
    stopped at exit (or by ``stop()``).

Does not own: loading documents (envs.browse.corpus), what an agent sees of a page (envs.browse.env).
Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import atexit
import re
import threading
from dataclasses import dataclass

import bm25s
import numpy as np
from aiohttp import web

from envs.browse.corpus import Document, load_corpus

MAX_QUERY_CHARS, MAX_K = 500, 50
_WORD = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class Hit:
    doc: Document
    score: float
    snippet: str


class SearchIndex:
    """BM25F-style search: BM25 over titles (weight ``title_weight``) plus BM25 over texts, so a page
    whose title matches outranks a page that only mentions it. ``search`` returns at most ``k`` hits
    with a positive score, best first."""

    def __init__(self, docs: tuple[Document, ...], title_weight: float = 2.0):
        self.docs, self.title_weight = docs, title_weight
        self.fields = [_bm25([d.title for d in docs]), _bm25([d.text for d in docs])]

    def search(self, query: str, k: int = 5) -> list[Hit]:
        words = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        scores = np.zeros(len(self.docs))
        for weight, (bm25, vocab) in zip((self.title_weight, 1.0), self.fields):
            known = [w for w in words if w in vocab]
            if known:
                scores += weight * bm25.get_scores(known)
        best = [int(i) for i in np.argsort(-scores, kind="stable")[:k] if scores[i] > 0]
        return [Hit(self.docs[i], float(scores[i]), _snippet(self.docs[i].text, words)) for i in best]


def _bm25(texts: list[str]) -> tuple[bm25s.BM25, set[str]]:
    bm25 = bm25s.BM25()
    bm25.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    return bm25, set(bm25.vocab_dict)


def _snippet(text: str, words: list[str], width: int = 220) -> str:
    low = text.lower()
    at = min((m.start() for w in words for m in [re.search(rf"\b{re.escape(w)}", low)] if m), default=0)
    start = max(0, at - width // 3)
    out = re.sub(r"\s+", " ", text[start:start + width]).strip()
    return ("…" if start else "") + out + ("…" if start + width < len(text) else "")


def make_app(docs: tuple[Document, ...]) -> web.Application:
    index = SearchIndex(docs)
    by_id = {d.docid: d for d in docs}
    by_url = {d.url: d for d in docs if d.url}

    async def page(request: web.Request) -> web.Response:
        doc = by_id.get(request.match_info["docid"])
        if doc is None:
            raise web.HTTPNotFound(text=f"no page {request.path}")
        return web.Response(text=doc.html, content_type="text/html")

    async def page_by_url(request: web.Request) -> web.Response:
        doc = by_url.get(request.query.get("url", "").strip())
        if doc is None:
            raise web.HTTPNotFound(text="no page with that address on this site")
        raise web.HTTPFound(doc.path)

    async def search(request: web.Request) -> web.Response:
        query = request.query.get("q", "").strip()
        if not query or len(query) > MAX_QUERY_CHARS:
            return web.json_response({"error": f"the query must have 1 to {MAX_QUERY_CHARS} characters"}, status=400)
        try:
            k = min(max(int(request.query.get("k", 5)), 1), MAX_K)
        except ValueError:
            return web.json_response({"error": "k must be an integer"}, status=400)
        hits = await asyncio.to_thread(index.search, query, k)
        return web.json_response({"query": query, "results": [
            {"url": h.doc.path, "title": h.doc.title, "snippet": h.snippet, "score": round(h.score, 4)} for h in hits]})

    app = web.Application()
    app.router.add_get("/search", search)
    app.router.add_get("/page", page_by_url)
    app.router.add_get("/page/{docid:.+}", page)
    return app


class Site:
    """A running offline website. ``base_url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self, docs: tuple[Document, ...]):
        self.docs = docs
        self._app = make_app(docs)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(self._app, access_log=None)
        started = threading.Event()
        self._error: BaseException | None = None

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as e:  # reported to the caller below
                self._error = e
                started.set()
                return
            started.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="browse-site", daemon=True)
        self._thread.start()
        started.wait()
        if self._error is not None:
            raise RuntimeError(f"the offline site did not start: {self._error}") from self._error

    async def _start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop serving (idempotent); the port is closed when this returns."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()


_SITES: dict[str, Site] = {}
_LOCK = threading.Lock()


def site(corpus: str = "world") -> Site:
    """This process's running site for ``corpus`` (see envs.browse.corpus.load_corpus), started on first use."""
    with _LOCK:
        s = _SITES.get(corpus)
        if s is None or not s.running:
            s = _SITES[corpus] = Site(load_corpus(corpus))
        return s


@atexit.register
def _stop_all() -> None:
    for s in list(_SITES.values()):
        s.stop()
