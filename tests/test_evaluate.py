"""`agentrl eval`: reference policies validate the harness; the model policy runs on the embedded engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentrl.env import Task, ToolEnv
from agentrl.evaluate import evaluate
from agentrl.model.checkpoint import init_model
from agentrl.recipe import parse_recipe


def recipe(tmp_path, **env_kwargs):
    ckpt = init_model("tiny-moe", tmp_path / "m")
    return parse_recipe({
        "name": "ev", "model": {"path": str(ckpt)}, "runtime": {"steps": 1},
        "env": {"id": "calculator-v0", "kwargs": {"compact": True, **env_kwargs}},
        "rollout": {"max_new_tokens": 24, "max_total_tokens": 512},
        "eval": {"episodes": 12, "samples": 2}, "output": {"dir": str(tmp_path / "runs")},
    })


def test_gold_scores_100_and_noop_0(tmp_path):
    r = recipe(tmp_path)
    gold = evaluate(r, policy="gold", progress=False)
    noop = evaluate(r, policy="noop", progress=False)
    assert gold["reward_mean"] == 1.0 and gold["pass@2"] == 1.0 and gold["episodes"] == 24
    assert noop["reward_mean"] == 0.0 and noop["pass@2"] == 0.0
    lines = (tmp_path / "runs" / "ev" / "eval" / "episodes_gold.jsonl").read_text().splitlines()
    assert len(lines) == 24 and all(json.loads(x)["reward"] == 1.0 for x in lines)
    # a flawed demonstration set is measurably wrong (the quickstart's warm-up data)
    flawed = evaluate(recipe(tmp_path / "f", demo_flaw=1.0, digits=2, word_problems=False), policy="gold",
                      progress=False)
    assert 0 < flawed["reward_mean"] < 1


def test_model_policy_through_the_cli(tmp_path):
    r = recipe(tmp_path)
    path = tmp_path / "ev.yaml"
    import yaml

    path.write_text(yaml.safe_dump(r.resolved()))
    out = subprocess.run([str(Path(sys.executable).with_name("agentrl")), "eval", str(path)], capture_output=True,
                         text=True, timeout=300, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["policy"] == "model" and summary["episodes"] == 24
    assert sum(summary["status"].values()) == 24 and 0.0 <= summary["reward_mean"] <= 1.0


class IndexedEnv(ToolEnv):
    """A finite task set: task i asks for the number i; the answer ends the episode."""

    def num_tasks(self):
        return 5

    def task(self, rng, options):
        i = options["task_index"] if "task_index" in options else int(rng.integers(5))
        self.index = i
        return Task(messages=[{"role": "user", "content": f"Say {i}."}], answer=str(i), id=f"t{i}")

    def reward(self, task, history, final_text):
        return float(final_text.strip() == task.answer)

    def demonstration(self, task):
        return [task.answer]

    def episode_metrics(self):
        return {"index": self.index, "answered": float(self.history[-1]["role"] == "assistant")}

    def episode_artifacts(self):
        return {"note.txt": f"task {self.index}: " + self.history[-1]["content"]}


def test_finite_task_set_visits_each_task_once_per_sample(tmp_path):
    ckpt = init_model("tiny-moe", tmp_path / "m")
    r = parse_recipe({"name": "fin", "model": {"path": str(ckpt)}, "runtime": {"steps": 1},
                      "env": {"id": "test_evaluate:IndexedEnv"}, "eval": {"episodes": 100, "samples": 3},
                      "output": {"dir": str(tmp_path / "runs")}})
    s = evaluate(r, policy="gold", progress=False)
    assert s["tasks"] == 5 and s["episodes"] == 15 and s["reward_mean"] == 1.0 and s["pass@3"] == 1.0
    assert s["index_mean"] == sum(range(5)) / 5 and s["answered_mean"] == 1.0
    out = tmp_path / "runs" / "fin" / "eval"
    recs = [json.loads(x) for x in (out / "episodes_gold.jsonl").read_text().splitlines()]
    assert sorted((x["task"], x["sample"]) for x in recs) == sorted((f"task{i}", k) for i in range(5) for k in range(3))
    for i in range(5):
        assert (out / "gold" / f"task{i}_2" / "note.txt").read_text() == f"task {i}: {i}"
    noop = evaluate(r, policy="noop", progress=False)
    assert noop["reward_mean"] == 0.0 and noop["tasks"] == 5


def test_reference_policies_need_no_model(tmp_path):
    r = parse_recipe({"name": "nomodel", "model": {"init": {"preset": "tiny-moe"}}, "runtime": {"steps": 1},
                      "env": {"id": "calculator-v0", "kwargs": {"compact": True}}, "eval": {"episodes": 3},
                      "output": {"dir": str(tmp_path / "runs")}})
    assert evaluate(r, policy="gold", progress=False)["reward_mean"] == 1.0
    with pytest.raises(FileNotFoundError, match="no model"):
        evaluate(r, policy="model", progress=False)
