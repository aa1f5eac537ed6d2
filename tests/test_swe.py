"""The SWE env and its shipped task set: every instance is valid (the unpatched repository fails
FAIL_TO_PASS, PASS_TO_PASS passes before and after, the gold patch resolves it); scripted gold / noop
episodes through the real agent loop score 1 / 0; tools behave and refuse paths outside the workspace;
workspaces hold only the base commit and are removed; a user's own SWE-bench JSONL (JSON-encoded test
lists, a plain git repository instead of a bundle) round-trips and runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gymnasium.utils.env_checker import check_env

from agentrl.engine.types import SamplingParams
from agentrl.env import make
from agentrl.model.config import preset
from agentrl.model.tokenizer import build_tokenizer
from agentrl.rollout import run_episode
from agentrl.sandbox import Sandbox
from agentrl.sft import ScriptedPolicy
from envs.swe import SWEEnv, SWEInstance, dump_instances, load_instances
from envs.swe.instances import DATA_DIR, resolve_repo
from envs.swe.workspace import grade, make_workspace

INSTANCES = load_instances(DATA_DIR / "instances.jsonl")


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def validate(inst: SWEInstance) -> tuple[str, list[str]]:
    """Grade the unpatched base commit, then the gold patch, in one workspace (grading resets the test
    files and re-applies the test patch each time)."""
    ws = make_workspace(resolve_repo(inst.repo, DATA_DIR / "repos"), inst.base_commit)
    problems = []
    try:
        sandbox = Sandbox(ws, timeout=120)
        before = grade(sandbox, inst, timeout=120)
        if before.f2p_passed != 0:
            problems.append(f"unpatched passes {before.f2p_passed}/{before.f2p_total} FAIL_TO_PASS")
        if before.p2p_passed != before.p2p_total:
            problems.append(f"unpatched fails PASS_TO_PASS: {before.log[-1500:]}")
        applied = sandbox.run(f"git apply <<'EOF'\n{inst.patch}EOF")
        if not applied.ok:
            problems.append(f"gold patch does not apply: {applied.stderr}")
        after = grade(sandbox, inst, timeout=120)
        if not after.resolved:
            problems.append(f"gold patch does not resolve: {after.log[-1500:]}")
        if after.f2p_total + after.p2p_total != len(after.tests):
            problems.append("some tests did not run")
    finally:
        subprocess.run(["rm", "-rf", str(ws)])
    return inst.instance_id, problems


def test_task_set_shape():
    assert len(INSTANCES) >= 20
    assert len({i.repo for i in INSTANCES}) >= 5
    for inst in INSTANCES:
        assert inst.FAIL_TO_PASS and inst.PASS_TO_PASS and not set(inst.FAIL_TO_PASS) & set(inst.PASS_TO_PASS)
        assert inst.patch.startswith("diff --git") and inst.test_patch.startswith("diff --git")
        assert all(f.startswith("tests/") for f in inst.test_files())
        assert "tests/" not in inst.patch  # the gold patch touches source only
        assert inst.problem_statement.strip() and len(inst.base_commit) == 40


def test_every_shipped_instance_is_valid():
    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(validate, INSTANCES))
    assert {k: v for k, v in results.items() if v} == {}
    assert len(results) == len(INSTANCES)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(preset("tiny-moe").vocab_size)


async def play(env_factory, turns_for, tok, index: int):
    probe = env_factory()
    probe.reset(options={"task_index": index})
    policy = ScriptedPolicy(turns_for(probe), tok)
    probe.close()
    env = env_factory()
    traj = await run_episode(policy, env, tok, SamplingParams(max_new_tokens=4096), options={"task_index": index},
                             max_total_tokens=32768)
    return traj, env


def test_gold_and_noop_episodes_through_the_agent_loop(tok):
    factory = lambda: make("swe-v0")
    gold = lambda env: env.demonstration(env.current_task)

    async def main():
        return await asyncio.gather(play(factory, gold, tok, 0), play(factory, gold, tok, 7),
                                    play(factory, lambda env: [""], tok, 12))

    (g1, e1), (g2, e2), (noop, e3) = asyncio.run(main())
    for traj, env in [(g1, e1), (g2, e2)]:
        assert traj.status == "ok" and traj.reward == 1.0 and traj.turns == 2
        m = env.episode_metrics()
        assert m["resolved"] == 1.0 and m["f2p_passed_frac"] == 1.0 and m["submitted"] == 1.0 and m["tool_calls"] == 2
        art = env.episode_artifacts()
        assert art["patch.diff"] == env.instance.patch and " passed" in art["test_log.txt"]
        assert traj.task_id == env.instance.instance_id
    assert noop.status == "ok" and noop.reward == 0.0 and noop.turns == 1
    m = e3.episode_metrics()
    assert m["resolved"] == 0.0 and m["f2p_passed_frac"] == 0.0 and m["p2p_passed_frac"] == 1.0
    assert e3.episode_artifacts()["patch.diff"] == ""
    for env in (e1, e2, e3):
        ws = env.workspace
        env.close()
        assert not ws.exists()


def test_tools_and_their_errors(tmp_path):
    env = SWEEnv(instance_ids=["agentrl__intervalset-12"], command_timeout=3)
    obs, info = env.reset(seed=0)
    assert [t["function"]["name"] for t in info["tools"]] == ["bash", "view_file", "str_replace", "create_file",
                                                              "submit"]
    assert "remove()" in obs[-1]["content"] and "/workspace" in obs[-1]["content"]
    first_ws = env.workspace
    step = lambda text: env.step(text)[0][0]["content"]
    assert "intervalset/" in step(call("view_file", path="."))
    view = step(call("view_file", path="/workspace/intervalset/iset.py", start_line=1, end_line=3))
    assert view.splitlines()[0].split("\t") == ["     1", '"""IntervalSet: a set of numbers kept as sorted, '
                                                "disjoint, non-touching, non-empty intervals.\"\"\""]
    assert step(call("str_replace", path="intervalset/iset.py", old_str="elif cut.end < item.end:",
                     new_str="if cut.end < item.end:")) == "Edited intervalset/iset.py."
    assert step(call("str_replace", path="intervalset/iset.py", old_str="self", new_str="me")).startswith(
        "Error: ToolError: old_str occurs")
    assert step(call("create_file", path="notes/todo.txt", content="hi\n")) == "Wrote notes/todo.txt."
    assert step(call("bash", command="cat notes/todo.txt && python -m pytest -q tests 2>&1 | tail -1")).startswith(
        "hi\n")
    assert step(call("bash", command="exit 3")).startswith("Error: ToolError: exit code 3")
    assert "wall-clock" in step(call("bash", command="while :; do :; done"))
    assert "output passed the size limit" in step(call("bash", command="yes"))
    # the host-side file tools refuse everything outside the workspace, symlinks included
    outside = tmp_path / "secret.txt"
    outside.write_text("TOP-SECRET")
    step(call("bash", command=f"ln -s {outside} link && ln -s / root"))
    for path in ["link", "root/etc/passwd", "../../etc/passwd", str(outside)]:
        assert "outside /workspace" in step(call("view_file", path=path))
        assert "outside /workspace" in step(call("create_file", path=path, content="x"))
    assert outside.read_text() == "TOP-SECRET"
    env.step(call("bash", command="mkfifo pipe"))
    assert "not a regular file" in step(call("view_file", path="pipe"))  # would block a host-side read
    obs, reward, terminated, _, _ = env.step(call("submit") + call("bash", command="touch late"))
    assert terminated and reward == 1.0 and obs[0]["content"] == "Submitted."
    assert obs[1]["content"].startswith("Error")  # calls after submit are not run
    assert env.episode_metrics()["tool_errors"] >= 8 and not (env.workspace / "late").exists()
    assert "+++ b/notes/todo.txt" in env.episode_artifacts()["patch.diff"]  # new files are part of the patch
    env.reset(seed=0)
    assert not first_ws.exists() and env.workspace.exists()
    env.close()
    assert env.workspace is None


