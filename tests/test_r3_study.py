"""The R3 collapse study: the collapse rule on hand-made curves, the study recipes' invariants, and
the report on real run directories (metrics.jsonl written by the run logger)."""

from __future__ import annotations

import numpy as np
import pytest

from agentrl.algo.collapse import CollapseRule, detect_collapse, smooth

RULE = CollapseRule(window=3, drop=0.2, patience=3, f2_threshold=0.1)


def test_smooth_is_a_trailing_mean():
    np.testing.assert_allclose(smooth([0, 3, 6, 9], 2), [0, 1.5, 4.5, 7.5])
    np.testing.assert_allclose(smooth([1, np.nan, 3], 3), [1, 1, 2])


def test_rise_then_plateau_is_not_a_collapse():
    c = detect_collapse([0.1, 0.3, 0.5, 0.7, 0.8, 0.8, 0.75, 0.8, 0.78, 0.8], rule=RULE)
    assert not c.collapsed and c.step is None and c.reason == ""
    # smoothed curve peaks at (0.8 + 0.8 + 0.75) / 3 ... hand-computed best: steps 7..9 -> (0.8+0.78+0.8)/3
    assert c.best == pytest.approx(max((0.8 + 0.8 + 0.75) / 3, (0.75 + 0.8 + 0.78) / 3, (0.8 + 0.78 + 0.8) / 3,
                                       (0.7 + 0.8 + 0.8) / 3))


def test_drop_that_never_recovers_is_a_collapse_at_its_start():
    r = [0.5, 0.8, 0.8, 0.8, 0.8, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0]
    # smoothed: ..., s4=0.8 (best, first at step 3), s5=0.633, s6=0.4 (< 0.6: below from here on)
    c = detect_collapse(r, rule=RULE)
    assert c.collapsed and c.reason == "reward" and c.step == 6
    assert c.best == pytest.approx(0.8) and c.best_step == 3


def test_drop_that_recovers_is_not_a_collapse():
    r = [0.8, 0.8, 0.8, 0.1, 0.1, 0.1, 0.8, 0.8, 0.8, 0.8]
    assert not detect_collapse(r, rule=RULE).collapsed


def test_drop_in_the_last_steps_is_not_yet_evidence():
    r = [0.8] * 8 + [0.0, 0.0]  # smoothed below the bar only at the last step (< patience)
    assert not detect_collapse(r, rule=RULE).collapsed


def test_sustained_f2_is_a_collapse_even_while_reward_holds():
    r = [0.8] * 10
    f2 = [0.01] * 4 + [0.3] * 6  # smoothed: s4=0.107 > 0.1 from step 4 on
    c = detect_collapse(r, f2, rule=RULE, steps=list(range(1, 11)))
    assert c.collapsed and c.reason == "f2" and c.step == 5  # logged step numbers start at 1
    one_spike = [0.01] * 4 + [0.5] + [0.01] * 5  # unsmoothed (window 1): over 0.1 for one step < patience
    assert detect_collapse(r, one_spike, rule=CollapseRule(window=1, drop=0.2, patience=3)).collapsed is False


