"""The runtime on a real local Ray cluster: async and sync runs, killed actors, kill -9 and resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from agentrl.recipe import load_recipe
from agentrl.runtime.logging import read_metrics
from agentrl.runtime.train import train

BASE = {
    "model": {"init": {"preset": "tiny-moe"}},
    "env": {"id": "calculator-v0", "kwargs": {"compact": True, "digits": 2, "word_problems": False}},
    "warmup": {"steps": 3, "demos": 32, "batch_size": 8},
    "rollout": {"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 16, "max_total_tokens": 512},
    "learner": {"lr": 1e-4, "replay": "R3"},
    "runtime": {"mode": "async", "steps": 4, "checkpoint_every": 2, "eval_every": 2},
    "eval": {"episodes": 4},
    "output": {"tensorboard": True, "plots": True, "console": "quiet"},
}


def recipe_file(tmp_path: Path, name: str, **sections) -> Path:
    data = json.loads(json.dumps(BASE))
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    data["name"] = name
    data["output"]["dir"] = str(tmp_path / "runs")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_gpus_the_cluster_lacks_are_a_clear_error_not_a_pending_actor(tmp_path):
    """Ray would leave an actor whose GPUs the cluster lacks pending forever: the run refuses to start."""
    path = recipe_file(tmp_path, "no-gpus", warmup=None, learner={"device": "cuda"},
                       engine={"backend": "sglang", "num_gpus_per_engine": 1000})

    def hung(*_):  # without the check, train() would wait forever (SIGALRM: no thread, Ray stays on this one)
        raise TimeoutError("train() neither failed nor returned")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(180)
    try:
        with pytest.raises(RuntimeError) as info:
            train(load_recipe(path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert ("GPUs; 1 engine(s) x engine.num_gpus_per_engine=1000 + 1 for the learner (learner.device=cuda) "
            "need 1001") in str(info.value)
    assert not list((tmp_path / "runs" / "no-gpus").glob("weights/v_*"))  # no actor was started


REQUIRED = ["step", "reward_mean", "mismatch_kl", "extreme_frac_2", "routing_disagree_any", "staleness_mean",
            "samples_per_s"]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_run_writes_everything_a_user_looks_at(tmp_path, mode):
    recipe = load_recipe(recipe_file(tmp_path, f"run-{mode}", runtime={"mode": mode}))
    summary = train(recipe)
    run = tmp_path / "runs" / f"run-{mode}"
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert all(k in r for k in REQUIRED), set(REQUIRED) - set(r)
        assert r["rows_missing"] == 0 and 0 <= r["routing_disagree_any"] <= 1
    if mode == "sync":
        assert all(r["staleness_mean"] == 0 for r in rows)
    else:
        assert max(r["staleness_max"] for r in rows) <= 1
    # each group trained exactly once
    assert len(summary["trained_groups"]) == len(set(summary["trained_groups"])) == 4 * 2
    assert (run / "config.yaml").exists() and list((run / "tensorboard").glob("events.*"))
    assert {p.name for p in (run / "plots").glob("*.png")} >= {"reward.png", "mismatch.png", "staleness.png"}
    ckpt = run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()
    assert ckpt.name == "step_4" and (ckpt / "trainer_state.pt").exists()
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(ckpt)  # checkpoints are HF layout
    assert "final_eval_reward" in summary


def _kill_when_running(kind: str, metrics: Path, killed: list) -> None:
    """From another thread: once the run has logged its first update (async: rollout jobs are in
    flight from then on), kill the named actor; Ray restarts it."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and any("reward_mean" in r for r in read_metrics(metrics)) and ray.is_initialized():
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f":{kind}:" in a["name"]]
            if names:
                ray.kill(ray.get_actor(names[-1]), no_restart=False)
                killed.append(names[-1])
                return
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["worker", "engine"])
def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_repeated(tmp_path, kind):
    recipe = load_recipe(recipe_file(tmp_path, f"kill-{kind}", runtime={"steps": 5, "checkpoint_every": 0,
                                                                        "eval_every": 0}, eval=None))
    killed: list = []
    t = threading.Thread(target=_kill_when_running,
                         args=(kind, tmp_path / "runs" / f"kill-{kind}" / "metrics.jsonl", killed))
    t.start()
    summary = train(recipe)
    t.join()
    assert killed, "the actor was never killed"
    assert summary["steps"] == 5
    groups = summary["trained_groups"]
    assert len(groups) == len(set(groups)) == 5 * 2  # no group lost, none counted twice
    if kind == "worker":
        assert summary["jobs_retried"] >= 1


