"""The browsing env over the offline web (envs/browse): the shipped world and its questions, the real
site on 127.0.0.1 (pages, BM25 search, shared server), the tools and their errors, pagination, EM/F1,
the scripted reference policy (100%) and noop (0%) through the agent loop and `agentrl eval`, other
corpora (BrowseComp-Plus JSONL, a directory of HTML), gymnasium conformance and the recipes."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gymnasium.utils.env_checker import check_env

from agentrl.engine.types import SamplingParams
from agentrl.env import make
from agentrl.model.tokenizer import build_tokenizer
from agentrl.recipe import load_recipe
from agentrl.rollout import run_episode
from agentrl.sft import ScriptedPolicy
from envs.browse import world
from envs.browse.corpus import html_to_text, load_corpus, load_questions, page_path
from envs.browse.env import BrowseEnv, paginate
from envs.browse.score import exact_match, f1, normalize
from envs.browse.web import Site, site

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [json.loads(x) for x in world.QUERIES.read_text().splitlines()]


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def play(env_kwargs: dict, index: int, turns: list[str] | None, tok) -> tuple:
    """One episode through the real agent loop; turns=None plays the env's own demonstration."""
    probe = BrowseEnv(**env_kwargs)
    probe.reset(options={"task_index": index})
    policy = ScriptedPolicy(probe.demonstration(probe.current_task) if turns is None else turns, tok)
    env = BrowseEnv(**env_kwargs)
    traj = asyncio.run(run_episode(policy, env, tok, SamplingParams(), options={"task_index": index},
                                   max_total_tokens=16384))
    return traj, env


# ------------------------------------------------------------------------------ world and questions
def test_shipped_world_is_the_seeded_generator_output():
    docs, questions = world.build(world.SEED)
    assert world.DOCS.read_text() == "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    assert world.QUERIES.read_text() == "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    assert world.build(world.SEED + 1)[1] != questions


def test_question_set_shape():
    ids = {d.docid for d in load_corpus("world")}
    assert len(QUESTIONS) >= 50 and sum(q["split"] == "test" for q in QUESTIONS) >= 50
    assert {q["hops"] for q in QUESTIONS} == {1, 2, 3}
    assert len({q["query"] for q in QUESTIONS}) == len(QUESTIONS)
    assert all(q["evidence_docids"] and set(q["evidence_docids"]) <= ids for q in QUESTIONS)


def test_every_gold_answer_is_on_its_evidence_pages_and_hops_are_links():
    s = site("world")
    for q in QUESTIONS:
        texts = []
        for docid in q["evidence_docids"]:
            status, body = get(s.base_url + page_path(docid))
            assert status == 200
            texts.append(html_to_text(body, page_path(docid))[1])
        # the answer is written on the last evidence page
        assert normalize(q["answer"]) in normalize(texts[-1]), q
        if q["kind"] != "compare":  # each hop is a link on the page before it
            for text, nxt in zip(texts, q["evidence_docids"][1:]):
                assert f"]({page_path(nxt)})" in text, (q, nxt)
        else:  # a comparison needs both pages: each holds its own founding year only
            years = [t.split("founded in ")[1][:4] for t in texts]
            assert years[1] < years[0] and len(set(years)) == 2


def test_search_finds_evidence_pages_by_title_and_errors():
    s = site("world")
    docs = {d.docid: d for d in load_corpus("world")}
    for docid in sorted({e for q in QUESTIONS for e in q["evidence_docids"]}):
        query = urllib.request.quote(docs[docid].title)
        status, body = get(f"{s.base_url}/search?q={query}&k=3")
        results = json.loads(body)["results"]
        assert status == 200 and results[0]["url"] == page_path(docid), (docid, results)
        assert all(r["score"] > 0 and r["title"] and r["snippet"] for r in results)
    assert get(f"{s.base_url}/search?q=%20")[0] == 400
    assert get(f"{s.base_url}/search?q={'x' * 501}")[0] == 400
    assert json.loads(get(f"{s.base_url}/search?q=qqqzzzxx")[1])["results"] == []
    assert get(f"{s.base_url}/page/no-such-page")[0] == 404


def test_one_site_per_process_and_clean_stop():
    a, b = BrowseEnv(), BrowseEnv()
    a.reset(seed=0)
    b.reset(seed=1)
    assert a._site is b._site is site("world") and a._site.running
    own = Site(load_corpus("world"))
    assert own.port != a._site.port and get(own.base_url + "/page/" + QUESTIONS[0]["evidence_docids"][0])[0] == 200
    own.stop()
    assert not own.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", own.port), timeout=5).close()


