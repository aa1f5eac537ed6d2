"""Answer scoring for question answering: SQuAD-style normalisation, exact match and token F1.

``normalize``: lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed.
``exact_match`` / ``f1``: the best score over the gold answers (a question may list aliases).
A judge (an LLM grader, say) plugs in as ``judge(question, golds, prediction) -> float in [0, 1]``.
Does not own: where the prediction comes from (envs.browse.env).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

Judge = Callable[[str, Sequence[str], str], float]
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    return float(any(normalize(prediction) == normalize(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: Sequence[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)