def test_kill_9_during_training_then_resume(tmp_path):
    path = recipe_file(tmp_path, "crash", runtime={"steps": 6, "checkpoint_every": 2, "eval_every": 0}, eval=None)
    run = tmp_path / "runs" / "crash"
    agentrl = str(Path(sys.executable).with_name("agentrl"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TQDM_DISABLE"] = "1"
    proc = subprocess.Popen([agentrl, "train", str(path)], start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "checkpoints" / "LATEST"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "no checkpoint was written"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-training
    proc.wait()
    first = marker.read_text().strip()
    done_before = int(first.split("_")[1])
    assert done_before < 6
    out = subprocess.run([agentrl, "train", str(path), "--resume"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / first}" in out.stdout
    # Ray logs this (once per driver process) for a restartable actor whose constructor holds object
    # references, e.g. actor handles: its restart could fail (ray-project/ray#53727)
    assert "has constructor arguments in the object store" not in out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6
    groups = summary["trained_groups"]
    assert len(groups) == len(set(groups)) == 6 * 2
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "reward_mean" in r]
    assert steps[-(6 - done_before):] == list(range(done_before + 1, 7))


def test_joins_a_cluster_started_with_ray_start(tmp_path):
    """`ray start --head` in its own session; `agentrl train` joins it via RAY_ADDRESS, then via --address."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TQDM_DISABLE"] = "1"
    # its own --temp-dir (short: socket paths): the machine's "current cluster" record (/tmp/ray) is left alone
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen([str(bindir / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--temp-dir={ray_tmp}",
                             "--include-dashboard=false", "--disable-usage-stats"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ray_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        for name, extra, run_env in (("via-env", [], ray_env), ("via-flag", ["--address", f"127.0.0.1:{port}"], env)):
            path = recipe_file(tmp_path, name, runtime={"steps": 1, "checkpoint_every": 0, "eval_every": 0},
                               warmup=None, eval=None)
            out = subprocess.run([str(bindir / "agentrl"), "train", str(path), *extra], env=run_env,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stderr[-3000:]
            summary = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
            assert summary["steps"] == 1
            assert summary["ray"]["gcs_address"].rsplit(":", 1)[1] == str(port)  # the head's GCS, not a new cluster
        assert head.poll() is None  # the cluster outlives the runs that joined it
        current = Path("/tmp/ray/ray_current_cluster")
        assert not current.exists() or str(port) not in current.read_text()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("policy", ["drop", "wait"])
def test_groups_that_grow_stale_in_the_buffer_are_dropped_or_generated_again(tmp_path, monkeypatch, policy):
    """Two timings injected on the driver make the batch-time staleness check decide:
    - the engines load each version one publish late (a slow weight load), so rollouts run on the
      weights of version n - 1 while the driver is at n: admitted with staleness 1 (= max_staleness);
    - the learner finishes after the rollouts in flight (a slow learner): those groups are admitted
      before the update ends, and are one version older (staleness 2) when the next batch is formed.
    The check must keep them out (drop: counted; wait: generated again, counted): no update trains on
    a trajectory older than max_staleness, and no group is trained twice. Without the batch-time
    check this test trains staleness-2 samples."""
    import agentrl.runtime.train as train_mod

    held: list = []

    def lagging_publish(learner, engines, recipe, wait=True):
        state_ref, version_ref, _ = learner.publish.options(num_returns=3).remote(background=True)
        version = ray.get(version_ref)
        late = held[-1] if held else None  # the engines get the previous version now, this one next time
        held.append((state_ref, version))
        pending = [e.update_weights.remote(*late, recipe.runtime.in_flight) for e in engines] if late else []
        return version, pending

    real_wait = ray.wait

    def learner_after_rollouts(refs, num_returns=1, **kw):
        ready, rest = real_wait(refs, num_returns=num_returns, **kw)
        if len(refs) > 1 and refs[-1] in ready and rest:  # the update (listed last) ended first: let the
            more, _ = real_wait(rest, num_returns=len(rest), timeout=60)  # rollouts in flight land before it
            done = set(ready) | set(more)
            ready = [r for r in refs if r in done]  # in list order: rollouts first, the update last
        return ready, [r for r in refs if r not in ready]

    monkeypatch.setattr(train_mod, "publish", lagging_publish)
    monkeypatch.setattr(train_mod.ray, "wait", learner_after_rollouts)
    recipe = load_recipe(recipe_file(
        tmp_path, f"stale-{policy}", warmup=None, eval=None,
        runtime={"steps": 5, "checkpoint_every": 0, "eval_every": 0, "max_staleness": 1, "stale_policy": policy}))
    summary = train(recipe)
    rows = [r for r in read_metrics(tmp_path / "runs" / f"stale-{policy}" / "metrics.jsonl") if "reward_mean" in r]
    assert [r["step"] for r in rows] == list(range(1, 6))
    assert max(r["staleness_max"] for r in rows) <= 1  # never trained beyond max_staleness
    groups = summary["trained_groups"]
    assert len(groups) == len(set(groups)) == 5 * 2
    if policy == "drop":
        assert summary["dropped_stale"] > 0 and summary["regenerated_stale"] == 0
    else:
        assert summary["regenerated_stale"] > 0 and summary["dropped_stale"] == 0
