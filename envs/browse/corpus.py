"""Corpora and question sets of the browsing env: what pages exist and what is asked about them.

Owns:
  * ``Document`` / ``Question`` -- one page (docid, title, plain text for the index, the HTML served)
    and one question (gold answers, evidence docids in hop order).
  * ``load_corpus`` -- ``"world"`` (the shipped encyclopaedia, envs.browse.world), a BrowseComp-Plus
    style documents JSONL (``docid``, ``text``, optional ``title`` and ``url``; markdown links
    ``[label](target)`` become HTML links) or a directory of ``.html`` files (docid = the relative
    path, so relative links between files keep working when served under ``/page/``).
  * ``load_questions`` -- a queries JSONL (``query_id``, ``query``, ``answer`` (text or list of
    aliases), ``evidence_docids`` or BrowseComp-Plus ``evidence_docs`` / ``gold_docs``; optional
    ``find`` and ``split``).
  * ``html_to_text`` -- what a browser would show: headings, paragraphs, list items and links as
    ``[label](absolute path)``; script/style dropped.

Does not own: serving or searching (envs.browse.web), tools and rewards (envs.browse.env).
"""

from __future__ import annotations

import functools
import html
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

from envs.browse import world

_LINK = re.compile(r"\[([^\[\]\n]+)\]\(([^()\s]+)\)")
_HEADING = re.compile(r"^(={2,4})\s*(.+?)\s*\1$")


@dataclass(frozen=True)
class Document:
    """``url``: the document's original address (None for local files); pages are served at
    ``/page/<docid>``."""

    docid: str
    title: str
    text: str
    html: str
    url: str | None = None

    @property
    def path(self) -> str:
        return page_path(self.docid)


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answers: tuple[str, ...]
    evidence: tuple[str, ...]
    find: str | None = None
    split: str | None = None


def page_path(docid: str) -> str:
    return "/page/" + quote(docid, safe="/-_.~")


@functools.cache
def load_corpus(spec: str) -> tuple[Document, ...]:
    """``"world"``, a documents ``.jsonl`` file, or a directory of ``.html`` files (cached per process)."""
    path = Path(world.DOCS if spec == "world" else spec)
    if path.is_dir():
        docs = tuple(_html_doc(f, f.relative_to(path).as_posix()) for f in sorted(path.rglob("*.html")))
    elif path.is_file():
        docs = tuple(_jsonl_doc(json.loads(line), f"{path}:{i + 1}")
                     for i, line in enumerate(path.read_text().splitlines()) if line.strip())
    else:
        raise FileNotFoundError(f"corpus {spec!r} is neither 'world', a documents JSONL file nor a directory")
    if not docs:
        raise ValueError(f"corpus {spec!r} has no documents")
    ids = [d.docid for d in docs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"corpus {spec!r} repeats docids")
    return docs


@functools.cache
def load_questions(spec: str) -> tuple[Question, ...]:
    """A queries JSONL file (``"world"`` = the shipped question set), cached per process."""
    path = Path(world.QUERIES if spec == "world" else spec)
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row, where = json.loads(line), f"{path}:{i + 1}"
        answers = row.get("answer")
        answers = [answers] if isinstance(answers, str) else answers
        evidence = row.get("evidence_docids") or row.get("evidence_docs") or row.get("gold_docs") or []
        evidence = [e["docid"] if isinstance(e, dict) else e for e in evidence]
        if not row.get("query") or not answers or not all(isinstance(a, str) and a for a in answers):
            raise ValueError(f"{where}: a question needs 'query' and 'answer' (text or list of texts)")
        out.append(Question(str(row.get("query_id", i)), row["query"], tuple(answers), tuple(map(str, evidence)),
                            row.get("find"), row.get("split")))
    return tuple(out)


