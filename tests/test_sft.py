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
