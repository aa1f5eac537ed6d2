"""The README's example environment, executed from the README itself, end to end."""

import asyncio
import re
from pathlib import Path

from gymnasium.utils.env_checker import check_env
from transformers import AutoTokenizer

from agentrl.engine.engine import Engine
from agentrl.engine.types import SamplingParams
from agentrl.model.checkpoint import init_model
from agentrl.rollout import run_episode, run_episodes

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_env():
    code = re.search(r"# README example\n(.*?)# end README example", README.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns["WordLengthEnv"]


def test_readme_env_runs_end_to_end(tmp_path):
    Env = readme_env()
    check_env(Env(), skip_render_check=True)
    # a scripted turn through the real tool: call, then answer
    env = Env()
    obs, info = env.reset(seed=0)
    word = obs[-1]["content"].split("'")[1]
    obs, r, term, trunc, _ = env.step('<tool_call>\n{"name": "word_length", "arguments": {"word": "%s"}}\n</tool_call>' % word)
    assert obs[0]["content"] == str(len(word)) and not term
    _, r, term, _, _ = env.step(str(len(word)))
    assert term and r == 1.0
    # and with the real engine + agent loop (a random model: it runs, it is not expected to succeed)
    ckpt = init_model("tiny-moe", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(ckpt)
    with Engine.from_pretrained(ckpt) as engine:
        trajs = asyncio.run(run_episodes(engine, Env, tok, SamplingParams(max_new_tokens=16), seeds=range(2),
                                         group_size=2, layout=engine.layout))
        single = asyncio.run(run_episode(engine, Env(), tok, SamplingParams(max_new_tokens=8), seed=5,
                                         layout=engine.layout))
    for t in trajs + [single]:
        assert t.status in ("ok", "truncated")
        t.validate(engine.layout)
