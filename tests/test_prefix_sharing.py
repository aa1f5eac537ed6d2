"""Shared-prefix packing: a GRPO group's common prompt computed once gives the plain layouts' numbers.

The reference is independent of build_batch: every trajectory run alone through the model (one
unpacked causal sequence, its own routing rows), in float64.
"""

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

from agentrl.learner.batch import build_batch, target_logprobs
from agentrl.learner.learner import LearnerConfig, TorchLearner, _micro_batches
from agentrl.model import MoEForCausalLM, preset
from agentrl.routing import RoutingLayout, RoutingRows
from agentrl.trajectory import Trajectory

CFG = preset("tiny-moe", initializer_range=0.08)
LAYOUT = RoutingLayout.from_config(CFG)


def random_rows(rng, n):
    """n valid rows [n, moe_layers, k]: distinct experts per row."""
    r = np.argsort(rng.random((n, LAYOUT.num_moe_layers, CFG.num_experts)), -1)[..., : CFG.num_experts_per_tok]
    return r.astype(LAYOUT.dtype)


def group(rng, gid, size, prompt_len, gen_lens, shared_gen=0):
    """`size` samples of one prompt (token ids and rows identical on the prompt and on the first
    `shared_gen` generated tokens; the next generated token differs between every two members)."""
    prompt = rng.integers(9, CFG.vocab_size, prompt_len + shared_gen)
    prompt_rows = random_rows(rng, prompt_len + shared_gen)
    out = []
    for j, g in zip(range(size), gen_lens):
        own = rng.integers(9, CFG.vocab_size, g)
        own[0] = 9 + j  # members part at the first non-shared generated token
        tokens = np.concatenate([prompt, own])
        n = len(tokens)
        mask = np.zeros(n, bool)
        mask[prompt_len:] = True
        rows = np.concatenate([prompt_rows, random_rows(rng, n - 1 - len(prompt_rows))])
        out.append(Trajectory(
            tokens=tokens, loss_mask=mask, logprobs=np.where(mask, -rng.random(n) * 3, 0).astype(np.float32),
            versions=np.where(mask, 0, -1), routing=RoutingRows(rows, np.zeros(n - 1, np.int64)),
            reward=float(rng.integers(2)), group_id=gid))
    return out


def trajectories(seed=0):
    rng = np.random.default_rng(seed)
    return (group(rng, "a", 4, 20, [3, 7, 10, 5]) + group(rng, "b", 3, 12, [6, 2, 9])
            + group(rng, "c", 3, 10, [4, 6, 3], shared_gen=4)  # members also share 4 generated tokens
            + group(rng, "d", 1, 15, [8]) + group(rng, "e", 2, 5, [6, 6])  # singleton; prefix below the minimum
            + group(rng, "", 2, 16, [5, 5]))  # no group id: never shared


def model64():
    return MoEForCausalLM(CFG).init_weights(0).double().eval()


def reference_logits(model, trajs, replay: bool):
    """[K, V] logits predicting each generated token t >= 1, each trajectory run alone, in the
    (sequence, position) order of ModelBatch.with_targets."""
    out = []
    for t in trajs:
        n = len(t)
        kw = {}
        if replay:
            rows = torch.from_numpy(t.routing.experts.astype(np.int64))
            rows = torch.cat([rows, torch.arange(CFG.num_experts_per_tok).expand(1, *rows.shape[1:])])
            has = torch.arange(n) < len(t.routing)
            kw = dict(routing=rows[None], routing_mask=has[None])
        with torch.no_grad():
            logits = model(torch.from_numpy(t.tokens)[None], **kw).logits[0]
        pos = np.flatnonzero(t.loss_mask[1:]) + 1
        out.append(logits[torch.from_numpy(pos - 1)])
    return torch.cat(out)


def batch_logits(model, trajs, batch, replay: bool, mask=None):
    if mask is None:
        mask = torch.from_numpy(np.stack([np.pad(t.loss_mask, (0, batch.flat_index.shape[1] - len(t)))
                                          for t in trajs]))
    batch.with_targets(mask)
    kw = dict(segment_ids=batch.segment_ids, logits_index=batch.logits_index)
    if batch.parent_ids is not None:
        kw.update(parent_ids=batch.parent_ids, position_ids=batch.position_ids)
    if replay:
        kw.update(routing=batch.routing, routing_mask=batch.routing_mask)
    with torch.no_grad():
        return model(batch.input_ids, **kw).logits


