"""The shipped offline web: a seeded encyclopaedia of a fictional world and its question set.

Owns: generating the world (countries, cities, people, companies, inventions with invented names),
its pages (BrowseComp-Plus style documents: docid / url / title / text, links written as markdown
``[Label](/page/<docid>)``, sections as ``== Name ==`` lines) and its questions (query_id / query /
answer / evidence_docids in hop order / find / hops / split). Everything comes from
``random.Random(seed)``, so ``python -m envs.browse.world`` rewrites ``data/`` byte for byte.
Does not own: loading or serving pages (envs.browse.corpus, envs.browse.web).

Facts a question needs sit in a page's lead paragraph, except the "oldest bridge" of a city, which
closes a long page (past the first page of the env's pagination; the demonstration uses ``find``).
Question kinds: 1 hop (a fact on the page a search finds), 2 hops (follow one link), 3 hops (two
links) and comparisons (two pages). Every answer is written on the last evidence page.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).parent / "data"
DOCS, QUERIES = DATA / "world_docs.jsonl", DATA / "world_queries.jsonl"
SEED, N_TEST = 7, 50

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "vel"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "s", "l", "m", "sk", "th", "x"]
_JOBS = ["engineer", "chemist", "clockmaker", "shipwright", "physician", "cartographer", "glassblower", "printer"]
_COINS = ["crown", "mark", "florin", "dram", "shilling", "thaler"]
_THINGS = ["Loom", "Lamp", "Engine", "Press", "Compass", "Kiln", "Pump", "Telegraph", "Lens", "Valve", "Mill",
           "Sextant", "Stove", "Bell"]
_KINDS = ["Works", "Foundry", "Company", "Guild", "Industries", "Brothers", "Manufactory"]
_FILLER = [
    "In {y}, a flood damaged the {w} quarter, which was rebuilt in stone over the following decade.",
    "The {w} market, held every {d}, has sold wool, salt and dyed cloth since {y}.",
    "A choir from the {w} parish toured the neighbouring provinces in {y}.",
    "The {w} gate was widened in {y} to let the new carriages through.",
    "Local chronicles record a severe winter in {y}, when the {w} canal froze for six weeks.",
    "The {w} library opened a reading room for apprentices in {y}.",
    "Tanners and dyers from the {w} street formed a mutual society in {y}.",
    "In {y} the council paved the road to the {w} hills.",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


@dataclass
class Page:
    docid: str
    title: str
    lead: list[str] = field(default_factory=list)
    sections: list[tuple[str, list[str]]] = field(default_factory=list)

    def link(self) -> str:
        return f"[{self.title}](/page/{self.docid})"

    def doc(self) -> dict:
        parts = [" ".join(self.lead)] + [f"== {h} ==\n\n" + "\n\n".join(ps) for h, ps in self.sections]
        return {"docid": self.docid, "url": f"https://world.example/wiki/{self.docid}", "title": self.title,
                "text": "\n\n".join(parts)}


class _Names:
    """Unique invented words; none is a substring of another (answers stay unambiguous)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, []

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n))
            w = (w + self.rng.choice(_CODAS)).capitalize()
            if len(w) >= 5 and not any(w.lower() in u or u in w.lower() for u in self.used):
                self.used.append(w.lower())
                return w


