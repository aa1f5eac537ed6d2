"""Integration tests against the REAL SGLang server (0.5.x), run on CPU through shared/sglang-cpu.

Marked `sglang`; skipped (with the reason) only when the SGLang CPU venv built by
``shared/sglang-cpu/setup.sh`` does not exist. One server for the module (~50 s to start on 2 CPU
cores), stopped in teardown; it keeps both cores busy even when idle, so nothing else is timed here.

What is checked, on a tiny random Qwen3-MoE written by `init_model("tiny-moe")`:
  - SGLang loads our checkpoint and returns ``meta_info["routed_experts"]``: base64 int32 rows
    ``[prompt+completion-1, num_hidden_layers, top_k]`` that decode into valid MoE rows;
  - multi-turn prefix reuse: a second turn hits the radix cache (``cached_tokens > 0``) and its rows
    for the shared prefix equal the first turn's; ``routed_experts_start_len`` returns exactly the tail;
  - the same through agentrl's `EngineClient` (plus a weight update and its version tag);
  - SGLang's routing vs our own model (`load_pretrained`, fp32) on the same tokens: agreement of the
    (token, layer) expert sets, printed and asserted high (not exact: SGLang runs the fp32 checkpoint
    in float16 by default, see model_config._get_and_verify_dtype).

    python -m pytest -q tests/test_sglang_real.py -s
    AGENTRL_SGLANG_TEST_ARGS="--dtype float32" python -m pytest -q tests/test_sglang_real.py -s
"""

from __future__ import annotations

import asyncio
import os
import shlex
import socket
import time

import numpy as np
import pytest

from agentrl.engine.sglang import SGLangServer, sglang_cpu_dir, sglang_cpu_venv

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(
        sglang_cpu_venv() is None or sglang_cpu_dir() is None,
        reason="SGLang CPU venv not found (build it with shared/sglang-cpu/setup.sh, "
        "or set SGLANG_CPU_VENV / AGENTRL_SGLANG_CPU_DIR)",
    ),
]

aiohttp = pytest.importorskip("aiohttp")
torch = pytest.importorskip("torch")

from agentrl.engine.client import EngineClient  # noqa: E402
from agentrl.engine.types import GenerateRequest, SamplingParams  # noqa: E402
from agentrl.model.checkpoint import init_model, load_config, load_pretrained  # noqa: E402
from agentrl.routing import RoutingLayout, decode_wire, validate_rows, wire_to_moe  # noqa: E402

SERVER_ARGS = shlex.split(os.environ.get("AGENTRL_SGLANG_TEST_ARGS", ""))
NEW_TOKENS = 8
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "class Config:\n    def __init__(self, path):\n        self.path = path\n",
    "Please list the files in the repository and run the tests.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sglang:
    """The running server plus what the tests need to talk to it."""

    def __init__(self, server: SGLangServer, ckpt, layout: RoutingLayout, prompts: list[list[int]]):
        self.server, self.ckpt, self.layout, self.prompts = server, ckpt, layout, prompts
        self.base_url = server.base_url

    async def post(self, path: str, body: dict) -> dict:
        async with aiohttp.ClientSession() as s:
            async with s.post(self.base_url + path, json=body) as r:
                assert r.status == 200, f"{path} -> HTTP {r.status}: {await r.text()}"
                return await r.json()

    async def flush_cache(self) -> None:
        async with aiohttp.ClientSession() as s:
            async with s.post(self.base_url + "/flush_cache") as r:
                assert r.status == 200, f"/flush_cache -> HTTP {r.status}: {await r.text()}"

    def model_dtype(self) -> str:
        """The dtype SGLang runs in (its log line "KV Cache is allocated. dtype: torch.float16, ...")."""
        for line in self.server.log_tail(10_000).splitlines():
            if "KV Cache is allocated. dtype:" in line:
                return line.split("dtype:")[1].split(",")[0].strip()
        return "unknown"

    def generate(self, input_ids: list[int], **extra) -> dict:
        body = {
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
            "return_logprob": True,
            "return_routed_experts": True,
            **extra,
        }
        return asyncio.run(self.post("/generate", body))

    def rows(self, out: dict) -> np.ndarray:
        """Wire rows of a /generate answer -> internal MoE rows [R, moe_layers, k] (validated)."""
        meta = out["meta_info"]
        wire = decode_wire(meta["routed_experts"], self.layout.num_hidden_layers, self.layout.top_k,
                           meta.get("routed_experts_dtype"))
        return wire_to_moe(wire, self.layout)


