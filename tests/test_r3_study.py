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