# --------------------------------------------------------------------------------- tools and pages
def long_city() -> tuple[int, str]:
    i = next(i for i, q in enumerate(BrowseEnv().questions) if q.find == "oldest bridge")
    return i, BrowseEnv().questions[i].evidence[0]


def test_pagination_and_find():
    i, docid = long_city()
    env = BrowseEnv(page_chars=1000)
    env.reset(options={"task_index": i})
    first, *_ = env.step(call("open", url=page_path(docid)))
    head = first[0]["content"]
    n = int(head.split(" of ", 1)[1].split(")", 1)[0])
    assert n >= 3 and f'open(url="{page_path(docid)}", page=2)' in head
    parts = [env.step(call("open", url=page_path(docid), page=k))[0][0]["content"] for k in range(1, n + 1)]
    bodies = [p.split("\n\n", 1)[1].split("\n\n[part ")[0] for p in parts]
    status, html = get(env._site.base_url + page_path(docid))
    assert "".join(bodies) == html_to_text(html, page_path(docid))[1] and all(len(b) <= 1000 for b in bodies)
    assert "oldest bridge" not in parts[0] and "oldest bridge" in parts[-1] and "shows the next part" not in parts[-1]
    found = env.step(call("find", pattern="OLDEST BRIDGE"))[0][0]["content"]
    assert f"[part {n}]" in found and env.current_task.answer[0] in found
    assert "No line" in env.step(call("find", pattern="qqqzzz"))[0][0]["content"]
    bad = env.step(call("open", url=page_path(docid), page=n + 1))[0][0]["content"]
    assert bad.startswith("Error: ") and f"has {n} parts" in bad


def test_paginate_keeps_every_character():
    text = "\n".join(["short line"] * 30 + ["x" * 2500] + ["tail"])
    parts = paginate(text, 300)
    assert "".join(parts) == text and all(len(p) <= 300 for p in parts)
    assert parts[0].endswith("short line\n") and [len(p) for p in parts].count(300) == 8  # 2500 = 8 x 300 + 100
    assert paginate("", 300) == [""]


def test_errors_are_observations():
    env = BrowseEnv()
    env.reset(options={"task_index": 0})
    turn = "".join([call("find", pattern="x"), call("search", query="  "), call("open", url="/page/no-such-page"),
                    call("open", url="https://elsewhere.example/a"), call("open", url="ftp://x/y"),
                    call("search", query="q" * 600), call("open", url="/static/x")])
    obs, reward, terminated, truncated, info = env.step(turn)
    texts = [m["content"] for m in obs]
    assert len(texts) == 7 and all(t.startswith("Error: ") for t in texts), texts
    assert "no page is open" in texts[0] and "no page at '/page/no-such-page'" in texts[2]
    assert not terminated and info["tool_errors"] == 7
    # a document's original address and a bare docid open the same page; search results are clickable
    docid = QUESTIONS[0]["evidence_docids"][0]
    by_url = env.step(call("open", url=f"https://world.example/wiki/{docid}"))[0][0]["content"]
    by_id = env.step(call("open", url=docid))[0][0]["content"]
    assert by_url == by_id and by_url.startswith("Title: ")
    results = env.step(call("search", query=docid.replace("-", " ")))[0][0]["content"]
    assert f"URL: {page_path(docid)}" in results
    assert env.episode_metrics()["searches"] == 3 and env.episode_metrics()["pages_opened"] == 1


# ------------------------------------------------------------------------------------------ reward
def test_em_and_f1_by_hand():
    assert normalize("  The Kelmo-Bridge!! ") == "kelmobridge"
    assert normalize("An apple, a pear") == "apple pear"
    assert exact_match("the Nirol.", ["Nirol"]) == 1.0 and exact_match("Nirol river", ["Nirol"]) == 0.0
    assert exact_match("1767", ["1766", "1767"]) == 1.0
    assert f1("Kelmo Bridge river", ["Kelmo Bridge"]) == pytest.approx(0.8)  # p = 2/3, r = 1
    assert f1("gekum", ["gekum thaler"]) == pytest.approx(2 / 3)  # p = 1, r = 1/2
    assert f1("nothing here", ["gekum thaler"]) == 0.0 and f1("", ["x"]) == 0.0
    assert f1("x b b", ["b b c"]) == pytest.approx(2 / 3)  # overlap counts multiplicity: 2 of 3 each way
    assert f1("a b b", ["b b c"]) == pytest.approx(0.8)  # the article goes: p = 2/2, r = 2/3


