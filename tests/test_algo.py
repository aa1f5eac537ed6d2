"""Tests for agentrl.algo.{advantages, losses, corrections}.

Every expected value is computed by hand here (arithmetic in comments, or with
``math``) or by a float64 re-implementation written with Python loops straight
from the paper's formula, independent of the vectorised code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agentrl.algo import advantages as adv_mod
from agentrl.algo.advantages import broadcast, dr_grpo, grpo, reinforce_pp_baseline, rloo
from agentrl.algo.corrections import (
    CORRECTIONS,
    apply_correction,
    geo_mean_reject,
    icepop,
    metropolis,
    seq_is,
    seq_mis,
    tis,
    token_mis,
)
from agentrl.algo.losses import (
    aggregate,
    entropy_bonus,
    gspo,
    kl_penalty,
    ppo_clip,
    token_entropy,
)

LN = math.log

# float(loss) on a graph-attached scalar is intended throughout.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def t64(xs):
    return torch.tensor(xs, dtype=torch.float64)


def _flat(xs):
    return [y for x in xs for y in _flat(x)] if isinstance(xs, (list, tuple)) else [xs]


class _NestedApprox:
    """pytest.approx for nested lists (compares the flattened values and the structure size)."""

    def __init__(self, xs, kw):
        self.want = pytest.approx(_flat(xs), **kw)
        self.xs = xs

    def __eq__(self, other):
        return self.want == _flat(other)

    def __repr__(self):
        return f"approx({self.xs!r})"


def approx(xs, **kw):
    kw = {"rel": 1e-6, "abs": 1e-9} | kw
    if isinstance(xs, list) and any(isinstance(x, list) for x in xs):
        return _NestedApprox(xs, kw)
    return pytest.approx(xs, **kw)


# =========================================================================== advantages
# Shared example: 3 groups, non-contiguous and uneven.
#   id 7 -> idx 0, 2, 4 with r = 1, 5, 3   mean 3, dev -2, 2, 0, unbiased var 8/2 = 4, std 2
#   id 3 -> idx 1, 3    with r = 0, 1      mean .5, dev -.5, .5, unbiased var .5/1, std sqrt(.5)
#   id 9 -> idx 5       with r = 0         size 1
R = [1.0, 0.0, 5.0, 1.0, 3.0, 0.0]
G = [7, 3, 7, 3, 7, 9]


def test_grpo_hand_uneven_noncontiguous_groups():
    eps = 1e-6
    got = grpo(torch.tensor(R), torch.tensor(G), eps=eps)
    s = math.sqrt(0.5)
    want = [-2 / (2 + eps), -0.5 / (s + eps), 2 / (2 + eps), 0.5 / (s + eps), 0.0, 0.0]
    assert got.dtype == torch.float32 and got.shape == (6,)
    assert got.tolist() == approx(want, rel=1e-6)


def test_grpo_without_std_and_dr_grpo():
    want = [-2.0, -0.5, 2.0, 0.5, 0.0, 0.0]
    assert grpo(t64(R), torch.tensor(G), normalize_std=False).tolist() == approx(want)
    got = dr_grpo(t64(R), torch.tensor(G))
    assert got.dtype == torch.float64 and got.tolist() == approx(want)


def test_grpo_constant_group_and_int_rewards():
    got = grpo(torch.tensor([1, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))
    # group 0 identical -> 0; group 1: mean .5, std sqrt(.5) -> -/+ .5/sqrt(.5)
    assert got.dtype == torch.float32
    assert got.tolist() == approx([0, 0, -math.sqrt(0.5), math.sqrt(0.5)], rel=1e-5)


def test_rloo_hand_with_size_one_group():
    # id 7: 1-(5+3)/2 = -3, 5-(1+3)/2 = 3, 3-(1+5)/2 = 0; id 3: 0-1 = -1, 1-0 = 1; id 9 (size 1): 0
    got = rloo(torch.tensor(R), torch.tensor(G))
    assert got.tolist() == approx([-3.0, -1.0, 3.0, 1.0, 0.0, 0.0])


def test_reinforce_pp_baseline_hand_no_mask():
    # c = r - mean_g = [-2, -.5, 2, .5, 0, 0]; mean(c) = 0; unbiased var = (4+.25+4+.25)/5 = 1.7
    got = reinforce_pp_baseline(t64(R), torch.tensor(G))
    d = math.sqrt(1.7 + 1e-8)
    assert got.tolist() == approx([-2 / d, -0.5 / d, 2 / d, 0.5 / d, 0.0, 0.0])


def _rpp_reference(r, g, n_tok, eps=1e-8):
    """Loop reference: group-mean baseline, then whitening over all masked tokens."""
    c = []
    for i in range(len(r)):
        members = [r[j] for j in range(len(r)) if g[j] == g[i]]
        c.append(r[i] - sum(members) / len(members))
    tok = [c[i] for i in range(len(r)) for _ in range(n_tok[i])]
    mu = sum(tok) / len(tok)
    var = sum((x - mu) ** 2 for x in tok) / (len(tok) - 1)
    return [(ci - mu) / math.sqrt(var + eps) for ci in c]


def test_reinforce_pp_baseline_token_weighted_vs_loop():
    n_tok = [2, 1, 1, 0, 2, 3]
    mask = torch.zeros(6, 4)
    for i, n in enumerate(n_tok):
        mask[i, :n] = 1
    got = reinforce_pp_baseline(t64(R), torch.tensor(G), mask)
    assert got.tolist() == approx(_rpp_reference(R, G, n_tok))
    # hand check of sequence 4 (c = 0): N = 9 tokens,
    # mu = (2*-2 + 1*-.5 + 1*2 + 0 + 0 + 0)/9 = -2.5/9,
    # var = sum_i n_i (c_i - mu)^2 / (N - 1), A_4 = (0 - mu) / sqrt(var + eps)
    mu = -2.5 / 9
    c = [-2.0, -0.5, 2.0, 0.5, 0.0, 0.0]
    var = sum(n * (ci - mu) ** 2 for n, ci in zip(n_tok, c)) / 8
    assert float(got[4]) == approx(-mu / math.sqrt(var + 1e-8))
    assert reinforce_pp_baseline(t64(R), torch.tensor(G), torch.zeros(6, 4)).tolist() == [0.0] * 6


def _grpo_reference(r, g, eps=1e-6):
    out = []
    for i in range(len(r)):
        m = [r[j] for j in range(len(r)) if g[j] == g[i]]
        mean = sum(m) / len(m)
        std = math.sqrt(sum((x - mean) ** 2 for x in m) / (len(m) - 1)) if len(m) > 1 else 0.0
        out.append((r[i] - mean) / (std + eps))
    return out


def _rloo_reference(r, g):
    out = []
    for i in range(len(r)):
        others = [r[j] for j in range(len(r)) if g[j] == g[i] and j != i]
        out.append(r[i] - sum(others) / len(others) if others else 0.0)
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.floats(-10, 10, allow_nan=False)), min_size=1, max_size=20
    )
)
def test_grpo_rloo_match_loop_reference(pairs):
    g = [p[0] * 13 - 20 for p in pairs]  # arbitrary, negative and unordered ids
    r = [p[1] for p in pairs]
    assert grpo(t64(r), torch.tensor(g)).tolist() == approx(_grpo_reference(r, g), abs=1e-6)
    assert rloo(t64(r), torch.tensor(g)).tolist() == approx(_rloo_reference(r, g), abs=1e-9)


def test_broadcast_and_shape_errors():
    got = broadcast(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert got.tolist() == [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]
    with pytest.raises(ValueError):
        grpo(torch.zeros(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        broadcast(torch.zeros(2), torch.zeros(3, 4))
    assert adv_mod.__all__


# =========================================================================== aggregation
X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
M = [[1, 1, 0], [1, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize(
    "mode, const, want",
    [
        ("token-mean", None, (1 + 2 + 4) / 3),
        ("seq-mean-token-mean", None, ((1 + 2) / 2 + 4 / 1) / 2),  # empty row 3 left out
        ("seq-mean-token-sum", None, ((1 + 2) + 4) / 2),
        ("token-sum-norm", 10.0, (1 + 2 + 4) / 10),
    ],
)
def test_aggregate_hand(mode, const, want):
    for dtype in (torch.int64, torch.bool, torch.float32):
        mask = torch.tensor(M, dtype=dtype)
        assert float(aggregate(t64(X), mask, mode, const)) == approx(want)


def test_aggregate_errors_and_grad():
    with pytest.raises(ValueError, match="constant"):
        aggregate(t64(X), torch.tensor(M), "token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(t64(X), torch.tensor(M), "bogus")
    x = t64(X).requires_grad_()
    aggregate(x, torch.tensor(M), "seq-mean-token-mean").backward()
    # d/dx = m[i,t] / (n_i * |S|): row 0 -> 1/(2*2), row 1 -> 1/(1*2)
    assert x.grad.tolist() == [[0.25, 0.25, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"]
)
def test_aggregate_empty_mask_is_zero_with_grad(mode):
    x = torch.tensor([[float("nan"), float("inf")], [1.0, -2.0]], requires_grad=True)
    out = aggregate(x, torch.zeros(2, 2, dtype=torch.bool), mode, 4.0)
    assert float(out.detach()) == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(x.grad, torch.zeros(2, 2))


# =========================================================================== PPO clip
# One row of 7 tokens + 1 padding token, clip_low = .2, clip_high = .28 (band [.8, 1.28]), c = 3.
#   t  A   r     L1=-A r  L2=-A clip(r)  max        branch
#   0 +1  1.10   -1.10    -1.10         -1.10      inside
#   1 +1  1.50   -1.50    -1.28         -1.28      clipped (above band)
#   2 +1  0.50   -0.50    -0.80         -0.50      unclipped (pessimistic)
#   3 -1  0.50    0.50     0.80          0.80      clipped (below band)
#   4 -1  1.50    1.50     1.28          1.50      unclipped; 1.5 < -cA = 3, no dual
#   5 +1  1.25   -1.25    -1.25         -1.25      inside only thanks to clip-higher
#   6 -2  4.00    8.00     2.56          8.00      dual clip: min(8, 6) = 6
PPO_A = [1.0, 1.0, 1.0, -1.0, -1.0, 1.0, -2.0, 5.0]
PPO_R = [1.1, 1.5, 0.5, 0.5, 1.5, 1.25, 4.0, 1.0]
PPO_M = [1, 1, 1, 1, 1, 1, 1, 0]


def _ppo_inputs():
    logp_old = t64([[-1.0] * 7 + [-1000.0]])
    logp = (logp_old + t64([[LN(r) for r in PPO_R]])).clone()
    logp[0, 7] = 0.0  # padding: garbage ratio exp(1000) must not leak
    return logp.requires_grad_(), logp_old, t64([PPO_A]), torch.tensor([PPO_M])


def test_ppo_clip_branches_dual_clip_and_stats():
    logp, logp_old, a, m = _ppo_inputs()
    loss, st = ppo_clip(logp, logp_old, a, m, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0)
    per_tok = [-1.1, -1.28, -0.5, 0.8, 1.5, -1.25, 6.0]
    assert float(loss) == approx(sum(per_tok) / 7)
    assert float(st["clip_frac"]) == approx(2 / 7)  # t1, t3
    assert float(st["dual_clip_frac"]) == approx(1 / 7)  # t6
    r = PPO_R[:7]
    assert float(st["ratio_mean"]) == approx(sum(r) / 7)
    assert float(st["approx_kl"]) == approx(sum(x - 1 - LN(x) for x in r) / 7)
    # gradient: unclipped tokens give dL/dlogp_t = -A_t r_t / N, clipped and dual-clipped give 0
    loss.backward()
    want = [-1.1 / 7, 0.0, -0.5 / 7, 0.0, 1.5 / 7, -1.25 / 7, 0.0, 0.0]
    assert logp.grad[0].tolist() == approx(want)


def test_ppo_clip_symmetric_and_no_dual():
    logp, logp_old, a, m = _ppo_inputs()
    loss, st = ppo_clip(logp, logp_old, a, m)  # band [.8, 1.2]; t5 now clipped at -1.2; t6 = 8
    per_tok = [-1.1, -1.2, -0.5, 0.8, 1.5, -1.2, 8.0]
    assert float(loss) == approx(sum(per_tok) / 7)
    assert float(st["clip_frac"]) == approx(3 / 7)
    assert float(st["dual_clip_frac"]) == 0.0


def test_ppo_clip_weights_adv_seq_and_aggregation():
    logp, logp_old, a, m = _ppo_inputs()
    w = t64([[2.0, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 9.0]])
    loss, _ = ppo_clip(logp, logp_old, a, m, clip_high=0.28, dual_clip_c=3.0, weights=w,
                       agg="token-sum-norm", agg_constant=10.0)
    per_tok = [-2.2, -1.28, 0.0, 0.8, 0.75, -1.25, 6.0]
    assert float(loss) == approx(sum(per_tok) / 10)
    # a [B] advantage is broadcast over tokens
    lp = t64([[-0.5, -1.0]])
    lo = t64([[-1.0, -1.0]])
    l_seq, _ = ppo_clip(lp, lo, t64([1.0]), torch.ones(1, 2))
    l_tok, _ = ppo_clip(lp, lo, t64([[1.0, 1.0]]), torch.ones(1, 2))
    assert float(l_seq) == float(l_tok) == approx((-1.2 - 1.0) / 2)  # exp(.5)=1.65 -> clipped 1.2


def test_ppo_clip_empty_mask_and_validation():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, st = ppo_clip(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3))
    assert float(loss) == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(float(v) == 0.0 for k, v in st.items() if k != "ratio_mean")
    with pytest.raises(ValueError):
        ppo_clip(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3), dual_clip_c=1.0)
    with pytest.raises(ValueError):
        ppo_clip(logp, torch.zeros(2, 4), torch.ones(2, 3), torch.ones(2, 3))


def test_inputs_not_modified_in_place():
    logp, logp_old, a, m = _ppo_inputs()
    copies = [x.detach().clone() for x in (logp, logp_old, a, m)]
    ppo_clip(logp, logp_old, a, m, dual_clip_c=3.0, weights=torch.ones_like(logp_old))
    gspo(logp, logp_old, a[:, 0], m)
    kl_penalty(logp, logp_old, m)
    tis(logp_old, logp.detach(), m)
    for x, c in zip((logp, logp_old, a, m), copies):
        assert torch.equal(x.detach(), c)


# =========================================================================== GSPO
def test_gspo_hand_values():
    # seq 0: log r = [.1, -.1, .3], mean .1 -> s = e^.1 = 1.10517 inside [.8, 1.2], A = 1
    # seq 1: log r = [.5, .5] (3rd token masked, garbage) -> s = e^.5 = 1.6487 > 1.2, A = 2
    #        -> J = 2 * 1.2 = 2.4
    # seq 2: no masked token -> left out of the mean
    lr = t64([[0.1, -0.1, 0.3], [0.5, 0.5, 50.0], [7.0, 7.0, 7.0]])
    logp_old = t64([[-1.0, -2.0, -3.0]] * 3)
    logp = (logp_old + lr).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    loss, st = gspo(logp, logp_old, t64([1.0, 2.0, -5.0]), mask, clip_low=0.2, clip_high=0.2)
    assert float(loss) == approx(-(math.exp(0.1) + 2.4) / 2)
    assert float(st["clip_frac"]) == approx(0.5)
    assert float(st["seq_ratio_mean"]) == approx((math.exp(0.1) + math.exp(0.5)) / 2)
    loss.backward()
    # dL/dlogp_t = -(1/|S|) A_i s_i / n_i on the unclipped seq 0, 0 elsewhere
    g0 = -math.exp(0.1) / 3 / 2
    assert logp.grad.tolist() == approx([[g0, g0, g0], [0.0] * 3, [0.0] * 3])


def _gspo_sequence_objective(logp, logp_old, adv, mask, lo, hi, weights=None):
    """float64 loop reference straight from the GSPO objective:

    loss = -(1/|S|) sum_i (1/n_i) sum_t w_t min(s_i A_i, clip(s_i) A_i).
    """
    total, n_seq = 0.0, 0
    B, T = logp.shape
    for i in range(B):
        toks = [t for t in range(T) if mask[i][t]]
        if not toks:
            continue
        s = torch.exp(sum(logp[i, t] - logp_old[i, t] for t in toks) / len(toks))
        j = torch.minimum(s * adv[i], torch.clamp(s, 1 - lo, 1 + hi) * adv[i])
        w = [1.0 if weights is None else float(weights[i][t]) for t in toks]
        total = total - j * sum(w) / len(toks)
        n_seq += 1
    return total / max(n_seq, 1)


def test_gspo_gradient_matches_sequence_objective():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logp_old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    lr = (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0],
                         [1, 0, 1, 0, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    adv = t64([1.0, -1.5, 2.0, 0.7, -0.3, 2.0])
    for lo, hi in [(0.2, 0.2), (0.05, 0.1), (3e-4, 4e-4)]:
        a = (logp_old + lr).requires_grad_()
        b = (logp_old + lr).requires_grad_()
        loss, _ = gspo(a, logp_old, adv, mask, clip_low=lo, clip_high=hi)
        ref = _gspo_sequence_objective(b, logp_old, adv, mask.tolist(), lo, hi)
        assert float(loss) == approx(float(ref))
        loss.backward()
        ref.backward()
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        assert a.grad.abs().sum() > 0  # some sequence is on the unclipped branch in every band


def test_gspo_default_band_clips_and_weights_scale():
    logp_old = torch.zeros(2, 2)
    logp = torch.tensor([[0.001, 0.001], [0.0001, 0.0001]], requires_grad=True)
    loss, st = gspo(logp, logp_old, torch.tensor([1.0, 1.0]), torch.ones(2, 2))
    # s0 = e^.001 > 1 + 4e-4 -> clipped; s1 = e^1e-4 inside
    assert float(st["clip_frac"]) == approx(0.5)
    assert float(loss) == approx(-(1.0004 + math.exp(1e-4)) / 2, rel=1e-5)
    w2 = torch.full((2, 2), 2.0)
    l2, _ = gspo(logp, logp_old, torch.tensor([1.0, 1.0]), torch.ones(2, 2), weights=w2)
    assert float(l2) == approx(2 * float(loss), rel=1e-6)


# =========================================================================== KL, entropy
def test_kl_estimators_hand():
    # d = logp - logp_ref = ln 1.25, ln .5
    logp = t64([[LN(0.5), LN(0.2)]]).requires_grad_()
    ref = t64([[LN(0.4), LN(0.4)]])
    m = torch.ones(1, 2)
    d = [LN(1.25), LN(0.5)]
    assert float(kl_penalty(logp, ref, m, "k1")) == approx(sum(d) / 2)
    assert float(kl_penalty(logp, ref, m, "k2")) == approx(sum(0.5 * x * x for x in d) / 2)
    # k3 = exp(-d) + d - 1: 0.8 + ln 1.25 - 1 and 2 + ln .5 - 1
    k3 = kl_penalty(logp, ref, m, "k3")
    assert float(k3) == approx((0.8 + LN(1.25) - 1 + 2 + LN(0.5) - 1) / 2)
    k3.backward()  # d/dd (e^-d + d - 1) = 1 - e^-d: 1 - .8 = .2 and 1 - 2 = -1, over N = 2
    assert logp.grad.tolist() == approx([[0.1, -0.5]])
    assert float(kl_penalty(logp, ref, torch.tensor([[1, 0]]), "k3", agg="token-sum-norm",
                            agg_constant=4.0)) == approx((0.8 + LN(1.25) - 1) / 4)
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, m, "k4")


def test_token_entropy_and_bonus():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LN(3), -1e9, -1e9]],
                           [[1000.0, 1000.0, float("-inf"), float("-inf")], [5.0, 5.0, 5.0, 5.0]]],
                          requires_grad=True)
    h = token_entropy(logits)
    h_mix = -(0.25 * LN(0.25) + 0.75 * LN(0.75))
    assert h.dtype == torch.float32 and h.shape == (2, 2)
    assert h.tolist() == approx([[LN(4), h_mix], [LN(2), LN(4)]], rel=1e-5)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert token_entropy(logits.detach().to(torch.bfloat16)).dtype == torch.float32
    m = torch.tensor([[1, 1], [0, 1]])
    assert float(entropy_bonus(h, m)) == approx((LN(4) + h_mix + LN(4)) / 3, rel=1e-5)
    seq_sum = float(entropy_bonus(h, m, "seq-mean-token-sum"))
    assert seq_sum == approx((LN(4) + h_mix + LN(4)) / 2, rel=1e-5)


# =========================================================================== corrections
# rho = [.25, 1, 3, 8] + one padding token (garbage) -> logp_old = log rho, logp_infer = 0
def _rho_inputs(rhos, pad=True):
    lo = [LN(r) for r in rhos] + ([123.0] if pad else [])
    mask = [1] * len(rhos) + ([0] if pad else [])
    return t64([lo]), torch.zeros(1, len(lo), dtype=torch.float64), torch.tensor([mask])


RHO = [0.25, 1.0, 3.0, 8.0]


def test_tis_hand():
    w, keep, st = tis(*_rho_inputs(RHO), cap=2.0)
    assert w.dtype == torch.float32 and keep.dtype == torch.bool
    assert w.tolist() == approx([[0.25, 1.0, 2.0, 2.0, 0.0]])
    assert keep.tolist() == [[True] * 4 + [False]]
    assert float(st["clip_frac"]) == approx(0.5)
    assert float(st["is_weight_mean"]) == approx(5.25 / 4)
    # ESS = (sum w)^2 / (n sum w^2) = 5.25^2 / (4 * 9.0625)
    assert float(st["ess"]) == approx(5.25**2 / (4 * 9.0625), rel=1e-6)


def test_token_mis_hand():
    w, keep, st = token_mis(*_rho_inputs(RHO), cap=2.0)
    assert w.tolist() == approx([[0.25, 1.0, 0.0, 0.0, 0.0]])
    assert keep.tolist() == [[True, True, False, False, False]]
    assert float(st["mask_frac"]) == approx(0.5)
    assert float(st["is_weight_mean"]) == approx(1.25 / 2)  # over kept tokens
    assert float(st["ess"]) == approx(1.25**2 / (4 * 1.0625), rel=1e-6)  # zeros count


def test_icepop_hand():
    w, keep, st = icepop(*_rho_inputs(RHO), alpha=0.5, beta=5.0)
    assert w.tolist() == approx([[0.0, 1.0, 3.0, 0.0, 0.0]])
    assert keep.tolist() == [[False, True, True, False, False]]
    assert float(st["mask_frac"]) == approx(0.5)
    assert float(st["is_weight_mean"]) == approx(2.0)


def test_seq_is_and_seq_mis_hand():
    # seq 0: rho = [2, .5, 1.5] -> R = 1.5 ; seq 1: rho = [2, 2] (+ masked garbage) -> R = 4
    lo = t64([[LN(2), LN(0.5), LN(1.5)], [LN(2), LN(2), 99.0]])
    li = torch.zeros(2, 3, dtype=torch.float64)
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, keep, st = seq_is(lo, li, m, cap=2.0)
    assert w.tolist() == approx([[1.5, 1.5, 1.5], [2.0, 2.0, 0.0]])
    assert keep.tolist() == [[True] * 3, [True, True, False]]
    assert float(st["clip_frac"]) == approx(2 / 5)
    assert float(st["is_weight_mean"]) == approx((4.5 + 4) / 5)
    w, keep, st = seq_mis(lo, li, m, cap=2.0)
    assert w.tolist() == approx([[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]])
    assert keep.tolist() == [[True] * 3, [False] * 3]
    assert float(st["mask_frac"]) == approx(2 / 5)
    assert float(st["ess"]) == approx(4.5**2 / (5 * 3 * 2.25), rel=1e-6)


@pytest.mark.parametrize("n", [1000, 5000])
def test_seq_is_overflow_safety(n):
    # prod of n ratios of 2: 2^1000 ~ 1e301 (overflows float32), 2^5000 overflows float64
    lo = torch.full((2, n), LN(2), dtype=torch.float32)
    lo[1] = -LN(2)  # 2^-n underflows
    li = torch.zeros(2, n)
    m = torch.ones(2, n)
    w, keep, _ = seq_is(lo, li, m, cap=2.0)
    assert torch.isfinite(w).all() and keep.all()
    assert w[0].tolist() == approx([2.0] * n) and float(w[1].max()) < 1e-300
    w, keep, st = seq_mis(lo, li, m, cap=2.0)
    assert torch.isfinite(w).all() and not keep[0].any() and keep[1].all()
    assert float(w[0].abs().sum()) == 0.0 and float(st["mask_frac"]) == approx(0.5)
    assert all(math.isfinite(float(v)) for v in st.values())


def test_geo_mean_reject():
    # log geo means: 0 (kept), .005 > log 1.001 (rejected), -.01 < -log 1.001 (rejected)
    lo = t64([[0.001, -0.001, 0.0], [0.01, 0.0, 5.0], [-0.01, 0.0, 0.0]])
    li = torch.zeros(3, 3, dtype=torch.float64)
    m = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    w, keep, st = geo_mean_reject(lo, li, m)
    assert keep.tolist() == [[True] * 3, [False] * 3, [False] * 3]
    assert w.tolist() == [[1.0] * 3, [0.0] * 3, [0.0] * 3]
    assert float(st["mask_frac"]) == approx(3 / 6)
    # explicit band [.5, 2]: geo means 3 (rejected) and sqrt(3 * .5) = 1.22 (kept)
    lo = t64([[LN(9), LN(1)], [LN(3), LN(0.5)]])
    ones = torch.ones(2, 2)
    w, keep, _ = apply_correction("geo_mask", lo, 0 * ones, ones, low=0.5, high=2.0)
    assert keep.tolist() == [[False, False], [True, True]]
    with pytest.raises(ValueError):
        geo_mean_reject(lo, torch.zeros(2, 2), torch.ones(2, 2), high=0.5, low=0.9)


def test_metropolis_token_frequency_and_determinism():
    B, T = 100, 200
    g = torch.Generator().manual_seed(1)
    lo = (torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 2)  # log rho in [-2, 1]
    li = torch.zeros(B, T, dtype=torch.float64)
    m = torch.ones(B, T, dtype=torch.bool)
    m[:, -20:] = False
    w, keep, st = metropolis(lo, li, m, generator=torch.Generator().manual_seed(7))
    p = [min(1.0, math.exp(x)) for x, mm in zip(lo.flatten().tolist(), m.flatten().tolist()) if mm]
    n = len(p)
    mean_p = sum(p) / n
    se = math.sqrt(sum(q * (1 - q) for q in p)) / n
    acc = float(keep.sum()) / n
    assert abs(acc - mean_p) < 4 * se
    assert float(st["accepted_frac"]) == approx(acc, rel=1e-6)
    assert float(st["mask_frac"]) == approx(1 - acc, rel=1e-5)
    assert not keep[~m].any()
    assert torch.equal(w, keep.float())  # accepted weight 1, rejected 0
    assert bool(keep[(lo >= 0) & m].all())  # rho >= 1 always accepted
    w2, keep2, _ = metropolis(lo, li, m, generator=torch.Generator().manual_seed(7))
    assert torch.equal(keep, keep2) and torch.equal(w, w2)
    _, keep3, _ = metropolis(lo, li, m, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(keep, keep3)


def test_metropolis_sequence_level():
    B, T = 4000, 3
    # R_i = prod rho: sequences alternate R = .25 (log rho = ln .25 / 3 each) and R = 2
    lo = torch.empty(B, T, dtype=torch.float64)
    lo[0::2] = LN(0.25) / 3
    lo[1::2] = LN(2) / 3
    m = torch.ones(B, T)
    m[:, 2] = 0  # masked token ignored: recompute R over 2 tokens
    lo[0::2, :2] = LN(0.25) / 2
    lo[1::2, :2] = LN(2) / 2
    lo[:, 2] = 50.0
    w, keep, st = metropolis(lo, torch.zeros(B, T), m, level="sequence",
                             generator=torch.Generator().manual_seed(3))
    rows = keep[:, :2]
    assert torch.equal(rows[:, 0], rows[:, 1])  # whole sequences accepted or rejected
    assert not keep[:, 2].any()
    assert rows[1::2].all()  # R = 2 -> always accepted
    frac_low = float(rows[0::2, 0].float().mean())
    se = math.sqrt(0.25 * 0.75 / (B // 2))
    assert abs(frac_low - 0.25) < 4 * se
    assert float(st["accepted_frac"]) == approx(float(rows.float().mean()), rel=1e-6)
    with pytest.raises(ValueError):
        metropolis(lo, torch.zeros(B, T), m, level="batch")


def test_dispatcher_names_stats_and_no_grad():
    assert set(CORRECTIONS) == {"none", "tis", "token_mis", "seq_is", "seq_mis", "geo_mask",
                                "icepop", "metropolis_token", "metropolis_seq"}
    lo, li, m = _rho_inputs(RHO)
    lo = lo.clone().requires_grad_()
    for name in CORRECTIONS:
        kw = {}
        if name.startswith("metropolis"):
            kw["generator"] = torch.Generator().manual_seed(0)
        w, keep, st = apply_correction(name, lo, li, m, **kw)
        assert w.shape == keep.shape == (1, 5) and not w.requires_grad
        assert keep.dtype == torch.bool and not keep[0, 4] and float(w[0, 4]) == 0.0
        assert float(w[~keep].abs().sum()) == 0.0
        assert {"is_weight_mean", "ess"} <= set(st) and ({"clip_frac", "mask_frac"} & set(st))
    w, keep, st = apply_correction("none", lo, li, m)
    assert w.tolist() == [[1.0] * 4 + [0.0]] and keep.tolist() == [[True] * 4 + [False]]
    assert float(st["ess"]) == 1.0 and float(st["mask_frac"]) == 0.0
    w3, _, _ = apply_correction("tis", lo, li, m, cap=3.0)
    assert w3.tolist() == approx([[0.25, 1.0, 3.0, 3.0, 0.0]])
    with pytest.raises(ValueError, match="metropolis_seq"):
        apply_correction("tis2", lo, li, m)


# =========================================================================== composition
def test_gspo_composes_with_icepop():
    g = torch.Generator().manual_seed(5)
    B, T = 5, 6
    logp_infer = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    logp_old = logp_infer + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 4
    logp_new = logp_old + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    adv = t64([1.0, -1.0, 0.5, 2.0, -0.7])
    w, keep, _ = icepop(logp_old, logp_infer, mask)
    assert 0 < keep.sum() < mask.sum()  # some tokens rejected
    a = logp_new.clone().requires_grad_()
    b = logp_new.clone().requires_grad_()
    loss, _ = gspo(a, logp_old, adv, mask & keep, clip_low=0.05, clip_high=0.05, weights=w)
    ref = _gspo_sequence_objective(b, logp_old, adv, (mask & keep).tolist(), 0.05, 0.05, w)
    assert float(loss) == approx(float(ref))
    # gradient of the weighted token form: only the weights' sequence mean scales each sequence
    loss.backward()
    assert torch.isfinite(a.grad).all() and float(a.grad[~(mask & keep)].abs().sum()) == 0.0


def test_ppo_clip_composes_with_metropolis():
    g = torch.Generator().manual_seed(11)
    B, T = 4, 8
    logp_infer = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    logp_old = logp_infer + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 2
    step = (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.6
    logp = (logp_old + step).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    adv = t64([1.0, -2.0, 0.5, -0.5])
    w, keep, _ = apply_correction("metropolis_token", logp_old, logp_infer, mask,
                                  generator=torch.Generator().manual_seed(2))
    lm = mask & keep
    loss, _ = ppo_clip(logp, logp_old, broadcast(adv, mask), lm, weights=w)
    # loop reference: mean over accepted tokens of max(-A r, -A clip(r, .8, 1.2)) * w
    terms = []
    for i in range(B):
        for t in range(T):
            if lm[i, t]:
                r = math.exp(float(logp[i, t] - logp_old[i, t]))
                A = float(adv[i])
                terms.append(max(-A * r, -A * min(max(r, 0.8), 1.2)) * float(w[i, t]))
    assert 0 < len(terms) < int(mask.sum())
    assert float(loss) == approx(sum(terms) / len(terms))
