"""The torch learner on real multi-turn trajectories from the embedded engine (bf16) and calculator env."""

import asyncio
import dataclasses
import os

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoTokenizer

from agentrl.engine.engine import Engine
from agentrl.engine.types import SamplingParams
from agentrl.env import make
from agentrl.learner.batch import build_batch
from agentrl.learner.learner import LearnerConfig, TorchLearner
from agentrl.model import load_pretrained
from agentrl.model.checkpoint import init_model
from agentrl.rollout import run_episodes
from agentrl.routing import RoutingLayout

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=16, seed=0)


def rollouts(ckpt, n_tasks=6, group=4, dtype="bfloat16"):
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = load_pretrained(ckpt)
    layout = RoutingLayout.from_config(model.config) if model.config.moe_layers else None
    with Engine.from_pretrained(ckpt, dtype=dtype) as eng:
        trajs = asyncio.run(run_episodes(eng, lambda: make("calculator-v0"), tok, SAMPLING, seeds=range(n_tasks),
                                         group_size=group, layout=layout))
    rng = np.random.default_rng(0)  # the random model rarely solves a task: give groups reward variance
    return [dataclasses.replace(t, reward=float(rng.integers(2))) for t in trajs]


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return init_model("tiny-moe", tmp_path_factory.mktemp("learner") / "moe", seed=0, initializer_range=0.08)


@pytest.fixture(scope="module")
def moe_trajs(moe_ckpt):
    return rollouts(moe_ckpt)


# AGENTRL_LEARNER_DEVICE=cuda trains every `learner(...)` of this file on a GPU (rollouts stay on the host engine)
DEVICE = os.environ.get("AGENTRL_LEARNER_DEVICE", "cpu")


def learner(ckpt, **kw):
    return TorchLearner(load_pretrained(ckpt), LearnerConfig(**{"device": DEVICE, **kw}))


def test_r3_replays_engine_routing_and_lowers_mismatch(moe_ckpt, moe_trajs, tmp_path):
    off = learner(moe_ckpt, replay="off", lr=0.0).train_step(moe_trajs)
    r3l = learner(moe_ckpt, replay="R3", lr=0.0)
    r3 = r3l.train_step(moe_trajs)
    assert off["trained_sequences"] == r3["trained_sequences"] == len(moe_trajs)
    # bf16 engine vs fp32 learner: free routing disagrees with the engine somewhere ...
    assert off["routing_disagree_any"] > 0
    # ... replay uses exactly the engine's experts (last update forward: selected == rows where rows exist)
    batch = build_batch(moe_trajs[-1:], r3l.layout, "packed").to(DEVICE)
    with torch.no_grad(), r3l.hook.replay(batch.routing, batch.routing_mask):
        r3l.model(batch.input_ids, segment_ids=batch.segment_ids)
    used = r3l.hook.selected_rows()[batch.routing_mask.reshape(-1)]
    assert torch.equal(used, batch.routing.reshape(-1, *batch.routing.shape[2:])[batch.routing_mask.reshape(-1)])
    assert r3["mismatch_kl"] < off["mismatch_kl"]
    assert r3["extreme_frac_2"] <= off["extreme_frac_2"]
    assert r3["rows_present"] == r3["rows_expected"] and r3["rows_missing"] == 0 and r3["rows_stale"] == 0
    # the dense twin has no routing: its mismatch is the floor
    dense_ckpt = init_model("tiny-dense", tmp_path / "dense", seed=0, initializer_range=0.08)
    dense = learner(dense_ckpt, replay="off", lr=0.0).train_step(rollouts(dense_ckpt))
    assert dense["mismatch_kl"] < off["mismatch_kl"]
    assert "routing_disagree_any" not in dense


def test_router_learns_under_replay(moe_ckpt, moe_trajs):
    lrn = learner(moe_ckpt, replay="R3", lr=1e-2)
    before = {n: p.detach().clone() for n, p in lrn.model.named_parameters() if n.endswith("mlp.gate.weight")}
    m = lrn.train_step(moe_trajs)
    assert m["grad_norm"] > 0 and lrn.version == 1
    for n, p in lrn.model.named_parameters():
        if n in before:
            assert not torch.equal(p, before[n]), f"router {n} got no update under replay"