@pytest.fixture(scope="module")
def sglang(tmp_path_factory):
    t0 = time.monotonic()
    ckpt = init_model("tiny-moe", tmp_path_factory.mktemp("sglang") / "tiny-moe", seed=0)
    layout = RoutingLayout.from_config(load_config(ckpt))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    prompts = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    server = SGLangServer.cpu_test_server(ckpt, _free_port(), extra_args=SERVER_ARGS, startup_timeout=300)
    assert server is not None
    try:
        server.start()  # raises with the server's log tail if it dies or times out
        t_up = time.monotonic()
        print(f"\n[sglang] server up in {t_up - t0:.1f} s (args: {server.command()[2:]})")
        yield Sglang(server, ckpt, layout, prompts)
    finally:
        log = server.log_path
        server.stop()  # removes its temp log after a normal stop, keeps it otherwise
        t_end = time.monotonic()
        print(f"\n[sglang] module total {t_end - t0:.1f} s (server log: {server.log_path or f'{log}, removed'})")


def test_generate_returns_routed_experts(sglang):
    prompt = sglang.prompts[0]
    out = sglang.generate(prompt)
    meta = out["meta_info"]
    assert len(out["output_ids"]) == NEW_TOKENS
    assert meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == NEW_TOKENS
    assert meta["finish_reason"] == {"type": "length", "length": NEW_TOKENS}
    # output_token_logprobs: [logprob, token_id, text-or-None] per output token
    lps = meta["output_token_logprobs"]
    assert [int(t) for _, t, _ in lps] == out["output_ids"]
    assert all(lp <= 0.0 for lp, _, _ in lps)
    # wire: base64 of int32 [N-1, num_hidden_layers, top_k] (no routed_experts_dtype in 0.5.x)
    n = len(prompt) + NEW_TOKENS
    wire = decode_wire(meta["routed_experts"], sglang.layout.num_hidden_layers, sglang.layout.top_k,
                       meta.get("routed_experts_dtype"))
    assert wire.shape == (n - 1, sglang.layout.num_hidden_layers, sglang.layout.top_k)
    rows = wire_to_moe(wire, sglang.layout)
    validate_rows(rows, sglang.layout, expected_rows=n - 1)  # ids in range, no duplicate in a row


def test_multi_turn_prefix_rows_and_start_len(sglang):
    p1 = sglang.prompts[1]
    r1 = sglang.generate(p1)
    rows1 = sglang.rows(r1)
    n1 = len(p1) + len(r1["output_ids"])
    assert rows1.shape[0] == n1 - 1

    p2 = p1 + r1["output_ids"] + sglang.prompts[2][:6]  # turn 2 = turn 1 + its answer + new tokens
    r2 = sglang.generate(p2)
    rows2 = sglang.rows(r2)
    cached = r2["meta_info"]["cached_tokens"]
    print(f"\n[sglang] turn 2: prompt {len(p2)}, cached_tokens {cached} (turn 1 had N-1 = {n1 - 1} fed tokens)")
    assert cached > 0
    assert rows2.shape[0] == len(p2) + NEW_TOKENS - 1
    np.testing.assert_array_equal(rows2[: n1 - 1], rows1, err_msg="prefix rows changed between turns")

    start = n1  # the first new token of turn 2 (any start in [0, prompt_tokens] is allowed)
    r3 = sglang.generate(p2, routed_experts_start_len=start)
    rows3 = sglang.rows(r3)
    assert r3["output_ids"] == r2["output_ids"]
    assert rows3.shape[0] == len(p2) + NEW_TOKENS - 1 - start
    np.testing.assert_array_equal(rows3, rows2[start:])


def test_start_len_beyond_prompt_is_rejected(sglang):
    p = sglang.prompts[0]

    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"input_ids": p, "sampling_params": {"max_new_tokens": 1}, "return_routed_experts": True,
                    "routed_experts_start_len": len(p) + 1}
            async with s.post(sglang.base_url + "/generate", json=body) as r:
                return r.status, await r.json()

    status, body = asyncio.run(go())
    assert status == 400 and "routed_experts_start_len" in body["error"]["message"]


