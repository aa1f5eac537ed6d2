"""RunLogger: metrics.jsonl (strict JSON, null for NaN), TensorBoard scalars, the console table, plots."""

import json
import math

import matplotlib.image
import pytest

from agentrl.runtime.logging import DEFAULT_COLUMNS, LABELS, RunLogger, plot_metrics, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic(step: int) -> dict[str, float]:
    m = {"reward_mean": step / 30, "mismatch_kl": 1e-3 / (step + 1), "extreme_frac_2": 0.0,
         "routing_disagree_any": 0.07 * (step % 3), "staleness_mean": 0.5, "samples_per_s": 123.456789,
         "grad_norm": float("nan") if step == 5 else 1.0 + step, "entropy": 0.9, "trained_sequences": 64}
    if step % 10 == 0:
        m["eval_reward"] = 0.1 * step
    return m


@pytest.fixture
def logged(tmp_path, capsys):
    run = tmp_path / "run"
    logger = RunLogger(run)
    for step in range(30):
        logger.log(step, synthetic(step))
    plots = logger.finish()
    return run, plots, capsys.readouterr().out


def test_metrics_jsonl(logged):
    run, _, _ = logged
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
    records = [json.loads(ln) for ln in lines]  # strict JSON: no NaN tokens
    assert "NaN" not in "".join(lines)
    assert [r["step"] for r in records] == list(range(30))
    assert list(records[0])[:2] == ["step", "time"] and all(r["time"] >= 0 for r in records)
    assert records[5]["grad_norm"] is None and records[6]["grad_norm"] == 7.0
    assert "eval_reward" in records[10] and "eval_reward" not in records[11]
    assert records == read_metrics(run / "metrics.jsonl")


def test_tensorboard_scalars(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = logged
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(synthetic(0)) <= tags
    reward = acc.Scalars("reward_mean")
    assert [e.step for e in reward] == list(range(30))
    assert math.isclose(reward[12].value, 12 / 30, rel_tol=1e-6)
    assert [e.step for e in acc.Scalars("eval_reward")] == [0, 10, 20]
    assert len(acc.Scalars("grad_norm")) == 29  # the NaN is in the jsonl (null), not in TensorBoard


def test_plots(logged):
    run, plots, _ = logged
    assert sorted(p.name for p in plots) == ["mismatch.png", "reward.png", "staleness.png"]
    for p in plots:
        assert p.parent == run / "plots"
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 0 and img.shape[1] > 0


def test_console_table(logged):
    _, _, out = logged
    lines = out.splitlines()
    header_at = [i for i, ln in enumerate(lines) if ln.split()[:1] == ["step"]]
    assert header_at == [0, 21]  # header, 20 rows, header again
    headers = [lines[i] for i in header_at]
    assert headers[0].split() == ["step", *(LABELS[c] for c in DEFAULT_COLUMNS)]
    rows = [ln for ln in lines if ln.split()[:1] and ln.split()[0].isdigit()]
    assert len(rows) == 30 and len(lines) == 32
    assert "123.5" in rows[0] and "nan" in rows[5]  # ~4 significant digits; NaN shown as nan
    assert len(rows[1].split()) == len(rows[0].split()) - 1  # eval_reward blank where absent
    assert len({len(ln) for ln in headers + rows}) == 1  # fixed width


def test_quiet_and_no_tensorboard(tmp_path, capsys):
    import numpy as np
    import torch

    logger = RunLogger(tmp_path, tensorboard=False, console="quiet", plots=False)
    logger.log(0, {"reward_mean": torch.tensor(1.0), "grad_norm": np.float32(2.5), "n": np.int64(3),
                   "kl": float("inf")})
    with logger.progress(3, "rollouts") as bar:
        bar.update(3)
    assert logger.finish() == []
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path / "metrics.jsonl")[0] | {"time": 0} == {
        "step": 0, "time": 0, "reward_mean": 1.0, "grad_norm": 2.5, "n": 3, "kl": None}


def test_plot_only_present_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "time": 0.0, "staleness_mean": 1.0}) + "\n"
                    + '{"step": 1, "time": 0.1, "stale')  # a crash mid-write leaves a partial line
    assert [p.name for p in plot_metrics(path, tmp_path / "plots")] == ["staleness.png"]
    with pytest.raises(ValueError):
        RunLogger(tmp_path, console="fancy")