def test_both_rules_report_the_earlier_step():
    r = [0.8, 0.8, 0.8, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0]
    f2 = [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    c = detect_collapse(r, f2, rule=RULE)
    assert c.reason == "reward+f2" and c.step == 2  # f2 smoothed: s2 = 0.5/3 > 0.1; reward: s5 = 0.267 < 0.6


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        detect_collapse([])
    with pytest.raises(ValueError):
        detect_collapse([0.1, 0.2], [0.0])


# ------------------------------------------------------------------ the study recipes and driver
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from agentrl.recipe import load_recipe  # noqa: E402
from agentrl.runtime.logging import RunLogger  # noqa: E402

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import r3_study  # noqa: E402
import r3_study_report  # noqa: E402

STUDY = sorted((ROOT / "recipes" / "r3_study").glob("*.yaml"))


def test_variants_differ_only_in_name_and_learner():
    assert {p.stem for p in STUDY} == set(r3_study.VARIANTS) == set(r3_study_report.ORDER)
    raw = {p.stem: yaml.safe_load(p.read_text()) for p in STUDY}
    base = raw["grpo"]
    for stem, data in raw.items():
        assert data["name"] == f"r3_study_{stem}"
        assert {k: v for k, v in data.items() if k not in ("name", "learner")} == \
               {k: v for k, v in base.items() if k not in ("name", "learner")}, stem
        rec = load_recipe(ROOT / "recipes" / "r3_study" / f"{stem}.yaml")
        ln = rec.learner
        assert (ln.replay == "R3") == ("r3" in stem)
        assert (ln.loss == "gspo") == stem.startswith("gspo")
        assert (ln.correction == "tis") == ("tis" in stem)
        assert ln.correction.startswith("metropolis") == ("metropolis" in stem)
        assert ln.lr == base["learner"]["lr"] and ln.mini_batches == 1
        assert rec.runtime.mode == "sync" and rec.model.init.preset == "small-moe"
    combos = {(load_recipe(p).learner.replay, load_recipe(p).learner.loss, load_recipe(p).learner.correction)
              for p in STUDY}
    assert len(combos) == len(STUDY)  # seven distinct learners


def test_driver_command_is_a_valid_recipe(tmp_path):
    cmd = r3_study.train_command("grpo_tis_r3", 2, tmp_path / "warm", tmp_path, 7, ["learner.lr=1e-3"])
    i = cmd.index("train")
    rec = load_recipe(cmd[i + 1], cmd[i + 2:])
    assert rec.model.path == str(tmp_path / "warm") and rec.model.init is None and rec.warmup is None
    assert rec.name == "grpo_tis_r3_s2" and rec.output.dir == str(tmp_path) and rec.runtime.steps == 7
    assert rec.learner.seed == 2 and rec.env.train_seeds == (200_000, 1_000_000) and rec.learner.lr == 1e-3


def _fake_run(study: Path, name: str, reward: list[float], f2: list[float], final_eval: float | None) -> None:
    run = study / name
    with RunLogger(run, tensorboard=False, console="quiet", plots=False) as log:
        for i, (r, f) in enumerate(zip(reward, f2), start=1):
            log.log(i, {"reward_mean": r, "extreme_frac_2": f, "mismatch_kl": 1e-3 + f / 10, "grad_norm": 1.0,
                        "entropy": 0.5, "routing_disagree_any": 0.05})
    if final_eval is not None:
        (run / "summary.json").write_text(json.dumps({"final_eval_reward": final_eval}))


def test_report_tables_and_plots_runs(tmp_path):
    study, docs = tmp_path / "study", tmp_path / "docs"
    _fake_run(study, "grpo_s0", [0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
              [0.01] * 7 + [0.2] * 7, 0.1)
    _fake_run(study, "grpo_r3_s0", [0.5, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
              [0.0] * 14, 0.9)
    _fake_run(study, "gspo_s1", [0.5, 0.6, 0.6], [0.0] * 3, None)  # unfinished (no summary.json)
    rows = r3_study_report.report(study, docs, prefix="t", rule=RULE)
    by = {r["run"]: r for r in rows}
    assert [r["run"] for r in rows] == ["grpo_s0", "grpo_r3_s0", "gspo_s1"]  # the study's variant order
    g, r3 = by["grpo_s0"], by["grpo_r3_s0"]
    # grpo: F(2) smoothed passes 0.1 at logged step 9 ((0.01 + 0.2 + 0.2) / 3); reward falls below
    # 0.8 - 0.2 for good at step 9 too (step 8: (0.8 + 0.8 + 0.3) / 3 = 0.63; step 9: (0.8 + 0.3 + 0) / 3)
    assert g["collapsed"] and g["collapse_step"] == 9 and g["collapse_reason"] == "reward+f2"
    assert g["best"] == pytest.approx(0.8) and g["best_step"] == 5 and g["eval"] == 0.1
    assert not r3["collapsed"] and r3["best"] == pytest.approx(0.9) and r3["f2_max"] == 0.0
    assert not by["gspo_s1"]["finished"] and by["gspo_s1"]["eval"] is None
    md = (study / "report.md").read_text()
    assert "step 9 (reward+f2)" in md and "never" in md and "(unfinished)" in md
    assert json.loads((study / "report.json").read_text()) == json.loads(json.dumps(rows))
    assert (docs / "t_curves.png").stat().st_size > 0


def test_report_aggregates_variants_over_seeds(tmp_path):
    study, docs = tmp_path / "study", tmp_path / "docs"
    falls = [0.5, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    holds = [0.5, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    _fake_run(study, "grpo_s0", falls, [0.0] * 14, 0.1)
    _fake_run(study, "grpo_s1", holds, [0.0] * 14, 0.7)
    _fake_run(study, "grpo_r3_s0", holds, [0.0] * 14, 0.9)
    rows = r3_study_report.report(study, docs, prefix="t", rule=RULE)
    agg = {a["variant"]: a for a in r3_study_report.aggregate(rows)}
    assert list(agg) == ["grpo", "grpo_r3"]  # the study's variant order
    g = agg["grpo"]
    assert g["seeds"] == [0, 1] and g["collapsed"] == 1 and agg["grpo_r3"]["collapsed"] == 0
    by = {r["run"]: r for r in rows}
    assert g["eval"] == pytest.approx((0.1 + 0.7) / 2)
    assert g["final"] == pytest.approx((by["grpo_s0"]["final"] + by["grpo_s1"]["final"]) / 2)
    assert g["mismatch_kl"] == pytest.approx((by["grpo_s0"]["mismatch_kl"] + by["grpo_s1"]["mismatch_kl"]) / 2)
    md = (study / "report.md").read_text()
    assert "By variant, over seeds" in md and "| grpo | 2 | 1/2 |" in md