@pytest.mark.parametrize("replay", [False, True])
def test_shared_layout_matches_each_sequence_alone(replay):
    model, trajs = model64(), trajectories()
    ref = reference_logits(model, trajs, replay)
    packed = build_batch(trajs, LAYOUT, "packed", 32, with_routing=replay)
    shared = build_batch(trajs, LAYOUT, "packed", 64, with_routing=replay, share_prefix=True)
    assert shared.parent_ids is not None and packed.parent_ids is None
    got_packed, got_shared = batch_logits(model, trajs, packed, replay), batch_logits(model, trajs, shared, replay)
    torch.testing.assert_close(got_packed, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_shared, ref, rtol=0, atol=1e-10)
    # the log-prob path the learner uses (float32): same values per (sequence, position)
    lp_p, en_p = target_logprobs(got_packed, packed)
    lp_s, en_s = target_logprobs(got_shared, shared)
    torch.testing.assert_close(lp_s, lp_p, rtol=0, atol=1e-6)
    torch.testing.assert_close(en_s, en_p, rtol=0, atol=1e-6)
    # groups a (prompt 20), b (12), c (10 + 4 shared generated) each computed their prefix once
    # (a whole group fits a 64-token row); d, e (prefix 5 < 8) and the ungrouped pair are not shared
    lens = [len(t) for t in trajs]
    assert shared.num_tokens == packed.num_tokens == packed.computed_tokens == sum(lens)
    assert shared.computed_tokens == sum(lens) - 3 * 20 - 2 * 12 - 2 * 14


def test_full_logits_path_and_fallback():
    """target_logprobs on [R, S, V] logits reads the right neighbour in a shared row; with nothing to
    share, share_prefix gives the plain packed batch."""
    model, trajs = model64(), trajectories()
    shared = build_batch(trajs, LAYOUT, "packed", 64, with_routing=False, share_prefix=True)
    with torch.no_grad():
        full = model(shared.input_ids, segment_ids=shared.segment_ids, parent_ids=shared.parent_ids,
                     position_ids=shared.position_ids).logits
    lp_full, _ = target_logprobs(full, shared)
    mask = torch.zeros_like(shared.flat_index, dtype=torch.bool)
    for i, t in enumerate(trajs):
        mask[i, 1: len(t)] = True
    lp_tgt, _ = target_logprobs(batch_logits(model, trajs, shared, False, mask), shared)
    torch.testing.assert_close(lp_full, lp_tgt, rtol=0, atol=1e-6)
    lone = [dataclasses.replace(t, group_id=str(i)) for i, t in enumerate(trajs)]
    a = build_batch(lone, LAYOUT, "packed", 64, share_prefix=True)
    b = build_batch(lone, LAYOUT, "packed", 64)
    assert a.parent_ids is None and torch.equal(a.input_ids, b.input_ids) and torch.equal(a.flat_index, b.flat_index)


def test_rows_that_differ_on_the_prompt_shorten_or_stop_sharing():
    model, trajs = model64(), trajectories()
    lens = [len(t) for t in trajs]

    def with_row_changed(member, token):
        out = copy.deepcopy(trajs)
        ex = out[member].routing.experts
        ex[token, 0] = (ex[token, 0] + 1) % CFG.num_experts  # other experts, still distinct
        return out

    for token, a_prefix in [(15, 15), (4, 0)]:  # group a (members 0-3, prompt 20): shortened, then off (< 8)
        changed = with_row_changed(2, token)
        changed[2].validate(LAYOUT)
        shared = build_batch(changed, LAYOUT, "packed", 64, with_routing=True, share_prefix=True)
        saved = 3 * a_prefix + 2 * 12 + 2 * 14
        assert shared.computed_tokens == sum(lens) - saved, token
        ref = reference_logits(model, changed, replay=True)
        torch.testing.assert_close(batch_logits(model, changed, shared, True), ref, rtol=0, atol=1e-10)
        # without routing rows (free routing), tokens alone decide: the full prompt is shared
        free = build_batch(changed, LAYOUT, "packed", 64, with_routing=False, share_prefix=True)
        assert free.computed_tokens == sum(lens) - 3 * 20 - 2 * 12 - 2 * 14


def test_row_budget_splits_a_group_and_repeats_its_prefix():
    model, trajs = model64(), trajectories()
    lens = [len(t) for t in trajs]
    # budget 30 (the longest sequence): group a (prefix 20, suffixes 3 7 10 5) -> one shared block
    # [3 7], then [10] and [5] alone (plain sequences); b and c fit whole
    shared = build_batch(trajs, LAYOUT, "packed", 30, with_routing=True, share_prefix=True)
    assert shared.input_ids.shape[1] == max(lens) == 30
    assert shared.computed_tokens == sum(lens) - 20 - 2 * 12 - 2 * 14
    ref = reference_logits(model, trajs, replay=True)
    torch.testing.assert_close(batch_logits(model, trajs, shared, True), ref, rtol=0, atol=1e-10)


