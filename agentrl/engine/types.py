"""Typed requests and results shared by every inference engine (embedded, HTTP client, SGLang).

Owns: `SamplingParams`, `GenerateRequest`, `GenerateOutput` and the `InferenceEngine` protocol the
agent loop talks to. Field names follow SGLang's `/generate` API so the HTTP layer is a thin
mapping. Does not own: scheduling (engine.py), HTTP (server.py / client.py).
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# SGLang sampling keys we accept only at their neutral value (anything else is a clear error).
_NEUTRAL = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
            "n": 1, "skip_special_tokens": True, "spaces_between_special_tokens": True, "no_stop_trim": False,
            "min_new_tokens": 0}


class RequestError(ValueError):
    """A request the engine cannot serve as asked (bad sampling params, empty prompt, too long...)."""


@dataclass
class SamplingParams:
    """SGLang's sampling_params subset. top_k = -1 and top_p = 1 disable truncation; temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise RequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            raise RequestError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingParams:
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for k in list(d):
            if k in names:
                continue
            if k in _NEUTRAL:
                if d[k] not in (None, _NEUTRAL[k]):
                    raise RequestError(f"sampling param {k}={d[k]!r} is not supported by this engine")
                d.pop(k)
            else:
                raise RequestError(f"unknown sampling param {k!r}")
        if d.get("max_new_tokens") is None:
            d.pop("max_new_tokens", None)
        try:
            return cls(**d)
        except TypeError as e:
            raise RequestError(str(e)) from None


@dataclass
class GenerateRequest:
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logprob: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0  # return only rows [start_len, N-1)
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise RequestError("input_ids must not be empty")
        if self.routed_experts_start_len < 0:
            raise RequestError("routed_experts_start_len must be >= 0")


@dataclass
class GenerateOutput:
    """One finished request. N = prompt_tokens + completion_tokens; the model was fed N-1 of them."""

    rid: str
    output_ids: list[int]
    finish_reason: dict[str, Any]  # SGLang shape: {"type": "stop"|"length"|"abort", "matched": id|str|None}
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache (not recomputed)
    weight_version: int  # policy version of the weights when the request finished
    output_logprobs: list[float] | None = None  # logprob of each output token under the sampling distribution
    output_versions: list[int] | None = None  # policy version that produced each output token
    routed_experts: np.ndarray | None = None  # [rows, moe_layers, top_k], rows [start_len, N-1)
    routed_versions: np.ndarray | None = None  # [rows] policy version of the weights that computed each row
    routed_experts_start_len: int = 0
    text: str | None = None


class InferenceEngine(Protocol):
    """What the agent loop needs from an engine, in process or over HTTP."""

    async def generate(self, request: GenerateRequest) -> GenerateOutput: ...