@pytest.mark.parametrize("replay", ["off", "R2", "R3"])
def test_packed_and_padded_updates_agree(moe_ckpt, moe_trajs, replay):
    a = learner(moe_ckpt, replay=replay, lr=1e-3, layout="packed")
    b = learner(moe_ckpt, replay=replay, lr=1e-3, layout="padded")
    ma, mb = a.train_step(moe_trajs), b.train_step(moe_trajs)
    assert ma["pg_loss"] == pytest.approx(mb["pg_loss"], rel=1e-4, abs=1e-6)
    assert ma["mismatch_kl"] == pytest.approx(mb["mismatch_kl"], rel=1e-3, abs=1e-7)
    assert_same_gradients(a, b)


def assert_same_gradients(a, b):
    """Adam's first step maps any non-zero gradient, even float noise, to +-lr, so compare the
    gradients of the (single) optimizer step rather than the weights after it."""
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        scale = max(p.grad.abs().max().item(), 1e-12)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


def test_micro_batches_accumulate_to_the_same_update(moe_ckpt, moe_trajs):
    whole = learner(moe_ckpt, lr=1e-3, micro_batch_tokens=100_000)
    parts = learner(moe_ckpt, lr=1e-3, micro_batch_tokens=200)
    whole.train_step(moe_trajs)
    parts.train_step(moe_trajs)
    assert_same_gradients(whole, parts)


def test_mini_batches_and_corrections_and_losses(moe_ckpt, moe_trajs):
    for kw in [dict(mini_batches=3), dict(loss="gspo", correction="icepop"), dict(correction="tis", advantage="rloo"),
               dict(correction="metropolis_token", advantage="dr_grpo", agg="token-sum-norm", agg_constant=16.0),
               dict(aux_loss_coef=0.01, entropy_coef=0.001, dtype="bfloat16"), dict(replay="R2", ema_decay=0.9)]:
        lrn = learner(moe_ckpt, lr=1e-3, **kw)
        m = lrn.train_step(moe_trajs)
        assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]), kw
        steps = [s["step"] for s in lrn.opt.state.values()]
        assert all(int(s) == kw.get("mini_batches", 1) for s in steps), kw
        if "correction" in kw:
            assert "corr_ess" in m
        if kw.get("correction", "").startswith("metropolis"):
            assert 0 < m["corr_accepted_frac"] <= 1
        if "ema_decay" in kw:
            published, v = lrn.weights()
            raw = {k: v.cpu() for k, v in lrn.model.state_dict().items()}
            assert v == 1 and all(torch.equal(published[k], raw[k]) for k in raw)  # publish="policy"
            assert any(not torch.equal(lrn.ema[k].cpu(), raw[k]) for k in raw if raw[k].is_floating_point())
            lrn.cfg.publish = "ema"
            assert all(torch.equal(lrn.weights()[0][k], lrn.ema[k].cpu()) for k in raw)


def test_bad_trajectories_are_rejected_and_counted(moe_ckpt, moe_trajs):
    bad = dataclasses.replace(moe_trajs[0], routing=dataclasses.replace(
        moe_trajs[0].routing, experts=np.zeros_like(moe_trajs[0].routing.experts)))  # duplicate experts
    failed = dataclasses.replace(moe_trajs[1], status="env_error")
    m = learner(moe_ckpt, lr=0.0).train_step([bad, failed] + moe_trajs[2:])
    assert m["rejected"] == 1 and m["rejected_routing"] == 1 and m["dropped_status"] == 1
    assert m["trained_sequences"] == len(moe_trajs) - 2


def test_stale_rows_are_reported(moe_ckpt, moe_trajs):
    lrn = learner(moe_ckpt, lr=1e-3)
    lrn.train_step(moe_trajs)  # version 1; the trajectories' rows are from version 0
    m = lrn.train_step(moe_trajs)
    assert m["rows_stale"] == m["rows_present"] > 0