def test_answer_tool_ends_the_episode_and_plain_text_still_answers():
    env = BrowseEnv(metric="f1")
    env.reset(options={"task_index": 2})
    gold = env.current_task.answer[0]
    obs, reward, terminated, truncated, info = env.step(call("answer", text=gold + " indeed") + call("search", query="x"))
    assert terminated and not truncated and info["final_reward"] == reward == pytest.approx(f1(gold + " indeed", [gold]))
    assert obs[1]["content"].startswith("Error: ") and "episode already ended (answer was called)" in obs[1]["content"]
    with pytest.raises(RuntimeError):
        env.step("more")
    assert env.episode_metrics()["em"] == 0.0 and 0 < env.episode_metrics()["f1"] < 1
    env.reset(options={"task_index": 2})
    obs, reward, terminated, *_ = env.step(f"<think>hmm</think>The answer is: {gold}")
    assert terminated and reward == f1(f"The answer is: {gold}", [gold]) and env.episode_metrics()["f1"] == reward
    short = BrowseEnv(max_turns=1)
    short.reset(options={"task_index": 2})
    obs, reward, terminated, truncated, info = short.step(call("answer", text=gold))  # last turn: still an answer
    assert terminated and not truncated and reward == 1.0


def half_judge(question, golds, prediction) -> float:
    return 0.5 if prediction and question.endswith("?") and golds else 0.0


def test_pluggable_judge():
    for judge in (half_judge, f"{__name__}:half_judge"):
        env = BrowseEnv(judge=judge)
        env.reset(options={"task_index": 0})
        assert env.step(call("answer", text="whatever"))[1] == 0.5
    with pytest.raises(ValueError):
        BrowseEnv(judge="no_colon")


def test_gold_policy_scores_1_and_noop_0_through_the_agent_loop(tok):
    n = BrowseEnv().num_tasks()
    assert n == len(QUESTIONS)
    for i in range(n):
        traj, env = play({}, i, None, tok)
        q = env.questions[i]
        assert traj.status == "ok" and traj.reward == 1.0, (i, traj.info)
        assert traj.turns == len(q.evidence) + 2 + bool(q.find)
        m = env.episode_metrics()
        assert m == {"em": 1.0, "f1": 1.0, "searches": 1.0, "pages_opened": float(len(set(q.evidence)))}
    for i in range(0, n, 10):
        traj, env = play({}, i, [""], tok)
        assert traj.status == "ok" and traj.reward == 0.0 and env.episode_metrics()["f1"] == 0.0


def test_task_index_and_splits():
    test, train = BrowseEnv(split="test"), BrowseEnv(split="train")
    assert test.num_tasks() + train.num_tasks() == len(QUESTIONS) and test.num_tasks() >= 50
    assert not {q.id for q in test.questions} & {q.id for q in train.questions}
    obs, info = test.reset(seed=123, options={"task_index": 7})
    assert info["task_id"] == test.questions[7].id and obs[-1]["content"] == test.questions[7].question
    a, b = BrowseEnv(), BrowseEnv()
    assert a.reset(seed=5)[1]["task_id"] == b.reset(seed=5)[1]["task_id"]
    with pytest.raises(IndexError):
        a.reset(options={"task_index": len(QUESTIONS)})
    with pytest.raises(ValueError):
        BrowseEnv(split="nope")


def test_gymnasium_check_env():
    env = make("browse-v0")
    check_env(env, skip_render_check=True)
    assert isinstance(env, BrowseEnv)