def test_micro_batches_keep_group_members_together():
    lens = [30, 10, 30, 30, 30, 30]
    groups = ["a", "", "b", "a", "b", "a"]
    parts = _micro_batches(lens, list(range(6)), 80, groups, {"a": 25, "b": 25})
    assert parts == [[0, 3, 5, 1], [2, 4]]  # a: 30 + 5 + 5, then the ungrouped 10; b: 30 + 5
    assert _micro_batches(lens, list(range(6)), 80) == [[0, 1, 2], [3, 4], [5]]


def learner64(model, **kw):
    lrn = TorchLearner(copy.deepcopy(model), LearnerConfig(lr=1e-3, **kw))
    lrn.model.double()  # the optimizer holds the same Parameter objects
    return lrn


@pytest.mark.parametrize("kw", [dict(replay="R3", correction="tis"),
                                dict(replay="R2", mini_batches=2, micro_batch_tokens=90, entropy_coef=0.01),
                                dict(replay="off", loss="gspo", fuse_old_pass=False),
                                dict(replay="R3", aux_loss_coef=0.1),
                                dict(replay="R3", share_prefix_row_cap=45)])  # rows 45 wide, not 4 x 30
def test_train_step_with_and_without_sharing_agree(kw):
    model, trajs = MoEForCausalLM(CFG).init_weights(0), trajectories()
    on, off = learner64(model, share_prefix=True, **kw), learner64(model, share_prefix=False, **kw)
    m_on, m_off = on.train_step(trajs), off.train_step(trajs)
    # loss / entropy metrics are means over micro-batches, and sharing changes how many fit: compare
    # them where the whole batch is one micro-batch; the rest are whole-batch or per-optimizer-step
    split = "micro_batch_tokens" in kw
    for k in ("mismatch_kl", "extreme_frac_2", "routing_disagree_any", "grad_norm") + (
            () if split else ("loss", "pg_loss", "entropy", "pg_clip_frac")) + (
            ("aux_loss",) if "aux_loss_coef" in kw else ()):
        assert m_on[k] == pytest.approx(m_off[k], rel=1e-6, abs=1e-7), k
    assert m_on["batch_tokens"] == m_off["batch_tokens"] == m_off["computed_tokens"] == sum(len(t) for t in trajs)
    assert m_on["computed_tokens"] < m_on["batch_tokens"]
    # the model runs in float64, log-probs and losses in float32 (target_logprobs): gradients (of the
    # last optimizer step) agree to ~1e-6 of their scale; Adam divides by |g| + 1e-8, which amplifies
    # float noise in near-zero gradients, so the weights agree to 1% of one step (lr)
    for (n, p), q in zip(on.model.named_parameters(), off.model.parameters()):
        assert p.dtype == torch.float64
        scale = max(p.grad.abs().max().item(), 1e-12)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * scale, msg=n)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-2 * on.cfg.lr, msg=n)


def test_token_weights_count_what_each_position_stands_for():
    trajs = trajectories()
    shared = build_batch(trajs, LAYOUT, "packed", max_tokens=64, share_prefix=True)
    packed = build_batch(trajs, LAYOUT, "packed", max_tokens=64)
    padded = build_batch(trajs, LAYOUT, "padded")
    for b in (shared, packed, padded):  # every token of every sequence counted once, padding never
        assert b.token_weights.sum() == sum(len(t) for t in trajs)
    assert (packed.token_weights == (packed.segment_ids >= 0).float()).all()
    assert (padded.token_weights == padded.attention_mask.float()).all()
    # a shared prefix's positions (segment ids >= n) stand for every member whose suffix attends to it
    w, seg, parent = shared.token_weights, shared.segment_ids, shared.parent_ids
    prefixes = 0
    for r in range(w.shape[0]):
        for p in [x for x in seg[r].unique().tolist() if x >= len(trajs)]:
            members = len(seg[r][parent[r] == p].unique())
            assert members >= 2 and (w[r][seg[r] == p] == members).all()
            prefixes += 1
    assert prefixes >= 3 and packed.token_weights.min() == 0  # groups a, b, c share; packing pads


