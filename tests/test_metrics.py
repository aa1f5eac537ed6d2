"""Tests for agentrl.algo.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agentrl.algo.metrics import (
    effective_sample_size,
    extreme_fraction,
    log_ratio,
    mismatch_kl,
    mismatch_metrics,
    ratio_extremeness,
    routing_disagreement,
    routing_metrics,
)

LN = math.log


def t64(xs):
    return torch.tensor(xs, dtype=torch.float64)


# --------------------------------------------------------------------------- k3


def _k3_term(lt: float, li: float) -> float:
    r = math.exp(lt - li)
    return r - 1.0 - math.log(r)


def test_log_ratio_elementwise():
    a = t64([[0.0, -1.0], [-2.0, -3.0]])
    b = t64([[-1.0, -1.0], [0.0, -0.5]])
    assert torch.equal(log_ratio(a, b), a - b)
    with pytest.raises(ValueError):
        log_ratio(a, b[0])


def test_mismatch_kl_hand_example():
    lt = [LN(0.5), LN(0.2), LN(0.9)]
    li = [LN(0.4), LN(0.4), LN(0.9)]
    # r = 1.25, 0.5, 1.0
    terms = [
        1.25 - 1 - math.log(1.25),
        0.5 - 1 - math.log(0.5),
        0.0,
    ]
    assert terms == pytest.approx([_k3_term(a, b) for a, b in zip(lt, li)])
    expected = sum(terms) / 3
    got = mismatch_kl(t64(lt), t64(li))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(got) == pytest.approx(expected, rel=1e-6)

    # mask drops the second token: mean over the two remaining tokens
    mask = torch.tensor([True, False, True])
    assert float(mismatch_kl(t64(lt), t64(li), mask)) == pytest.approx(
        (terms[0] + terms[2]) / 2, rel=1e-6
    )
    # 0/1 integer mask behaves like bool mask
    assert float(mismatch_kl(t64(lt), t64(li), torch.tensor([1, 0, 1]))) == pytest.approx(
        (terms[0] + terms[2]) / 2, rel=1e-6
    )
    # only the second token
    assert float(mismatch_kl(t64(lt), t64(li), torch.tensor([0, 1, 0]))) == pytest.approx(
        terms[1], rel=1e-6
    )


def test_mismatch_kl_empty_mask_is_zero_not_nan():
    lt, li = t64([-1.0, -2.0]), t64([-1.5, -0.5])
    got = mismatch_kl(lt, li, torch.zeros(2, dtype=torch.bool))
    assert float(got) == 0.0
    assert float(mismatch_kl(t64([]), t64([]))) == 0.0


def test_mismatch_kl_leading_shape_and_mask():
    g = torch.Generator().manual_seed(0)
    lt = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    li = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(3, 5, generator=g) > 0.4
    flat = mismatch_kl(lt.reshape(-1)[mask.reshape(-1)], li.reshape(-1)[mask.reshape(-1)])
    assert float(mismatch_kl(lt, li, mask)) == pytest.approx(float(flat), rel=1e-6)
    with pytest.raises(ValueError):
        mismatch_kl(lt, li, mask[:, :4])
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(3, 4\)"):
        mismatch_kl(lt, li[:, :4])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-20.0, 0.0, allow_nan=False),
            st.floats(-20.0, 0.0, allow_nan=False),
            st.booleans(),
        ),
        min_size=1,
        max_size=50,
    )
)
def test_mismatch_kl_nonnegative_and_zero_when_equal(rows):
    lt = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    li = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    mask = torch.tensor([r[2] for r in rows])
    for m in (None, mask):
        k = float(mismatch_kl(lt, li, m))
        assert k >= 0.0 and not math.isnan(k)
        assert float(mismatch_kl(lt, lt, m)) == 0.0


def test_mismatch_kl_matches_numpy_float64():
    rng = np.random.default_rng(123)
    lt = np.log(rng.uniform(0.01, 1.0, size=(4, 64)))
    li = lt + rng.normal(0.0, 0.3, size=(4, 64))
    mask = rng.uniform(size=(4, 64)) > 0.3
    lr = (lt - li)[mask]
    expected = float(np.mean(np.exp(lr) - 1.0 - lr))
    got = mismatch_kl(torch.from_numpy(lt), torch.from_numpy(li), torch.from_numpy(mask))
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # float32 inputs agree to float32 precision
    got32 = mismatch_kl(
        torch.from_numpy(lt).float(), torch.from_numpy(li).float(), torch.from_numpy(mask)
    )
    assert float(got32) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_k3_converges_to_exact_kl_on_toy_categorical():
    p_infer = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    p_train = torch.tensor([0.4, 0.35, 0.15, 0.10], dtype=torch.float64)
    exact = float((p_infer * (p_infer.log() - p_train.log())).sum())
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    tokens = torch.multinomial(p_infer, n, replacement=True, generator=g)
    lt, li = p_train.log()[tokens], p_infer.log()[tokens]
    est = float(mismatch_kl(lt, li))
    # standard error of the sample mean of k3 terms
    lr = lt - li
    terms = torch.expm1(lr) - lr
    se = float(terms.std()) / math.sqrt(n)
    assert abs(est - exact) < 5 * se + 1e-6, (est, exact, se)
    # and it is a genuinely close estimate (~1e-4 absolute at this n)
    assert est == pytest.approx(exact, rel=0.05)


# ------------------------------------------------------------------ F(tau)


# Ratios chosen by hand. |log r| values: 2.5 -> 0.916, 0.3 -> 1.204 (1/r=3.33),
# 1.2 -> 0.182, 1/1.6 -> 0.470, 2 -> log 2, 1/2 -> log 2.
# The last two are the tau=2 boundary: logp_train = log(2) (resp. 0) and
# logp_infer = 0 (resp. log(2)) give |log r| == math.log(2.0) bit-for-bit, so the
# strict ">" must not count them.
_R_LT = [LN(2.5), LN(0.3), LN(1.2), -LN(1.6), LN(2.0), 0.0]
_R_LI = [0.0, 0.0, 0.0, 0.0, 0.0, LN(2.0)]


@pytest.mark.parametrize(
    "tau, expected",
    [
        (1.5, 5 / 6),  # all but r=1.2
        (2.0, 2 / 6),  # 2.5 and 0.3 only; r=2 and r=1/2 are exactly tau -> not counted
        (5.0, 0.0),
        (1.0, 6 / 6),  # every |log r| > 0
    ],
)
def test_extreme_fraction_hand_example(tau, expected):
    got = extreme_fraction(t64(_R_LT), t64(_R_LI), tau)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, abs=1e-7)


def test_extreme_fraction_boundary_strict():
    lt, li = t64([LN(2.0), 0.0]), t64([0.0, LN(2.0)])
    assert float(extreme_fraction(lt, li, 2.0)) == 0.0
    # just over the boundary counts
    assert float(extreme_fraction(t64([LN(2.0) + 1e-9]), t64([0.0]), 2.0)) == 1.0


def test_extreme_fraction_mask_and_empty():
    mask = torch.tensor([1, 0, 1, 1, 0, 0])  # keeps 2.5, 1.2, 1/1.6
    assert float(extreme_fraction(t64(_R_LT), t64(_R_LI), 1.5, mask)) == pytest.approx(2 / 3)
    assert float(extreme_fraction(t64(_R_LT), t64(_R_LI), 2.0, mask)) == pytest.approx(1 / 3)
    assert float(extreme_fraction(t64(_R_LT), t64(_R_LI), 2.0, torch.zeros(6))) == 0.0
    with pytest.raises(ValueError):
        extreme_fraction(t64(_R_LT), t64(_R_LI), 0.5)


def test_ratio_extremeness_values():
    got = ratio_extremeness(t64(_R_LT), t64(_R_LI))
    assert got.shape == (6,) and got.dtype == torch.float32
    expected = [2.5, 1 / 0.3, 1.2, 1.6, 2.0, 2.0]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    mask = torch.tensor([True, False, False, True, False, True])
    assert ratio_extremeness(t64(_R_LT), t64(_R_LI), mask).tolist() == pytest.approx(
        [2.5, 1.6, 2.0], rel=1e-6
    )
    # consistency with F(tau): fraction of extremeness values > tau
    for tau in (1.5, 3.0):
        ext = ratio_extremeness(t64(_R_LT), t64(_R_LI))
        assert float((ext > tau).float().mean()) == pytest.approx(
            float(extreme_fraction(t64(_R_LT), t64(_R_LI), tau))
        )


# ---------------------------------------------------------- routing disagreement


def _routing_pair():
    # [T=4, L=2, k=2]
    a = torch.tensor(
        [
            [[0, 1], [2, 3]],  # t0
            [[1, 0], [3, 2]],  # t1: permuted order of b's sets -> equal
            [[4, 5], [6, 7]],  # t2
            [[0, 1], [0, 1]],  # t3
        ]
    )
    b = torch.tensor(
        [
            [[1, 0], [2, 3]],  # t0: layer 0 permuted -> equal
            [[0, 1], [2, 3]],  # t1: equal sets
            [[4, 5], [6, 8]],  # t2: differs only in layer 1
            [[0, 2], [0, 3]],  # t3: differs in both layers
        ]
    )
    return a, b


def test_routing_disagreement_hand_example():
    a, b = _routing_pair()
    per_layer, any_layer = routing_disagreement(a, b)
    assert per_layer.shape == (2,) and per_layer.dtype == torch.float32
    assert per_layer.tolist() == pytest.approx([1 / 4, 2 / 4])
    assert float(any_layer) == pytest.approx(2 / 4)

    # mask out t3: only t2 differs (layer 1)
    per_layer, any_layer = routing_disagreement(a, b, torch.tensor([1, 1, 1, 0]))
    assert per_layer.tolist() == pytest.approx([0.0, 1 / 3])
    assert float(any_layer) == pytest.approx(1 / 3)

    # mask out t2: only t3 differs (both layers)
    per_layer, any_layer = routing_disagreement(a, b, torch.tensor([True, True, False, True]))
    assert per_layer.tolist() == pytest.approx([1 / 3, 1 / 3])
    assert float(any_layer) == pytest.approx(1 / 3)

    # only the permuted-but-equal tokens -> no disagreement
    per_layer, any_layer = routing_disagreement(a, b, torch.tensor([1, 1, 0, 0]))
    assert per_layer.tolist() == [0.0, 0.0]
    assert float(any_layer) == 0.0


def test_routing_disagreement_identical_and_empty():
    a, _ = _routing_pair()
    per_layer, any_layer = routing_disagreement(a, a.flip(-1))
    assert per_layer.tolist() == [0.0, 0.0] and float(any_layer) == 0.0
    per_layer, any_layer = routing_disagreement(a, a, torch.zeros(4, dtype=torch.bool))
    assert per_layer.tolist() == [0.0, 0.0] and float(any_layer) == 0.0


def test_routing_disagreement_shape_mismatch_raises():
    a, b = _routing_pair()
    with pytest.raises(ValueError, match=r"\(4, 2, 2\).*\(4, 2, 1\)"):
        routing_disagreement(a, b[..., :1])
    with pytest.raises(ValueError, match=r"\(3, 2, 2\)"):
        routing_disagreement(a[:3], b)
    with pytest.raises(ValueError):
        routing_disagreement(a, b, torch.ones(3, dtype=torch.bool))


# ----------------------------------------------------------------------- ESS


def test_ess_uniform_weights():
    w = torch.full((7,), 0.3)
    assert float(effective_sample_size(w)) == pytest.approx(1.0)
    assert float(effective_sample_size(w, normalized=False)) == pytest.approx(7.0)


def test_ess_one_hot_weights():
    w = torch.zeros(5)
    w[2] = 4.0
    assert float(effective_sample_size(w)) == pytest.approx(1 / 5)
    assert float(effective_sample_size(w, normalized=False)) == pytest.approx(1.0)


def test_ess_hand_example_and_mask():
    w = t64([1.0, 2.0, 3.0])
    # (1+2+3)^2 / (1+4+9) = 36/14
    assert float(effective_sample_size(w, normalized=False)) == pytest.approx(36 / 14, rel=1e-6)
    assert float(effective_sample_size(w)) == pytest.approx(36 / 14 / 3, rel=1e-6)
    mask = torch.tensor([True, True, False])
    # (1+2)^2 / (1+4) = 9/5, n = 2
    assert float(effective_sample_size(w, mask, normalized=False)) == pytest.approx(9 / 5)
    assert float(effective_sample_size(w, mask)) == pytest.approx(9 / 10)
    # scale invariance
    assert float(effective_sample_size(w * 1e3)) == pytest.approx(36 / 42, rel=1e-6)
    # empty -> 0
    assert float(effective_sample_size(w, torch.zeros(3, dtype=torch.bool))) == 0.0


# -------------------------------------------------------------- dict helpers


def test_mismatch_metrics_keys_and_values():
    g = torch.Generator().manual_seed(7)
    lt = -torch.rand(2, 50, generator=g, dtype=torch.float64) * 4
    li = lt + torch.randn(2, 50, generator=g, dtype=torch.float64) * 0.5
    mask = torch.rand(2, 50, generator=g) > 0.25
    d = mismatch_metrics(lt, li, mask)
    assert set(d) == {
        "mismatch_kl",
        "extreme_frac_1.5",
        "extreme_frac_2",
        "extreme_frac_5",
        "ess",
        "tokens",
    }
    assert all(isinstance(v, float) for v in d.values())
    assert d["mismatch_kl"] == pytest.approx(float(mismatch_kl(lt, li, mask)))
    for tau, key in ((1.5, "extreme_frac_1.5"), (2.0, "extreme_frac_2"), (5.0, "extreme_frac_5")):
        assert d[key] == pytest.approx(float(extreme_fraction(lt, li, tau, mask)))
    r = torch.exp(log_ratio(lt, li))
    assert d["ess"] == pytest.approx(float(effective_sample_size(r, mask)), rel=1e-5)
    assert d["tokens"] == float(mask.sum())

    d2 = mismatch_metrics(lt, li, taus=(3.0, 10.0))
    assert {"extreme_frac_3", "extreme_frac_10"} <= set(d2)
    assert d2["tokens"] == 100.0


def test_mismatch_metrics_empty_mask():
    lt, li = t64([-1.0, -2.0]), t64([-2.0, -1.0])
    d = mismatch_metrics(lt, li, torch.zeros(2, dtype=torch.bool))
    assert d == {
        "mismatch_kl": 0.0,
        "extreme_frac_1.5": 0.0,
        "extreme_frac_2": 0.0,
        "extreme_frac_5": 0.0,
        "ess": 0.0,
        "tokens": 0.0,
    }


def test_mismatch_metrics_ess_stable_for_huge_ratios():
    # r = e^800 would overflow; ESS is computed scale-invariantly
    lt, li = t64([0.0, 0.0]), t64([-800.0, -800.0])
    d = mismatch_metrics(lt, li)
    assert d["ess"] == pytest.approx(1.0)


def test_routing_metrics_keys_and_values():
    a, b = _routing_pair()
    mask = torch.tensor([1, 1, 1, 0])
    d = routing_metrics(a, b, mask)
    assert set(d) == {"routing_disagree_any", "routing_disagree_layer_0", "routing_disagree_layer_1"}
    assert all(isinstance(v, float) for v in d.values())
    per_layer, any_layer = routing_disagreement(a, b, mask)
    assert d["routing_disagree_any"] == pytest.approx(float(any_layer))
    assert d["routing_disagree_any"] == pytest.approx(1 / 3)
    assert d["routing_disagree_layer_0"] == pytest.approx(float(per_layer[0]))
    assert d["routing_disagree_layer_0"] == 0.0
    assert d["routing_disagree_layer_1"] == pytest.approx(float(per_layer[1]))
