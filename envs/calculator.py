"""Calculator: seeded arithmetic and word problems, a safe `calc` tool (an `ast` walk, no eval), reward 1
when the answer's last number is right. Expected episode: call `calc`, then "The answer is 42." (2 turns)."""

import ast
import json
import re
from fractions import Fraction

from agentrl.env import Task, ToolEnv, tool

_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}
_MAX_LEN, _MAX_ABS = 200, 10**60


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return -_eval(node.operand) if isinstance(node.op, ast.USub) else _eval(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ZeroDivisionError("division by zero")
        value = _OPS[type(node.op)](left, right)
        if abs(value) > _MAX_ABS:
            raise ValueError("result too large")
        return value
    what = type(node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node).__name__
    raise ValueError(f"{what} is not allowed; use integers, + - * / and ( )")


@tool
def calc(expr: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expr: Integers with + - * / and parentheses, e.g. "17 + 3 * 12".
    """
    if len(expr) > _MAX_LEN:
        raise ValueError(f"expression longer than {_MAX_LEN} characters")
    expr = expr.replace("×", "*").replace("−", "-").replace("÷", "/")
    try:
        value = _eval(ast.parse(expr.strip(), mode="eval").body)
    except SyntaxError:
        raise ValueError("not a valid expression") from None
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.10g}"


_WORD_PROBLEMS = [  # (template, answer from a, b, c)
    ("{name} has {a} apples and buys {b} bags of {c}. How many apples does {name} have?", lambda a, b, c: a + b * c),
    ("A shop has {b} boxes of {c} pens and sells {a} pens. How many pens are left?", lambda a, b, c: b * c - a),
    ("{name} reads {c} pages a day for {b} days, then {a} more. How many pages in total?", lambda a, b, c: b * c + a),
]
_NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Farah"]
_NUMBER = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?")


_COMPACT = ('Call calc as <tool_call>{"name": "calc", "arguments": {"expr": "..."}}</tool_call>, '
            'then reply "The answer is N."')


class CalculatorEnv(ToolEnv):
    """`compact=True` replaces the chat template's JSON tool schema (~250 tokens) by a one-line
    instruction: the same task in ~40 prompt tokens, for fast CPU training (the quickstart)."""

    tools = [calc]
    system_prompt = "Use the calc tool for arithmetic, then state the final answer as a number."

    def __init__(self, compact: bool = False, digits: int = 3, word_problems: bool = True, demo_flaw: float = 0.0,
                 **kwargs):
        """demo_flaw: fraction of subtraction *demonstrations* that swap the operands (a systematic
        mistake in the warm-up data, which RL can then correct; rewards are unaffected)."""
        super().__init__(**kwargs)
        if not 1 <= digits <= 6 or not 0 <= demo_flaw <= 1:
            raise ValueError("digits must be in 1..6 and demo_flaw in [0, 1]")
        self.digits, self.word_problems, self.demo_flaw = digits, word_problems, demo_flaw
        if compact:
            self.system_prompt, self.tools_in_prompt = _COMPACT, False

    def task(self, rng, options) -> Task:
        top = 10 ** self.digits
        a, b, c = (int(x) for x in rng.integers([top // 10, 2, 10], [top, 13, 100]))
        if not self.word_problems or rng.random() < 0.5:
            op, b = ["+", "−", "×"][int(rng.integers(3))], int(rng.integers(top // 10, top))
            question, answer = f"What is {a} {op} {b}?", {"+": a + b, "−": a - b, "×": a * b}[op]
            flawed = op == "−" and rng.random() < self.demo_flaw
            expr = f"{b} - {a}" if flawed else f"{a} {dict(zip('+−×', '+-*'))[op]} {b}"
        else:
            k = int(rng.integers(len(_WORD_PROBLEMS)))
            template, fn = _WORD_PROBLEMS[k]
            a = 1 + a % (b * c)  # so that "sells a" never exceeds the stock
            question = template.format(name=_NAMES[int(rng.integers(len(_NAMES)))], a=a, b=b, c=c)
            answer, expr = fn(a, b, c), [f"{a} + {b} * {c}", f"{b} * {c} - {a}", f"{b} * {c} + {a}"][k]
        return Task(messages=[{"role": "user", "content": question}], answer=answer, info={"expr": expr})

    def demonstration(self, task) -> list[str]:
        """A scripted episode's assistant turns: call calc, then state its result (correct unless
        the task was drawn as a flawed demonstration, see demo_flaw)."""
        call = json.dumps({"name": "calc", "arguments": {"expr": task.info["expr"]}})
        result = calc.fn(task.info["expr"])
        return [f"<tool_call>\n{call}\n</tool_call>", f"The answer is {result}."]

    def reward(self, task, history, final_text) -> float:
        numbers = _NUMBER.findall(final_text)
        try:
            return float(bool(numbers) and Fraction(numbers[-1].replace(",", "").replace("−", "-")) == task.answer)
        except ValueError:  # e.g. a number too long to convert
            return 0.0
