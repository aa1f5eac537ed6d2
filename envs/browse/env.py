"""``BrowseEnv``: answer questions by searching and reading an offline website over real HTTP.

Tools (async, each one HTTP request to the process's shared site, envs.browse.web): ``search(query)``,
``open(url, page)`` (a page as text, links as ``[label](url)``, long pages in parts of ``page_chars``
with a marker naming the next part), ``find(pattern)`` (lines of the open page that contain a text,
with their part) and ``answer(text)``. Unknown URLs, other hosts, empty or over-long queries and
pages past the last part are errors, which the base class turns into ``Error: ...`` observations.

Ending an episode. In ``ToolEnv`` a turn without a tool call is the final answer; that still works
here. ``answer(text)`` calls ``ToolEnv.end_episode(text)``: the episode ends in that same turn,
terminated, final reward = ``reward_fn(task, history, text)``, exactly what a plain final answer with
that text would get. Tools called after ``answer`` in the same turn are refused by the base class.

Reward: SQuAD exact match (``metric="em"``, default) or token F1 against the gold answers, or a
judge ``"module:function"`` / callable ``(question, golds, prediction) -> float``.
``episode_metrics`` gives em, f1, searches and distinct pages opened; ``demonstration`` is the
scripted reference: search the first evidence page's title, open every evidence page, ``find``
where the question names a pattern, answer the gold.

Does not own: corpora and questions (envs.browse.corpus), serving and search (envs.browse.web),
scoring (envs.browse.score).
"""

from __future__ import annotations

import importlib
import json
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import yarl

from agentrl.env import Task, ToolEnv, tool
from envs.browse.corpus import html_to_text, load_corpus, load_questions, page_path
from envs.browse.score import Judge, exact_match, f1
from envs.browse.web import MAX_QUERY_CHARS, Site, site

SYSTEM_PROMPT = ("You answer questions by browsing an offline encyclopaedia. Use search to find pages, open to "
                 "read one (long pages come in parts), find to locate a text on the open page, and answer to give "
                 "the final answer: as short as possible, a name, a year or a few words.")


def _call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def paginate(text: str, size: int) -> list[str]:
    """Consecutive parts of at most ``size`` characters, cut after a line end where one falls in
    the part (else inside the line); ``"".join(parts) == text``."""
    parts, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size)
        end = cut + 1 if cut > start else start + size
        parts.append(text[start:end])
        start = end
    return parts + [text[start:]]