def test_engine_client_against_sglang(sglang):
    p1 = sglang.prompts[3]

    async def go():
        async with EngineClient(sglang.base_url) as client:
            sp = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            o1 = await client.generate(GenerateRequest(input_ids=p1, sampling=sp, return_logprob=True,
                                                       return_routed_experts=True))
            p2 = p1 + o1.output_ids + sglang.prompts[0][:5]
            start = len(p1) + len(o1.output_ids)
            o2 = await client.generate(GenerateRequest(input_ids=p2, sampling=sp, return_logprob=True,
                                                       return_routed_experts=True, routed_experts_start_len=start))
            o2_full = await client.generate(GenerateRequest(input_ids=p2, sampling=sp, return_routed_experts=True))
            version = await client.update_weights_from_disk(str(sglang.ckpt))
            o3 = await client.generate(GenerateRequest(input_ids=p1, sampling=sp, return_routed_experts=True))
            return o1, o2, o2_full, start, version, o3

    o1, o2, o2_full, start, version, o3 = asyncio.run(go())
    layout = sglang.layout
    n1 = len(p1) + NEW_TOKENS
    assert len(o1.output_ids) == NEW_TOKENS and o1.completion_tokens == NEW_TOKENS
    assert o1.finish_reason["type"] == "length"
    assert len(o1.output_logprobs) == NEW_TOKENS and all(lp <= 0 for lp in o1.output_logprobs)
    assert o1.routed_experts.shape == (n1 - 1, layout.num_moe_layers, layout.top_k)
    assert o1.routed_experts.dtype == layout.dtype
    validate_rows(o1.routed_experts, layout)
    assert o1.weight_version == 0  # SGLang reports "default" until a versioned weight update
    assert o1.routed_versions.tolist() == [0] * (n1 - 1)

    assert o2.cached_tokens > 0
    assert o2.routed_experts_start_len == start
    assert o2.routed_experts.shape[0] == len(o2_full.routed_experts) - start
    np.testing.assert_array_equal(o2.routed_experts, o2_full.routed_experts[start:])
    np.testing.assert_array_equal(o2_full.routed_experts[: n1 - 1], o1.routed_experts)
    # same rows as the raw wire path
    raw = sglang.generate(p1)
    np.testing.assert_array_equal(sglang.rows(raw), o1.routed_experts)

    assert version == 1  # the client sends weight_version="1"; SGLang echoes it in meta_info
    assert o3.weight_version == 1 and set(o3.routed_versions.tolist()) == {1}
    np.testing.assert_array_equal(o3.routed_experts, o1.routed_experts)  # same weights reloaded


def _agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[R, L] bool: same expert *set* for this (token, layer) (SGLang's top-k order is not by score)."""
    return (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(-1)


def test_routing_agrees_with_our_model(sglang):
    # all prompts at once: SGLang batches prefill and decode across them
    outs = asyncio.run(_generate_many(sglang, sglang.prompts))
    model = load_pretrained(sglang.ckpt).eval()  # fp32
    prompt_hits, prompt_total, all_hits, all_total = 0, 0, 0, 0
    per_layer = np.zeros(sglang.layout.num_moe_layers)
    for prompt, out in zip(sglang.prompts, outs):
        theirs = sglang.rows(out)
        tokens = prompt + out["output_ids"]
        with torch.no_grad(), model.routing_replay.record():
            model(torch.tensor([tokens[:-1]]))
        ours = model.routing_replay.recorded.numpy().astype(np.int64)
        assert ours.shape == theirs.shape
        agree = _agreement(ours, theirs.astype(np.int64))
        prompt_hits += int(agree[: len(prompt)].sum())
        prompt_total += agree[: len(prompt)].size
        all_hits += int(agree.sum())
        all_total += agree.size
        per_layer += agree.sum(0)
    frac_prompt, frac_all = prompt_hits / prompt_total, all_hits / all_total
    print(f"\n[sglang] routing agreement, SGLang ({sglang.model_dtype()}, args {SERVER_ARGS}) vs agentrl fp32: "
          f"prompt rows {frac_prompt:.4f} ({prompt_hits}/{prompt_total} token-layer rows), "
          f"all rows {frac_all:.4f} ({all_hits}/{all_total}); "
          f"per MoE layer {np.round(per_layer / (all_total / len(per_layer)), 4).tolist()}")
    assert frac_prompt >= 0.9 and frac_all >= 0.9

    # SGLang against itself: rows computed during decode (turn 1, then served from the prefix cache)
    # vs the same tokens recomputed by a fresh prefill after /flush_cache
    prompt = sglang.prompts[0]
    first = sglang.generate(prompt)
    full = prompt + first["output_ids"]
    asyncio.run(sglang.flush_cache())
    again = sglang.generate(full[:-1], sampling_params={"temperature": 0, "max_new_tokens": 1})
    assert again["meta_info"]["cached_tokens"] == 0
    self_agree = _agreement(sglang.rows(first), sglang.rows(again)[: len(full) - 1]).mean()
    print(f"[sglang] decode-time rows vs fresh-prefill rows (same server): {self_agree:.4f}")
    assert self_agree >= 0.9


async def _generate_many(sglang: Sglang, prompts: list[list[int]]) -> list[dict]:
    body = {"sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
            "return_routed_experts": True}
    return list(await asyncio.gather(*(sglang.post("/generate", {**body, "input_ids": p}) for p in prompts)))