def _slug(title: str) -> str:
    return title.lower().replace(" ", "-")


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(documents, questions) of the world drawn from ``seed``."""
    rng = random.Random(seed)
    names = _Names(rng)
    countries = [Page(_slug(t), t) for t in (names.word() for _ in range(6))]
    cities = [Page(_slug(t), t) for t in (names.word() for _ in range(18))]
    people = [Page(_slug(t), t) for t in (f"{names.word((1, 2))} {names.word()}" for _ in range(36))]
    companies = [Page(_slug(t), t) for t in (f"{names.word()} {rng.choice(_KINDS)}" for _ in range(14))]
    inventions = [Page(_slug(t), t) for t in (f"{names.word()} {thing}" for thing in _THINGS)]
    rivers = [names.word() for _ in cities]
    bridges = [f"{names.word()} Bridge" for _ in cities]
    coins = [f"{names.word((1, 2)).lower()} {coin}" for coin in _COINS]
    years = rng.sample(range(1700, 1900), len(companies))

    country_of = {c.docid: countries[i % len(countries)] for i, c in enumerate(cities)}
    capital = {k.docid: cities[i] for i, k in enumerate(countries)}
    birthplace = {p.docid: rng.choice(cities) for p in people}
    founder, ceo = dict(zip((c.docid for c in companies), people[:14])), dict(zip((c.docid for c in companies), people[14:28]))
    hq = {c.docid: rng.choice(cities) for c in companies}
    inventor = {inv.docid: people[(i * 5) % 28] for i, inv in enumerate(inventions)}
    maker = {inv.docid: companies[i] for i, inv in enumerate(inventions)}
    mayor = {c.docid: people[28 + i % 8] for i, c in enumerate(cities)}

    for k, country in enumerate(countries):
        country.lead = [f"{country.title} is a country whose capital is {capital[country.docid].link()}.",
                        f"Its currency is the {coins[k]}.",
                        f"It has about {rng.randint(2, 40)} million inhabitants."]
        towns = [c.link() for c in cities if country_of[c.docid] is country]
        country.sections = [("Cities", [f"Its cities include {', '.join(towns)}."]),
                            ("History", [_filler(rng, names) for _ in range(3)])]
    for i, city in enumerate(cities):
        city.lead = [f"{city.title} is a city in {country_of[city.docid].link()}, on the {rivers[i]} river.",
                     f"It was founded in {rng.randint(900, 1600)}.",
                     f"Its mayor is {mayor[city.docid].link()}."]
        natives = [p.link() for p in people if birthplace[p.docid] is city]
        history = [_filler(rng, names) for _ in range(rng.randint(36, 44))]
        city.sections = [("People", [f"Notable people born here: {', '.join(natives) or 'none recorded'}."]),
                         ("History", history),
                         ("Landmarks", [f"The oldest bridge in {city.title} is the {bridges[i]}, completed in "
                                        f"{rng.randint(1100, 1650)}."])]
    for c, company in enumerate(companies):
        made = [inv.link() for inv in inventions if maker[inv.docid] is company]
        company.lead = [f"{company.title} is a manufacturer founded in {years[c]} by {founder[company.docid].link()}.",
                        f"Its headquarters are in {hq[company.docid].link()}.",
                        f"Its chief executive is {ceo[company.docid].link()}.",
                        f"It makes the {', '.join(made)}." if made else "It makes tools and fittings."]
        company.sections = [("History", [_filler(rng, names) for _ in range(4)])]
    for inv in inventions:
        inv.lead = [f"The {inv.title} was invented by {inventor[inv.docid].link()} in {rng.randint(1700, 1900)}.",
                    f"It is manufactured by {maker[inv.docid].link()}."]
        inv.sections = [("Design", [_filler(rng, names) for _ in range(2)])]
    for person in people:
        city = birthplace[person.docid]
        roles = [f"founded {c.link()}" for c in companies if founder[c.docid] is person]
        roles += [f"is the chief executive of {c.link()}" for c in companies if ceo[c.docid] is person]
        roles += [f"invented the {i.link()}" for i in inventions if inventor[i.docid] is person]
        roles += [f"is the mayor of {c.link()}" for c in cities if mayor[c.docid] is person]
        person.lead = [f"{person.title} is a {rng.choice(_JOBS)} born in {rng.randint(1680, 1880)} in "
                       f"{city.link()}, {country_of[city.docid].link()}."]
        person.lead += [f"{person.title.split()[-1]} {' and '.join(roles)}."] if roles else []
        person.sections = [("Life", [_filler(rng, names) for _ in range(2)])]

    questions: list[dict] = []

    def ask(query: str, answer: str, evidence: list[Page], kind: str, find: str | None = None) -> None:
        questions.append({"query_id": f"q{len(questions):03d}", "query": query, "answer": answer,
                          "evidence_docids": [p.docid for p in evidence], "find": find, "kind": kind,
                          "hops": len(evidence)})

    for c, company in enumerate(companies):
        f, boss, city = founder[company.docid], ceo[company.docid], hq[company.docid]
        ask(f"In what year was {company.title} founded?", str(years[c]), [company], "1-hop")
        ask(f"Which river flows through the city where {company.title} has its headquarters?",
            rivers[cities.index(city)], [company, city], "2-hop")
        home = country_of[birthplace[f.docid].docid]
        ask(f"What is the currency of the country where the founder of {company.title} was born?",
            coins[countries.index(home)], [company, f, home], "3-hop")
        ask(f"Which river flows through the birthplace of the chief executive of {company.title}?",
            rivers[cities.index(birthplace[boss.docid])], [company, boss, birthplace[boss.docid]], "3-hop")
    for inv in inventions:
        ask(f"In which city was the inventor of the {inv.title} born?", birthplace[inventor[inv.docid].docid].title,
            [inv, inventor[inv.docid]], "2-hop")
        ask(f"Who founded the company that manufactures the {inv.title}?", founder[maker[inv.docid].docid].title,
            [inv, maker[inv.docid]], "2-hop")
    for i, city in enumerate(cities):
        ask(f"What is the name of the oldest bridge in {city.title}?", bridges[i], [city], "1-hop-deep",
            find="oldest bridge")
    pairs: list[tuple[int, int]] = []
    while len(pairs) < 10:
        a, b = rng.sample(range(len(companies)), 2)
        if (a, b) in pairs or (b, a) in pairs:
            continue
        pairs.append((a, b))
        first = companies[a] if years[a] < years[b] else companies[b]
        ask(f"Which company was founded earlier, {companies[a].title} or {companies[b].title}?", first.title,
            [companies[a], companies[b]] if first is companies[b] else [companies[b], companies[a]], "compare")
    order = list(range(len(questions)))
    rng.shuffle(order)
    for rank, q in enumerate(order):
        questions[q]["split"] = "test" if rank < N_TEST else "train"
    docs = [p.doc() for p in countries + cities + people + companies + inventions]
    return docs, questions


def _filler(rng: random.Random, names: _Names) -> str:
    return rng.choice(_FILLER).format(y=rng.randint(1500, 1900), w=names.word(), d=rng.choice(_DAYS))


def write(seed: int = SEED, docs_path: Path = DOCS, queries_path: Path = QUERIES) -> None:
    docs, questions = build(seed)
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    for path, rows in ((docs_path, docs), (queries_path, questions)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


if __name__ == "__main__":
    write()
    print(f"wrote {DOCS} and {QUERIES}")
