"""Arithmetic without tools: one turn, "What is 37 × 52?" -> "The answer is 1924." Reward 1 when the
answer's last number is right (the calculator's rule). The single-turn task of benchmarks/vs_trl.py,
where TRL's GRPOTrainer can run the same problem."""

from agentrl.env import Task
from envs.calculator import CalculatorEnv


class ArithEnv(CalculatorEnv):
    tools = []
    system_prompt = 'Reply "The answer is N."'
    tools_in_prompt = False

    def __init__(self, digits: int = 1, **kwargs):
        super().__init__(compact=False, digits=digits, word_problems=False, **kwargs)
        self.system_prompt, self.tools_in_prompt = ArithEnv.system_prompt, False

    def task(self, rng, options) -> Task:
        t = super().task(rng, options)
        return Task(messages=t.messages, answer=t.answer, info=t.info)

    def demonstration(self, task) -> list[str]:
        return [f"The answer is {task.answer}."]