def test_workspace_holds_only_the_base_commit():
    inst = INSTANCES[0]
    env = SWEEnv(instance_ids=[inst.instance_id])
    env.reset(seed=0)
    out = env.bash("git rev-list --all; git tag; git remote; git status --short")
    assert out.split() == [inst.base_commit]
    fixed_blobs = [line.split()[1].split("..")[1] for line in inst.patch.splitlines() if line.startswith("index ")]
    for blob in fixed_blobs:  # the gold version of each patched file is nowhere in the repository
        assert "Error" in env.step(call("bash", command=f"git cat-file -t {blob[:7]}"))[0][0]["content"]
    env.close()


def test_task_index_and_seeded_draws():
    env = SWEEnv()
    assert env.num_tasks() == len(INSTANCES)
    obs, info = env.reset(options={"task_index": 5})
    assert info["task_id"] == INSTANCES[5].instance_id
    ids = {env.reset(seed=s)[1]["task_id"] for s in range(12)}
    assert len(ids) > 3 and env.reset(seed=3)[1] == env.reset(seed=3)[1]
    env.close()


def test_check_env():
    env = SWEEnv(instance_ids=[INSTANCES[0].instance_id, INSTANCES[1].instance_id])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    assert not [str(w.message) for w in caught if "gymnasium" in w.filename]
    env.close()


