"""KV store: a seeded per-episode fact store; the question needs a chain of lookups (5+ turns).

Facts link people -> employer -> city -> country -> capital, all with invented names so nothing can be
answered from memory. Keys look like ``"Bob.employer"``; ``list_keys("Bob")`` shows what exists.
With ``hops=4`` (default) an agent needs four lookups, one per turn since each depends on the last,
then the answer: at least 5 turns. Reward 1 for the exact answer (case and a trailing "." ignored).
"""

from __future__ import annotations

from agentrl.env import Task, ToolEnv, tool

_SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "vas", "zel", "or", "ni", "pra", "dun", "es", "qui", "bar", "tho", "ly"]
_PEOPLE = ["Alice", "Bob", "Carmen", "Dmitri", "Esi", "Farid", "Greta", "Hiro"]
_QUESTIONS = {
    2: "In which city is {person}'s employer based?",
    3: "In which country is {person}'s employer based?",
    4: "What is the capital of the country where {person}'s employer is based?",
}


def _names(rng, n: int, used: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(_SYLLABLES[int(i)] for i in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4))))
        if name.capitalize() not in used:
            used.add(name.capitalize())
            out.append(name.capitalize())
    return out


def _normalize(text: str) -> str:
    text = text.strip()
    if text.lower().startswith("answer:"):
        text = text[len("answer:"):]
    return text.strip().strip("\"'*.").strip().casefold()


class KVStoreEnv(ToolEnv):
    system_prompt = ("Answer the question using the fact store tools. Reply with only the answer "
                     "(a single name) once you know it.")

    def __init__(self, hops: int = 4, **kwargs):
        super().__init__(**kwargs)
        if hops not in _QUESTIONS:
            raise ValueError(f"hops must be one of {sorted(_QUESTIONS)}")
        self.hops = hops
        self.store: dict[str, str] = {}
        self.tools = [tool(self.lookup), tool(self.list_keys)]

    def lookup(self, key: str) -> str:
        """Return the value stored under a key.

        Args:
            key: The exact key, e.g. "Bob.employer".
        """
        if key not in self.store:
            raise LookupError(f"no key {key!r}; use list_keys to see the keys")
        return self.store[key]

    def list_keys(self, prefix: str = "") -> list[str]:
        """List the keys that start with a prefix (at most 50).

        Args:
            prefix: Key prefix, e.g. "Bob" or "" for all keys.
        """
        return sorted(k for k in self.store if k.startswith(prefix))[:50]

    def task(self, rng, options) -> Task:
        used: set[str] = set(_PEOPLE)
        companies = [f"{n} {s}" for n, s in zip(_names(rng, 4, used), ["Labs", "Works", "Group", "Foods"])]
        cities, countries, capitals = _names(rng, 4, used), _names(rng, 3, used), _names(rng, 3, used)
        store: dict[str, str] = {}
        for person in _PEOPLE:
            store[f"{person}.employer"] = companies[int(rng.integers(len(companies)))]
            store[f"{person}.age"] = str(int(rng.integers(20, 70)))
        for company in companies:
            store[f"{company}.city"] = cities[int(rng.integers(len(cities)))]
        for i, city in enumerate(cities):
            store[f"{city}.country"] = countries[i % len(countries)]
        for country, capital in zip(countries, capitals):
            store[f"{country}.capital"] = capital
        person = _PEOPLE[int(rng.integers(len(_PEOPLE)))]
        chain = [store[f"{person}.employer"]]
        for relation in ["city", "country", "capital"]:
            chain.append(store[f"{chain[-1]}.{relation}"])
        self.store = store
        question = _QUESTIONS[self.hops].format(person=person)
        return Task(messages=[{"role": "user", "content": question}], answer=chain[self.hops - 1],
                    info={"person": person, "chain": chain})

    def reward(self, task, history, final_text) -> float:
        return float(_normalize(final_text) == _normalize(task.answer))