def test_transformers_qwen3_moe_trains_with_r3(moe_ckpt, moe_trajs):
    hf = transformers.AutoModelForCausalLM.from_pretrained(moe_ckpt, dtype=torch.float32,
                                                           experts_implementation="eager")
    lrn = TorchLearner(hf, LearnerConfig(replay="R3", lr=1e-3, layout="padded"))
    ours = learner(moe_ckpt, replay="R3", lr=1e-3, layout="padded")
    m_hf, m_ours = lrn.train_step(moe_trajs), ours.train_step(moe_trajs)
    assert m_hf["mismatch_kl"] == pytest.approx(m_ours["mismatch_kl"], rel=1e-3, abs=1e-7)
    assert m_hf["pg_loss"] == pytest.approx(m_ours["pg_loss"], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="padded"):
        TorchLearner(hf, LearnerConfig(layout="packed")).train_step(moe_trajs)


@pytest.fixture(scope="module")
def multiturn(moe_ckpt, tmp_path_factory):
    """A briefly warmed-up model (scripted calculator demos) plays the calculator env for real:
    it calls tools, so episodes have several turns."""
    from agentrl.model import save_pretrained
    from agentrl.sft import collect_demos, warm_up

    tok = AutoTokenizer.from_pretrained(moe_ckpt)
    model = load_pretrained(moe_ckpt)
    warm_up(model, collect_demos(lambda: make("calculator-v0"), tok, range(64)), steps=40, batch_size=8, lr=5e-3,
            progress=False)
    out = tmp_path_factory.mktemp("warm") / "m"
    save_pretrained(model, out, tokenizer=tok)
    with Engine.from_pretrained(out, dtype="bfloat16") as eng:
        trajs = asyncio.run(run_episodes(eng, lambda: make("calculator-v0"), tok,
                                         SamplingParams(temperature=1.0, max_new_tokens=40, seed=0),
                                         seeds=range(1000, 1008), group_size=4, layout=eng.layout))
    return out, trajs


def test_learner_step_on_real_multi_turn_calculator_trajectories(multiturn):
    ckpt, trajs = multiturn
    multi = [t for t in trajs if t.turns >= 2 and t.status in ("ok", "truncated")]
    assert len(multi) >= 8, [t.turns for t in trajs]
    # the barely warmed-up model cannot do the arithmetic yet (rewards are all 0, so GRPO advantages
    # vanish): give the groups reward variance so the update is non-trivial; tokens and rows are real
    rng = np.random.default_rng(1)
    multi = [dataclasses.replace(t, reward=float(rng.integers(2))) for t in multi]
    lrn = learner(ckpt, replay="R3", lr=1e-3, correction="tis")
    m = lrn.train_step(multi)
    assert m["trained_sequences"] == len(multi) and m["rows_missing"] == 0
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0 and lrn.version == 1
    assert 0 <= m["routing_disagree_any"] <= 1 and m["mismatch_kl"] >= 0


@pytest.mark.parametrize("kind", ["mixtral", "olmoe"])
def test_transformers_mixtral_and_olmoe_train_with_engine_rows(moe_trajs, kind):
    """Same routing layout as tiny-moe (4 MoE layers, 8 experts, top-2), so the engine's rows replay."""
    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=8))
    else:
        model = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**common, num_experts=8))
    lrn = TorchLearner(model, LearnerConfig(replay="R3", lr=1e-3, layout="padded"))
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("gate.weight")}
    m = lrn.train_step(moe_trajs)
    assert np.isfinite(m["loss"]) and m["trained_sequences"] == len(moe_trajs)
    assert len(routers) == 4
    for n, p in model.named_parameters():
        if n in routers:
            assert not torch.equal(p, routers[n]), n


@pytest.mark.parametrize("replay", ["off", "R2", "R3"])
def test_fused_old_pass_gives_the_separate_pass_update(moe_ckpt, moe_trajs, replay):
    """One forward (old log-probs = the training forward's, detached) == a no-grad old pass + a training pass."""
    a = learner(moe_ckpt, replay=replay, lr=1e-3, correction="tis")
    b = learner(moe_ckpt, replay=replay, lr=1e-3, correction="tis", fuse_old_pass=False)
    ma, mb = a.train_step(moe_trajs), b.train_step(moe_trajs)
    for k in ("pg_loss", "mismatch_kl", "extreme_frac_2", "routing_disagree_any", "corr_weight_mean"):
        if k in ma or k in mb:
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-7), k
    assert_same_gradients(a, b)