def test_user_swe_bench_jsonl_round_trip(tmp_path, tok):
    inst = INSTANCES[3]
    # HF-style row: test lists as JSON strings, extra fields; the repository as a plain git directory
    row = {**inst.to_row(), "FAIL_TO_PASS": json.dumps(inst.FAIL_TO_PASS),
           "PASS_TO_PASS": json.dumps(inst.PASS_TO_PASS), "environment_setup_commit": inst.base_commit,
           "hints_text": None}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (tmp_path / "repos").mkdir()
    bundle = resolve_repo(inst.repo, DATA_DIR / "repos")
    subprocess.run(["git", "clone", "-q", str(bundle), str(tmp_path / "repos" / inst.repo.split("/")[1])], check=True)
    loaded = load_instances(path)
    assert loaded[0].FAIL_TO_PASS == inst.FAIL_TO_PASS and loaded[0].PASS_TO_PASS == inst.PASS_TO_PASS
    assert loaded[0].extra["environment_setup_commit"] == inst.base_commit
    dump_instances(loaded, tmp_path / "again.jsonl")
    assert load_instances(tmp_path / "again.jsonl") == loaded
    env = SWEEnv(instances=str(path), repos=str(tmp_path / "repos"))
    env.reset(seed=0)
    turns = env.demonstration(env.current_task)
    assert [env.step(turn)[1:3] for turn in turns] == [(0.0, False), (1.0, True)]
    env.close()
    with pytest.raises(ValueError, match="missing fields"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"instance_id": "x", "repo": "a/b"}) + "\n")
        load_instances(bad)
    with pytest.raises(FileNotFoundError, match="no repository"):
        resolve_repo("someone/elsewhere", tmp_path / "repos")


def test_partial_credit():
    inst = next(i for i in INSTANCES if len(i.FAIL_TO_PASS) == 2)
    env = SWEEnv(instance_ids=[inst.instance_id], partial_credit=True)
    env.reset(seed=0)
    _, reward, terminated, _, _ = env.step("I give up.")
    total = len(inst.FAIL_TO_PASS) + len(inst.PASS_TO_PASS)
    assert terminated and reward == pytest.approx(len(inst.PASS_TO_PASS) / total)
    env.close()


def test_eval_recipe_gold_100_noop_0(tmp_path):
    from agentrl.evaluate import evaluate
    from agentrl.model.checkpoint import init_model
    from agentrl.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    train = load_recipe(root / "swe_train.yaml")
    env = make(train.env.id, **train.env.kwargs)
    assert 0 < env.num_tasks() < len(INSTANCES)  # the training recipe holds projects out
    env.close()
    ckpt = init_model("tiny-moe", tmp_path / "m")
    recipe = load_recipe(root / "swe_eval.yaml", [f"model.path={ckpt}", "model.init=null", "eval.episodes=4",
                                                  "eval.samples=2", f"output.dir={tmp_path / 'runs'}"])
    gold = evaluate(recipe, policy="gold", progress=False)
    noop = evaluate(recipe, policy="noop", progress=False)
    assert gold["episodes"] == noop["episodes"] == 8 and gold["tasks"] == 4
    assert gold["reward_mean"] == gold["pass@2"] == gold["resolved_mean"] == 1.0
    assert noop["reward_mean"] == noop["pass@2"] == noop["resolved_mean"] == 0.0
    out = tmp_path / "runs" / "swe_eval" / "eval"
    patches = sorted(out.glob("gold/*/patch.diff"))
    assert len(patches) == 8 and {p.read_text() for p in patches} == {i.patch for i in INSTANCES[:4]}
    assert all("passed" in p.read_text() for p in out.glob("gold/*/test_log.txt"))
    assert all(p.read_text() == "" for p in out.glob("noop/*/patch.diff"))


