"""Scripted demonstrations through the real agent loop, and supervised warm-up."""

from transformers import AutoTokenizer

from agentrl.env import make
from agentrl.model import load_pretrained
from agentrl.model.checkpoint import init_model
from agentrl.rollout import render_continuation
from agentrl.sft import collect_demos, warm_up


def test_demos_solve_the_task_with_rollout_token_layout(tmp_path):
    ckpt = init_model("tiny-moe", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(ckpt)
    demos = collect_demos(lambda: make("calculator-v0"), tok, range(20))
    for seed, d in zip(range(20), demos):
        assert d.status == "ok" and d.reward == 1.0 and d.turns == 2
        env = make("calculator-v0")
        obs, info = env.reset(seed=seed)
        call, answer = env.demonstration(env.current_task)
        # the same tokens the agent loop would build: template, turn ids + eos, env continuation
        prompt = tok(tok.apply_chat_template(obs, tools=info["tools"], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        turn1 = tok(call, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        tool_obs, *_ = env.step(call)
        cont = tok(render_continuation(tok, tool_obs, closed=True), add_special_tokens=False)["input_ids"]
        turn2 = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert d.tokens.tolist() == prompt + turn1 + cont + turn2
        assert d.loss_mask.sum() == len(turn1) + len(turn2)


def test_warm_up_lowers_the_demo_loss(tmp_path):
    ckpt = init_model("tiny-moe", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(ckpt)
    demos = collect_demos(lambda: make("calculator-v0"), tok, range(32))
    losses = warm_up(load_pretrained(ckpt), demos, steps=20, batch_size=4, lr=5e-3, progress=False)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]


def test_lr_lambda_follows_the_hand_formula():
    import math

    import pytest

    from agentrl.learner.learner import lr_lambda
    warm, total = 4, 24
    for step in range(warm):  # linear ramp: (step + 1) / warm
        for sched in ("constant", "cosine", "linear"):
            assert lr_lambda(sched, warm, total)(step) == pytest.approx((step + 1) / warm)
    for step in (4, 9, 14, 19, 24, 40):
        frac = min(1.0, (step - warm) / (total - warm))
        assert lr_lambda("constant", warm, total)(step) == 1.0
        assert lr_lambda("linear", warm, total)(step) == pytest.approx(1 - frac)
        assert lr_lambda("cosine", warm, total)(step) == pytest.approx((1 + math.cos(math.pi * frac)) / 2)
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5)  # halfway down a cosine: half the peak
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_lambda("exponential", 0, 10)


def test_warm_up_steps_on_its_schedule_with_clipped_gradients(tmp_path, monkeypatch):
    """The optimizer sees lr x schedule(step) at each step and a gradient norm <= grad_clip."""
    import torch

    from agentrl.learner.learner import lr_lambda
    ckpt = init_model("tiny-moe", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(ckpt)
    demos = collect_demos(lambda: make("calculator-v0"), tok, range(8))
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append((self.param_groups[0]["lr"], float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])))))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    steps, lr = 6, 4e-3
    losses = warm_up(load_pretrained(ckpt), demos, steps=steps, batch_size=4, lr=lr, progress=False,
                     lr_schedule="cosine", warmup_steps=2, grad_clip=0.5)
    f = lr_lambda("cosine", 2, steps)
    assert len(losses) == steps and [s[0] for s in seen] == [lr * f(i) for i in range(steps)]
    assert all(n <= 0.5 + 1e-5 for _, n in seen) and seen[0][1] > 0.5 - 1e-5  # a fresh model's gradient is clipped