class BrowseEnv(ToolEnv):
    """Args:
        corpus: "world" (shipped), a documents JSONL (BrowseComp-Plus style) or a directory of HTML.
        questions: a queries JSONL; default the shipped questions when corpus is "world".
        split: "all", or only the questions whose ``split`` field is "train" / "test".
        metric: the reward without a judge: "em" or "f1".
        judge: ``"module:function"`` or callable ``(question, golds, prediction) -> float``.
        page_chars: characters per part of a long page; search_k: results per search.
    """

    system_prompt = SYSTEM_PROMPT

    def __init__(self, corpus: str = "world", questions: str | None = None, split: str = "all",
                 metric: Literal["em", "f1"] = "em", judge: str | Judge | None = None, page_chars: int = 3000,
                 search_k: int = 5, http_timeout: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if questions is None and corpus != "world":
            raise ValueError("give `questions` (a queries JSONL) for a corpus other than 'world'")
        if metric not in ("em", "f1") or page_chars < 200 or not 1 <= search_k <= 50:
            raise ValueError("metric must be 'em' or 'f1', page_chars >= 200 and search_k in 1..50")
        self.corpus, self.metric, self.page_chars, self.search_k = corpus, metric, page_chars, search_k
        self.http_timeout = http_timeout
        self.judge = _resolve_judge(judge) if judge is not None else None
        self.docs = {d.docid: d for d in load_corpus(corpus)}
        qs = load_questions(questions or "world")
        self.questions = [q for q in qs if split == "all" or q.split == split]
        if not self.questions:
            raise ValueError(f"no questions in split {split!r}")
        missing = sorted({e for q in self.questions for e in q.evidence} - set(self.docs))
        if missing:
            raise ValueError(f"evidence docids not in the corpus: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self._by_id = {q.id: q for q in self.questions}
        self.tools = [tool(self.search), tool(self.open), tool(self.find), tool(self.answer)]
        self._site: Site | None = None
        self._new_episode()

    def _new_episode(self) -> None:
        self.searches, self.opened, self.log = 0, set(), []
        self._page: tuple[str, str, list[str]] | None = None  # (path, title, parts)

    # ---------------------------------------------------------------------------------- tasks
    def num_tasks(self) -> int:
        return len(self.questions)

    def task(self, rng, options) -> Task:
        i = options.get("task_index")
        i = int(rng.integers(len(self.questions))) if i is None else int(i)
        if not 0 <= i < len(self.questions):
            raise IndexError(f"task_index {i} not in range({len(self.questions)})")
        q = self.questions[i]
        self._site = site(self.corpus)
        self._new_episode()
        return Task(messages=[{"role": "user", "content": q.question}], answer=list(q.answers), id=q.id,
                    info={"question": q.question, "evidence": [page_path(e) for e in q.evidence]})

    def demonstration(self, task: Task) -> list[str]:
        q = self._by_id[task.id]
        turns = [_call("search", query=self.docs[q.evidence[0]].title if q.evidence else q.question)]
        turns += [_call("open", url=page_path(e)) for e in q.evidence]
        turns += [_call("find", pattern=q.find)] if q.find else []
        return turns + [_call("answer", text=q.answers[0])]

    # ---------------------------------------------------------------------------------- tools
    async def search(self, query: str) -> str:
        """Search the offline encyclopaedia; returns the best matching pages with their URLs.

        Args:
            query: A few keywords, e.g. "Kelmo Works founder".
        """
        self.searches += 1
        if not query.strip() or len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"the query must have 1 to {MAX_QUERY_CHARS} characters")
        status, _, body = await self._get("/search", {"q": query, "k": str(self.search_k)})
        data = json.loads(body)
        if status != 200:
            raise ValueError(data.get("error", f"search failed (HTTP {status})"))
        self.log.append(f"search {query!r}: {[r['url'] for r in data['results']]}")
        if not data["results"]:
            return f'No results for "{query}". Try other keywords.'
        return "\n".join(f"{n}. {r['title']}\n   URL: {r['url']}\n   {r['snippet']}"
                         for n, r in enumerate(data["results"], 1))

    async def open(self, url: str, page: int = 1) -> str:
        """Open a page (a URL from the search results or from a link) and show one part of it.

        Args:
            url: The page's URL, e.g. "/page/kelmo-works".
            page: Which part of a long page to show, starting at 1.
        """
        path, params = self._site_path(url)
        status, final, body = await self._get(path, params)
        if status == 404:
            raise LookupError(f"no page at {url!r}; open URLs from search results or page links")
        if status != 200:
            raise RuntimeError(f"HTTP {status} for {url!r}")
        title, text = html_to_text(body, base=final)
        parts = paginate(text, self.page_chars)
        if not 1 <= page <= len(parts):
            raise ValueError(f"{final} has {len(parts)} part{'s' * (len(parts) > 1)}; page must be 1..{len(parts)}")
        self._page = (final, title, parts)
        self.opened.add(final)
        self.log.append(f"open {final} page {page}/{len(parts)}")
        more = (f"\n\n[part {page} of {len(parts)}; open(url=\"{final}\", page={page + 1}) shows the next part]"
                if page < len(parts) else "")
        return f"Title: {title}\nURL: {final} (part {page} of {len(parts)})\n\n{parts[page - 1]}{more}"

    async def find(self, pattern: str) -> str:
        """Find a text on the open page (in all its parts): the lines that contain it, and their part.

        Args:
            pattern: The text to look for (case-insensitive), e.g. "founded in".
        """
        if self._page is None:
            raise RuntimeError("no page is open; call open first")
        if not pattern.strip():
            raise ValueError("the pattern is empty")
        path, _, parts = self._page
        needle = pattern.strip().lower()
        hits = [(n, line.strip()) for n, part in enumerate(parts, 1) for line in part.split("\n")
                if needle in line.lower()]
        self.log.append(f"find {pattern!r} on {path}: {len(hits)}")
        if not hits:
            return f'No line of {path} contains "{pattern}".'
        shown = "\n".join(f"[part {n}] {_around(line, needle)}" for n, line in hits[:10])
        return f'{len(hits)} line(s) of {path} contain "{pattern}":\n{shown}' + (
            f"\n…and {len(hits) - 10} more" if len(hits) > 10 else "")

    async def answer(self, text: str) -> str:
        """Give the final answer. This ends the episode.

        Args:
            text: The answer, as short as possible: a name, a year or a few words.
        """
        self.end_episode(text.strip())
        self.log.append(f"answer {text.strip()!r}")
        return f"Answer recorded: {text.strip()}"

    # ------------------------------------------------------------------------ episode, reward
    def reward(self, task: Task, history, final_text: str) -> float:
        if self.judge is not None:
            return float(self.judge(task.info["question"], task.answer, final_text))
        return (exact_match if self.metric == "em" else f1)(final_text, task.answer)

    def episode_metrics(self) -> dict[str, float]:
        golds = self.current_task.answer if self.current_task else []
        prediction = self.final_text
        return {"em": exact_match(prediction, golds) if prediction is not None else 0.0,
                "f1": f1(prediction, golds) if prediction is not None else 0.0,
                "searches": float(self.searches), "pages_opened": float(len(self.opened))}

    def episode_artifacts(self) -> dict[str, str]:
        return {"browse_log.txt": "\n".join(self.log) + "\n"}

    # ------------------------------------------------------------------------------- internals
    def _site_path(self, url: str) -> tuple[str, dict[str, str] | None]:
        """(request path, query params) on the site for a URL given by the model."""
        url = url.strip()
        parts = urlsplit(url)
        if parts.scheme in ("http", "https"):
            if parts.hostname in ("127.0.0.1", "localhost") and parts.port == self._site.port:
                url = parts.path
            else:  # a document's original address, if the corpus knows it
                return "/page", {"url": url}
        elif parts.scheme or not url:
            raise ValueError(f"cannot open {url!r}: only pages of the offline site (URLs like /page/...)")
        path = urlsplit(url).path
        path = path if path.startswith("/") else ("/" + path if path.startswith("page/") else "/page/" + path)
        if not path.startswith("/page/"):
            raise LookupError(f"no page at {url!r}; open URLs from search results or page links")
        return quote(unquote(path), safe="/-_.~"), None

    async def _get(self, path: str, params: dict[str, str] | None) -> tuple[int, str, str]:
        """(status, final path after redirects, body) of one GET on the site."""
        target = yarl.URL(self._site.base_url + path, encoded=True)
        if params:
            target = target.with_query(params)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.http_timeout)) as session:
            async with session.get(target) as r:
                return r.status, r.url.raw_path, await r.text()


def _around(line: str, needle: str, width: int = 300) -> str:
    at = line.lower().find(needle)
    start = max(0, at - width // 3)
    return ("…" if start else "") + line[start:start + width] + ("…" if start + width < len(line) else "")


def _resolve_judge(judge: str | Judge) -> Judge:
    if isinstance(judge, str):
        module, _, name = judge.partition(":")
        if not module or not name:
            raise ValueError(f"judge {judge!r} must look like 'module.path:function'")
        judge = getattr(importlib.import_module(module), name)
    if not callable(judge):
        raise TypeError(f"judge must be callable (question, golds, prediction) -> float, got {judge!r}")
    return judge