def _hack(ws: Path, inst: SWEInstance, kind: str) -> None:
    """What a policy can write into the workspace to pass the tests without fixing anything."""
    fake = "".join(f"PASSED {t}\n" for t in [*inst.FAIL_TO_PASS, *inst.PASS_TO_PASS])
    # a pytest hook that turns every test report into a pass
    hook = ("import pytest\n\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
            "    out = yield\n    out.get_result().outcome = 'passed'\n")
    if kind == "pytest.py":  # shadows pytest under `python -m pytest`: prints a passing summary, exits 0
        (ws / "pytest.py").write_text(f"import sys\nprint({fake!r})\nsys.exit(0)\n")
    elif kind == "conftest.py":  # the hook at the root and beside the tests
        for d in {ws, *((ws / f).parent for f in inst.test_files())}:
            (d / "conftest.py").write_text(hook)
    elif kind == "pytest.ini":  # config that loads a workspace module with the hook as a plugin
        (ws / "passall.py").write_text(hook)
        (ws / "pytest.ini").write_text("[pytest]\naddopts = -p passall\n")
    elif kind == "printed summary":  # every function of the package prints PASSED lines when called: a
        # passing test's captured output (shown by -rA) then precedes pytest's own summary
        pkg = next(p for p in ws.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "tests")
        wrap = (f"\nimport functools as _ft\n_FAKE = {fake!r}\n"
                "def _loud(f):\n    @_ft.wraps(f)\n    def g(*a, **k):\n        print(_FAKE)\n"
                "        return f(*a, **k)\n"
                "    return g\n"
                "for _n, _v in list(globals().items()):\n"
                "    if callable(_v) and getattr(_v, '__module__', None) == __name__ and not isinstance(_v, type):\n"
                "        globals()[_n] = _loud(_v)\n")
        for f in pkg.rglob("*.py"):
            f.write_text(f.read_text() + wrap)


@pytest.mark.parametrize("kind", ["pytest.py", "conftest.py", "pytest.ini", "printed summary"])
def test_grading_resists_reward_hacks(kind):
    """A workspace left unfixed but hacked is graded unresolved (F2P failing), and each hack does fool a
    plain `python -m pytest -rA` grader; the gold patch still resolves with the hack in place."""
    import re

    from envs.swe.workspace import _STATUS

    inst = INSTANCES[0]
    ws = make_workspace(resolve_repo(inst.repo, DATA_DIR / "repos"), inst.base_commit)
    try:
        sandbox = Sandbox(ws, timeout=120)
        _hack(ws, inst, kind)
        # a plain grader (pytest -rA on the workspace as it is, its summary lines parsed) is fooled
        tests = [*inst.FAIL_TO_PASS, *inst.PASS_TO_PASS]
        assert sandbox.run(f"git apply <<'EOF'\n{inst.test_patch}EOF").ok  # grading resets it again
        plain = sandbox.run("python -m pytest -rA -p no:cacheprovider -q " + " ".join(tests), timeout=120)
        seen: dict[str, str] = {}
        for status, test_id in _STATUS.findall(plain.stdout):
            seen.setdefault(test_id, status)
        assert all(seen.get(t) == "PASSED" for t in tests), f"the {kind} hack should fool a plain grader"
        res = grade(sandbox, inst, timeout=120)
        assert not res.resolved and res.f2p_passed == 0, res.log[-2000:]
        assert res.p2p_passed == res.p2p_total  # the unhacked tests still run and pass
        assert sandbox.run(f"git apply <<'EOF'\n{inst.patch}EOF").ok
        _hack(ws, inst, kind)
        assert grade(sandbox, inst, timeout=120).resolved
        assert re.search(r"AGENTRL-GRADE-[0-9a-f]{32}:", res.log)
    finally:
        subprocess.run(["rm", "-rf", str(ws)])