# ----------------------------------------------------------------------------------- other corpora
def test_browsecomp_plus_jsonl_corpus(tmp_path, tok):
    docs = [
        {"docid": "d1", "url": "https://news.example/zarn", "title": "Zarnival Observatory",
         "text": "The Zarnival Observatory stands on a hill. Its first director was [Ulma Prent](https://news.example/ulma)."},
        {"docid": "d2", "url": "https://news.example/ulma", "text": "Ulma Prent\nUlma Prent was an astronomer who "
         "catalogued the Quessel comet in 1888."},
        {"docid": "d3", "text": "An unrelated note about gardening."},
    ]
    queries = [{"query_id": "bc1", "query": "Which comet did the first director of the Zarnival Observatory catalogue?",
                "answer": ["Quessel comet", "Quessel"], "evidence_docs": [{"docid": "d1"}, {"docid": "d2"}]}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    kw = {"corpus": str(tmp_path / "docs.jsonl"), "questions": str(tmp_path / "queries.jsonl")}
    env = BrowseEnv(**kw)
    env.reset(options={"task_index": 0})
    page = env.step(call("open", url="/page/d1"))[0][0]["content"]
    assert "[Ulma Prent](https://news.example/ulma)" in page  # the link as written; it resolves on this site
    second = env.step(call("open", url="https://news.example/ulma"))[0][0]["content"]
    assert "Title: Ulma Prent" in second and "URL: /page/d2" in second and "Quessel comet in 1888" in second
    assert "URL: /page/d2" in env.step(call("search", query="Quessel comet"))[0][0]["content"].split("\n")[1]
    assert env.step(call("answer", text="Quessel"))[1] == 1.0  # any alias
    traj, _ = play(kw, 0, None, tok)
    assert traj.reward == 1.0
    with pytest.raises(ValueError, match="questions"):
        BrowseEnv(corpus=str(tmp_path / "docs.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({**queries[0], "evidence_docids": ["d9"]}) + "\n")
    with pytest.raises(ValueError, match="d9"):
        BrowseEnv(corpus=kw["corpus"], questions=str(tmp_path / "bad.jsonl"))


def test_html_directory_corpus(tmp_path, tok):
    (tmp_path / "guide").mkdir()
    (tmp_path / "index.html").write_text(
        "<html><head><title>Pelmar handbook</title><style>p {color: red}</style></head><body>"
        "<h1>Pelmar handbook</h1><p>See the <a href='guide/tides.html#top'>tide tables</a> and "
        "<a href='#x'>this section</a>.</p><script>var x = 1;</script></body></html>")
    (tmp_path / "guide" / "tides.html").write_text(
        "<html><head><title>Tide tables of Pelmar</title></head><body><h1>Tides</h1>"
        "<ul><li>High tide at Orrick quay: 6 metres.</li><li>Back to <a href='../index.html'>the handbook</a></li></ul>"
        "<pre>  code\n    indented</pre></body></html>")
    (tmp_path / "q.jsonl").write_text(json.dumps({"query_id": "h1", "query": "How high is the tide at Orrick quay?",
                                                  "answer": "6 metres",
                                                  "evidence_docids": ["index.html", "guide/tides.html"]}) + "\n")
    docs = {d.docid: d for d in load_corpus(str(tmp_path))}
    assert set(docs) == {"index.html", "guide/tides.html"} and docs["index.html"].title == "Pelmar handbook"
    assert "color" not in docs["index.html"].text and "var x" not in docs["index.html"].text
    env = BrowseEnv(corpus=str(tmp_path), questions=str(tmp_path / "q.jsonl"))
    env.reset(options={"task_index": 0})
    index = env.step(call("open", url="/page/index.html"))[0][0]["content"]
    assert "[tide tables](/page/guide/tides.html)" in index and "this section" in index
    tides = env.step(call("open", url="/page/guide/tides.html"))[0][0]["content"]
    assert "- High tide at Orrick quay: 6 metres." in tides and "[the handbook](/page/index.html)" in tides
    assert "  code\n    indented" in tides
    assert "/page/guide/tides.html" in env.step(call("search", query="Orrick quay tide"))[0][0]["content"]
    traj, _ = play({"corpus": str(tmp_path), "questions": str(tmp_path / "q.jsonl")}, 0, None, tok)
    assert traj.reward == 1.0 and load_questions(str(tmp_path / "q.jsonl"))[0].answers == ("6 metres",)


# ------------------------------------------------------------------------------------ recipes, eval
def test_recipes_validate_and_gold_eval_scores_100(tmp_path):
    from agentrl.evaluate import evaluate
    from agentrl.model.checkpoint import init_model

    train = load_recipe(ROOT / "recipes" / "browse_train.yaml")
    assert train.env.id == "browse-v0" and make(train.env.id, **train.env.kwargs).num_tasks() > 0
    ckpt = init_model("tiny-moe", tmp_path / "m")
    recipe = load_recipe(ROOT / "recipes" / "browse_eval.yaml",
                         [f"model.path={ckpt}", "model.init=null", f"output.dir={tmp_path / 'runs'}", "eval.episodes=8"])
    gold = evaluate(recipe, policy="gold", progress=False)
    noop = evaluate(recipe, policy="noop", progress=False)
    assert gold["episodes"] == 8 and gold["reward_mean"] == 1.0 and gold["em_mean"] == gold["f1_mean"] == 1.0
    assert gold["searches_mean"] == 1.0 and gold["pages_opened_mean"] >= 1.0
    assert noop["reward_mean"] == 0.0 and noop["em_mean"] == 0.0 and noop["pages_opened_mean"] == 0.0
    logs = list((tmp_path / "runs" / "browse_eval" / "eval" / "gold").glob("*/browse_log.txt"))
    assert len(logs) == 8 and all("answer" in p.read_text() for p in logs)