@pytest.mark.parametrize("replay", ["off", "R3"])
def test_load_balancing_loss_is_the_same_in_every_layout(replay):
    """The switch aux loss averages over the batch's tokens: padding must not count and a shared
    prefix must count once per member, so shared, packed and padded batches give the same loss and
    the same gradients (float64)."""
    model, trajs = MoEForCausalLM(CFG).init_weights(0), trajectories()
    layouts = {"shared": dict(share_prefix=True, pack_row_tokens=64),
               "packed": dict(share_prefix=False, pack_row_tokens=64),
               "padded": dict(layout="padded")}
    out = {}
    for name, lkw in layouts.items():
        lrn = learner64(model, replay=replay, aux_loss_coef=1.0, **lkw)
        out[name] = (lrn.train_step(trajs), {n: p.grad.clone() for n, p in lrn.model.named_parameters()})
    ref_m, ref_g = out["padded"]
    assert ref_m["aux_loss"] > 0
    for name in ("shared", "packed"):
        m, g = out[name]
        assert m["aux_loss"] == pytest.approx(ref_m["aux_loss"], rel=1e-9), name
        for n, grad in g.items():
            if ".gate." in n:  # the aux loss reaches only the routers; their gradients must agree too
                torch.testing.assert_close(grad, ref_g[n], rtol=1e-5, atol=1e-5 * ref_g[n].abs().max().item(), msg=n)


def test_real_engine_rows_share_only_where_they_agree(tmp_path):
    """Groups sampled by the embedded engine (bf16): members' rows on the same prompt can differ (they
    may be prefilled in different batches), so sharing stops there; results still match."""
    from test_learner import rollouts

    from agentrl.model import load_pretrained
    from agentrl.model.checkpoint import init_model
    from agentrl.routing import align_packed

    ckpt = init_model("tiny-moe", tmp_path / "moe", seed=0, initializer_range=0.08)
    trajs = rollouts(ckpt, n_tasks=3, group=4)
    model = load_pretrained(ckpt).double().eval()
    shared = build_batch(trajs, LAYOUT, "packed", 4 * max(len(t) for t in trajs), share_prefix=True)
    # what was shared, from the trajectories alone: per group, the tokens all members' ids and rows agree on
    saved = 0
    for g in {t.group_id for t in trajs}:
        members = [t for t in trajs if t.group_id == g]
        rows = [align_packed([t.routing], [len(t)], LAYOUT) for t in members]
        s = 0
        while (s < min(len(t) for t in members) - 1 and all(t.tokens[s] == members[0].tokens[s] for t in members)
               and all(np.array_equal(r[0][s], rows[0][0][s]) and r[1][s] == rows[0][1][s] for r in rows)):
            s += 1
        saved += s * (len(members) - 1) if s >= 8 else 0
    assert saved > 0
    assert shared.computed_tokens == sum(len(t) for t in trajs) - saved
    ref = reference_logits(model, trajs, replay=True)
    torch.testing.assert_close(batch_logits(model, trajs, shared, True), ref, rtol=0, atol=1e-10)


def test_megatron_learner_never_shares_and_matches_the_sharing_torch_learner():
    """MegatronLearner reuses train_step with its own forward (no parent_ids): sharing is off there;
    its update equals the torch learner's with shared prefixes."""
    from agentrl.learner.mcore import MegatronLearner

    model, trajs = MoEForCausalLM(CFG).init_weights(0), trajectories()
    kw = dict(replay="R3", lr=1e-3, correction="tis")
    torch_l = TorchLearner(copy.deepcopy(model), LearnerConfig(**kw))
    # AGENTRL_LEARNER_DEVICE=cuda: megatron-core on the GPU (it refuses device=cpu where it sees one)
    device = os.environ.get("AGENTRL_LEARNER_DEVICE", "cpu")
    mcore_l = MegatronLearner(copy.deepcopy(model), LearnerConfig(**kw, device=device))
    assert torch_l.cfg.share_prefix and mcore_l.cfg.share_prefix  # the default; megatron ignores it
    mt, mm = torch_l.train_step(trajs), mcore_l.train_step(trajs)
    assert mm["computed_tokens"] == mm["batch_tokens"] > mt["computed_tokens"]
    for k in ("loss", "pg_loss", "entropy", "mismatch_kl", "routing_disagree_any"):
        assert mm[k] == pytest.approx(mt[k], rel=1e-5, abs=1e-7), k