# ------------------------------------------------------------------------------------ documents
def _jsonl_doc(row: dict, where: str) -> Document:
    if "docid" not in row or not isinstance(row.get("text"), str):
        raise ValueError(f"{where}: a document needs 'docid' and 'text'")
    text = row["text"]
    title = row.get("title") or text.strip().split("\n", 1)[0][:80]
    plain = _LINK.sub(r"\1", re.sub(r"^(={2,4})\s*(.+?)\s*\1$", r"\2", text, flags=re.M))
    return Document(str(row["docid"]), title, plain, _render(title, text), row.get("url"))


def _render(title: str, text: str) -> str:
    """Markdown-ish text (blank-line paragraphs, ``== h ==`` headings, ``[x](y)`` links) -> HTML."""
    blocks = []
    for para in re.split(r"\n\s*\n", text.strip()):
        m = _HEADING.match(para.strip())
        if m:
            blocks.append(f"<h{len(m.group(1))}>{html.escape(m.group(2))}</h{len(m.group(1))}>")
            continue
        body, last = [], 0
        for link in _LINK.finditer(para):
            body.append(html.escape(para[last:link.start()]))
            body.append(f'<a href="{html.escape(link.group(2))}">{html.escape(link.group(1))}</a>')
            last = link.end()
        body.append(html.escape(para[last:]))
        blocks.append("<p>" + "".join(body).replace("\n", "<br>") + "</p>")
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
            f"<body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(blocks) + "\n</body></html>\n")


def _html_doc(file: Path, docid: str) -> Document:
    raw = file.read_text(errors="replace")
    parser = _Extractor(base=None)
    parser.feed(raw)
    parser.close()
    return Document(docid, parser.title.strip() or docid, parser.text(), raw)


# -------------------------------------------------------------------------------- html -> text
_BLOCK = {"p", "div", "br", "tr", "table", "ul", "ol", "dl", "dt", "dd", "section", "article", "blockquote", "pre",
          "hr", "header", "footer", "nav", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "body", "figure"}
_SKIP = {"script", "style", "head", "noscript", "template"}
_OPEN_ONLY = {"li", "dt", "dd", "tr", "br", "ul", "ol", "dl"}  # block starts whose ends add no line (lists stay compact)


class _Extractor(HTMLParser):
    """Collects visible text; with a ``base`` path, links become ``[label](absolute path)``."""

    def __init__(self, base: str | None):
        super().__init__(convert_charrefs=True)
        self.base, self.out, self.title = base, [], ""
        self.skip = self.pre = 0
        self.in_title = False
        self.href: str | None = None
        self.label: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in _SKIP:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK:
            self.out.append("\n")
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self.out.append("#" * int(tag[1]) + " ")
        elif tag == "li":
            self.out.append("- ")
        elif tag == "a" and self.base is not None and self.href is None:
            href = dict(attrs).get("href") or ""
            if href and not href.startswith(("#", "javascript:", "mailto:")):
                self.href, self.label = _resolve(self.base, href), []

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag == "a" and self.href is not None:
            label = re.sub(r"\s+", " ", "".join(self.label)).strip()
            self.out.append(f"[{label}]({self.href})" if label else "")
            self.href = None
        if tag in _BLOCK and tag not in _OPEN_ONLY:
            self.out.append("\n")

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        if self.skip:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self.href is None and (self.out or ["\n"])[-1].endswith(("\n", "- ", "# ")):
                data = data.lstrip()  # no space at a line's start (link labels are stripped at the link's end)
        (self.label if self.href is not None else self.out).append(data)

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.out).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _resolve(base: str, href: str) -> str:
    """A link as the reader should use it: site paths without scheme, host or fragment."""
    parts = urlsplit(urljoin(base, href))
    if parts.scheme in ("http", "https") and parts.hostname not in ("127.0.0.1", "localhost"):
        return parts._replace(fragment="").geturl()
    return parts.path + (f"?{parts.query}" if parts.query else "")


def html_to_text(markup: str, base: str) -> tuple[str, str]:
    """(title, text) of an HTML page served at path ``base``; links resolved against it."""
    parser = _Extractor(base=base)
    parser.feed(markup)
    parser.close()
    return parser.title.strip(), parser.text()