def mixed_rewards(trajs):
    """Groups a and c (and the singleton d, the ungrouped pair) get equal rewards: advantage exactly 0."""
    rewards = {"a": [1, 1, 1, 1], "b": [0, 1, 0], "c": [0, 0, 0], "d": [1], "e": [1, 0], "": [0, 0]}
    seen: dict[str, int] = {}
    for t in trajs:
        t.reward = float(rewards[t.group_id][seen.get(t.group_id, 0)])
        seen[t.group_id] = seen.get(t.group_id, 0) + 1
    return trajs


@pytest.mark.parametrize("kw", [dict(replay="R3", correction="tis"), dict(replay="off", share_prefix=False),
                                dict(replay="R2", loss="gspo"),
                                # not fused: several mini-batches (some all idle) and micro-batches
                                dict(replay="R3", correction="tis", mini_batches=2, micro_batch_tokens=60),
                                dict(replay="R2", mini_batches=8), dict(replay="off", micro_batch_tokens=40)])
def test_zero_advantage_samples_skip_the_backward_and_change_nothing(kw):
    """Groups whose rewards are all equal have advantage exactly 0: their samples run a forward without
    autograd (their log-probs and rows still feed the metrics) and no backward, fused or in every
    micro-batch of every mini-batch; the update and every metric are those of the full backward
    (float64 model)."""
    model, trajs = MoEForCausalLM(CFG).init_weights(0), mixed_rewards(trajectories())
    skip, full = learner64(model, **kw), learner64(model, skip_zero_advantage=False, **kw)
    m_skip, m_full = skip.train_step(trajs), full.train_step(trajs)
    assert m_skip["skipped_backward"] == 4 + 3 + 1 + 2  # groups a, c, the singleton d, the ungrouped pair
    assert "skipped_backward" not in m_full
    for k, v in m_full.items():
        if k not in ("learner_time_s", "computed_tokens"):
            assert m_skip[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    for (n, p), q in zip(skip.model.named_parameters(), full.model.named_parameters()):
        scale = max(q[1].grad.abs().max().item(), 1e-12)
        torch.testing.assert_close(p.grad, q[1].grad, rtol=1e-5, atol=1e-6 * scale, msg=n)
        torch.testing.assert_close(p, q[1], rtol=0, atol=1e-2 * skip.cfg.lr, msg=n)
    # a term that reaches every token (entropy bonus) keeps every sample in the backward
    assert "skipped_backward" not in learner64(model, entropy_coef=0.01, **kw).train_step(trajs)


@pytest.mark.parametrize("kw", [dict(replay="R3"), dict(replay="R2", mini_batches=2, micro_batch_tokens=60)])
def test_a_batch_without_any_gradient_runs_no_backward_and_steps_like_the_full_one(kw):
    """Every reward equal (common early in RL on a hard task): no sample takes a gradient, no backward
    runs, and the optimizer steps on a zero gradient exactly as after the full backward (AdamW's weight
    decay and moments still move the weights after an earlier real step)."""
    model, trajs = MoEForCausalLM(CFG).init_weights(0), mixed_rewards(trajectories())
    skip, full = (learner64(model, weight_decay=0.1, skip_zero_advantage=s, **kw) for s in (True, False))
    skip.train_step(trajs), full.train_step(trajs)  # a real step first: AdamW has moments to apply
    for t in trajs:
        t.reward = 1.0
    m_skip, m_full = skip.train_step(trajs), full.train_step(trajs)
    assert m_skip["skipped_backward"] == len(trajs) and "skipped_backward" not in m_full
    for k, v in m_full.items():
        if k not in ("learner_time_s", "computed_tokens"):
            assert m_skip[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    for (n, p), q in zip(skip.model.named_parameters(), full.model.parameters()):
        assert p.grad is not None and not p.grad.any(), n
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=n)


def test_shared_rows_widen_for_short_samples_only():
    """Shared-prefix rows are `share_prefix_row_factor` x the longest sample wide, capped at
    `share_prefix_row_cap` unless a sample is longer: each token attends over its whole row."""
    lrn = TorchLearner(MoEForCausalLM(CFG).init_weights(0), LearnerConfig(share_prefix_row_factor=4,
                                                                          share_prefix_row_cap=512))
    assert lrn._row_tokens([100, 60], [0, 1], shares=True) == 400
    assert lrn._row_tokens([200, 60], [0, 1], shares=True) == 512
    assert lrn._row_tokens([700, 60], [0, 1], shares=True) == 700
    assert lrn._row_tokens([700, 60], [0, 1], shares=False) == 700
    assert lrn._row_tokens([100, 60], [1], shares=False) == 60
