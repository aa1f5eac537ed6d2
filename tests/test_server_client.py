"""The SGLang-compatible HTTP server and the async client, over real sockets on 127.0.0.1.

The server runs the real embedded `Engine` on a tiny random checkpoint. The few small aiohttp apps
below stand in for a *server* (to make it fail in controlled ways: 503s, 4xx, a missing field,
SGLang's own response shape), never for the engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from agentrl.engine import engine as engine_mod
from agentrl.engine.client import (
    EngineClient,
    EngineConnectionError,
    EngineHTTPError,
    EngineResponseError,
    RoutedExpertsMissingError,
    layout_from_model_info,
    sglang_generate_payload,
)
from agentrl.engine.engine import Engine
from agentrl.engine.server import create_app
from agentrl.engine.types import GenerateRequest, SamplingParams
from agentrl.model.checkpoint import init_model, load_pretrained
from agentrl.routing import RoutingLayout, decode_wire, encode_wire, moe_to_wire

PROMPT = [5, 17, 42, 99, 123, 7, 64, 200]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return init_model("tiny-moe", tmp_path_factory.mktemp("ckpt") / "tiny-moe", seed=0)


@pytest.fixture(scope="session")
def ckpt2(tmp_path_factory):
    return init_model("tiny-moe", tmp_path_factory.mktemp("ckpt2") / "tiny-moe", seed=1)


@pytest.fixture(scope="session")
def engine(ckpt):
    eng = Engine.from_pretrained(str(ckpt), dtype="float32", max_total_tokens=16384)
    eng.start()
    yield eng
    eng.shutdown()


@contextlib.asynccontextmanager
async def serving(app: web.Application):
    """Run `app` on 127.0.0.1:<free port>; yields the base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def run(coro):
    return asyncio.run(coro)


def greedy(n: int, prompt=PROMPT, **kw) -> GenerateRequest:
    return GenerateRequest(list(prompt), SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True), **kw)


async def post(base: str, path: str, body=None, *, data: bytes | None = None):
    async with aiohttp.ClientSession() as s:
        kw = {"data": data, "headers": {"Content-Type": "application/json"}} if data is not None else {"json": body}
        async with s.post(base + path, **kw) as r:
            text = await r.text()
            ctype = r.headers.get("Content-Type", "")
            return r.status, (json.loads(text) if "json" in ctype else text), ctype


async def get(base: str, path: str):
    async with aiohttp.ClientSession() as s:
        async with s.get(base + path) as r:
            text = await r.text()
            ctype = r.headers.get("Content-Type", "")
            return r.status, (json.loads(text) if "json" in ctype else text), ctype


# ------------------------------------------------------------------------------------ /generate
def test_generate_input_ids_round_trip(engine):
    async def main():
        async with serving(create_app(engine)) as base:
            body = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
                    "rid": "req-1"}
            status, out, _ = await post(base, "/generate", body)
            assert status == 200, out
            assert len(out["output_ids"]) == 6 and isinstance(out["text"], str)
            meta = out["meta_info"]
            assert meta["id"] == "req-1"
            assert meta["finish_reason"] == {"type": "length"}
            assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == 6
            assert meta["weight_version"] == str(engine.version) and meta["e2e_latency"] >= 0
            assert isinstance(meta["cached_tokens"], int)
            assert meta["output_token_versions"] == [engine.version] * 6
            for absent in ("output_token_logprobs", "routed_experts", "routed_experts_dtype"):
                assert absent not in meta
            assert out["text"] == engine.tokenizer.decode(out["output_ids"], skip_special_tokens=True)
            async with EngineClient(base) as client:
                res = await client.generate(greedy(6))
            assert res.output_ids == out["output_ids"]  # greedy: same tokens through the client
            assert res.prompt_tokens == len(PROMPT) and res.completion_tokens == 6
            assert res.weight_version == engine.version and res.output_versions == [engine.version] * 6
            assert res.routed_experts is None and res.output_logprobs is None

    run(main())


def test_generate_text(engine):
    text = "The answer is 12 + 30 ="
    async def main():
        async with serving(create_app(engine)) as base:
            status, out, _ = await post(base, "/generate", {
                "text": text, "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}})
            assert status == 200, out
            ids = engine.tokenizer.encode(text)
            assert out["meta_info"]["prompt_tokens"] == len(ids)
            direct = await engine.generate(greedy(4, prompt=ids))
            assert out["output_ids"] == direct.output_ids

    run(main())


def test_text_without_tokenizer_is_400(ckpt):
    eng = Engine(load_pretrained(ckpt), engine_mod.EngineConfig(dtype="float32", max_total_tokens=1024),
                 tokenizer=None, model_path=str(ckpt)).start()
    try:
        async def main():
            async with serving(create_app(eng)) as base:
                status, out, _ = await post(base, "/generate", {"text": "hi"})
                assert status == 400 and "tokenizer" in out["error"]["message"]
                status, out, _ = await post(base, "/generate", {
                    "input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
                assert status == 200 and out["text"] == ""
        run(main())
    finally:
        eng.shutdown()


def test_batch_input(engine):
    prompts = [PROMPT, PROMPT[:3], [9, 8, 7, 6, 5]]
    lens = [3, 5, 2]
    async def main():
        async with serving(create_app(engine)) as base:
            body = {"input_ids": prompts,
                    "sampling_params": [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in lens],
                    "return_logprob": True}
            status, outs, _ = await post(base, "/generate", body)
            assert status == 200, outs
            assert isinstance(outs, list) and len(outs) == 3
            for p, n, o in zip(prompts, lens, outs):
                direct = await engine.generate(greedy(n, prompt=p))
                assert o["output_ids"] == direct.output_ids
                assert o["meta_info"]["prompt_tokens"] == len(p)
                assert len(o["meta_info"]["output_token_logprobs"]) == n
            # a text batch with one shared sampling_params
            status, outs, _ = await post(base, "/generate", {
                "text": ["hello", "world wide"], "sampling_params": {"temperature": 0, "max_new_tokens": 2}})
            assert status == 200 and [len(o["output_ids"]) <= 2 for o in outs] == [True, True]
            assert [o["meta_info"]["prompt_tokens"] for o in outs] == [
                len(engine.tokenizer.encode("hello")), len(engine.tokenizer.encode("world wide"))]

    run(main())


def test_logprobs_present_and_finite(engine):
    async def main():
        async with serving(create_app(engine)) as base:
            status, out, _ = await post(base, "/generate", {
                "input_ids": PROMPT, "return_logprob": True,
                "sampling_params": {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True, "sampling_seed": 3}})
            assert status == 200, out
            lps = out["meta_info"]["output_token_logprobs"]
            assert [t for _, t, _ in lps] == out["output_ids"]
            assert all(x is None for _, _, x in lps)
            assert all(math.isfinite(lp) and lp <= 0 for lp, _, _ in lps)
            async with EngineClient(base) as client:
                req = GenerateRequest(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True, seed=3),
                                      return_logprob=True)
                res = await client.generate(req)
            assert res.output_ids == out["output_ids"]  # same seed -> same sample (sampling_seed mapped)
            assert res.output_logprobs == pytest.approx([lp for lp, _, _ in lps])

    run(main())


def test_routed_experts_match_the_engine(engine):
    layout = engine.layout
    async def main():
        async with serving(create_app(engine)) as base:
            async with EngineClient(base) as client:
                res = await client.generate(greedy(7, return_routed_experts=True))
            direct = await engine.generate(greedy(7, return_routed_experts=True))
            n = len(PROMPT) + 7
            assert res.routed_experts.shape == (n - 1, layout.num_moe_layers, layout.top_k)
            assert res.routed_experts.dtype == layout.dtype
            assert res.output_ids == direct.output_ids
            np.testing.assert_array_equal(res.routed_experts, direct.routed_experts)
            np.testing.assert_array_equal(res.routed_versions, np.asarray(direct.routed_versions, dtype=np.int64))
            assert res.routed_versions.dtype == np.int64 and res.routed_experts_start_len == 0

    run(main())


def test_routed_experts_start_len_returns_the_tail(engine):
    async def main():
        async with serving(create_app(engine)) as base:
            async with EngineClient(base) as client:
                full = await client.generate(greedy(5, return_routed_experts=True))
                tail = await client.generate(greedy(5, return_routed_experts=True, routed_experts_start_len=6))
            n = len(PROMPT) + 5
            assert len(full.routed_experts) == n - 1 and len(tail.routed_experts) == n - 1 - 6
            np.testing.assert_array_equal(tail.routed_experts, full.routed_experts[6:])
            assert tail.routed_experts_start_len == 6
            status, out, _ = await post(base, "/generate", {
                "input_ids": PROMPT, "return_routed_experts": True, "routed_experts_start_len": len(PROMPT) + 1,
                "sampling_params": {"max_new_tokens": 2}})
            assert status == 400 and "routed_experts_start_len" in out["error"]["message"]

    run(main())


def test_wire_dense_layers_are_zero(tmp_path):
    ck = init_model("tiny-moe", tmp_path / "sparse2", seed=0, decoder_sparse_step=2)
    eng = Engine.from_pretrained(str(ck), dtype="float32", max_total_tokens=1024).start()
    try:
        layout = eng.layout
        assert layout.moe_layers == (1, 3) and layout.num_hidden_layers == 4

        async def main():
            async with serving(create_app(eng)) as base:
                status, out, _ = await post(base, "/generate", {
                    "input_ids": PROMPT, "return_routed_experts": True,
                    "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}})
                assert status == 200, out
                meta = out["meta_info"]
                assert "routed_experts_dtype" not in meta
                raw = base64.b64decode(meta["routed_experts"])
                wire = np.frombuffer(raw, dtype="<i4").reshape(-1, 4, layout.top_k)
                assert wire.shape[0] == len(PROMPT) + 4 - 1
                assert (wire[:, [0, 2]] == 0).all()  # dense layers
                moe = wire[:, [1, 3]]
                assert (moe >= 0).all() and (moe < layout.num_experts).all()
                assert (np.sort(moe, -1)[..., 1:] != np.sort(moe, -1)[..., :-1]).all()  # no duplicates
                vers = np.frombuffer(base64.b64decode(meta["routed_experts_versions"]), dtype="<i4")
                assert vers.tolist() == [0] * wire.shape[0]
                async with EngineClient(base) as client:  # layout discovered from /get_model_info
                    res = await client.generate(greedy(4, return_routed_experts=True))
                    assert (await client.get_layout()) == layout
                np.testing.assert_array_equal(res.routed_experts, moe.astype(np.uint8))

        run(main())
    finally:
        eng.shutdown()


# --------------------------------------------------------------------------------------- errors
def test_malformed_json_is_400_and_server_keeps_serving(engine):
    async def main():
        async with serving(create_app(engine)) as base:
            status, out, _ = await post(base, "/generate", data=b'{"input_ids": [1, 2,')
            assert status == 400 and "malformed JSON" in out["error"]["message"] and out["error"]["code"] == 400
            status, text, _ = await get(base, "/health")
            assert status == 200 and text == "OK"
            status, out, _ = await post(base, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
            assert status == 200

    run(main())


@pytest.mark.parametrize("body, needle", [
    ({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "frobnicate": 1}}, "frobnicate"),
    ({"input_ids": PROMPT, "sampling_params": {"min_p": 0.5}}, "min_p"),
    ({"input_ids": PROMPT, "sampling_params": {"temperature": "hot"}}, "temperature"),
    ({"input_ids": PROMPT, "sampling_params": {"top_p": 0}}, "top_p"),
    ({"input_ids": "abc"}, "input_ids"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [1, "x"]}, "input_ids"),
    ({"input_ids": [1, 2, 10**9]}, "out of range"),
    ({"sampling_params": {}}, "text"),
    ({"text": "a", "input_ids": [1]}, "exactly one"),
    ({"input_ids": PROMPT, "return_logprob": "yes"}, "return_logprob"),
    ({"input_ids": PROMPT, "sampling_params": [{}]}, "sampling_params"),
    ({"input_ids": [PROMPT, PROMPT], "sampling_params": [{}]}, "sampling_params"),
    ({"input_ids": PROMPT, "rid": 7}, "rid"),
    ({"input_ids": PROMPT, "bogus_field": 1}, "bogus_field"),
    ({"input_ids": PROMPT, "stream": True}, "not supported"),
    ({"input_ids": list(range(1, 300)) * 16, "sampling_params": {"max_new_tokens": 1}}, "context"),
    ([1, 2, 3], "JSON object"),
])
def test_bad_requests_are_400(engine, body, needle):
    async def main():
        async with serving(create_app(engine)) as base:
            status, out, ctype = await post(base, "/generate", body)
            assert status == 400, out
            assert "application/json" in ctype and out["error"]["code"] == 400
            assert needle in out["error"]["message"], out

    run(main())


def test_unknown_sampling_key_via_client_is_not_retried(engine):
    async def main():
        async with serving(create_app(engine)) as base:
            async with EngineClient(base, retries=3, backoff=0.01) as client:
                # a request the client builds cannot carry unknown keys; send one raw through the transport
                with pytest.raises(EngineHTTPError) as ei:
                    await client._request("POST", "/generate", {"input_ids": PROMPT, "sampling_params": {"wat": 1}})
                assert ei.value.status == 400 and "wat" in ei.value.message
                assert client.attempts == 1

    run(main())


def test_oversized_body_is_413(engine):
    async def main():
        async with serving(create_app(engine, max_request_bytes=2000)) as base:
            status, out, _ = await post(base, "/generate", {"input_ids": [1] * 2000})
            assert status == 413 and out["error"]["code"] == 413 and "limit" in out["error"]["message"]
            status, out, _ = await post(base, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
            assert status == 200

    run(main())


def test_batch_over_max_batch_is_400(engine):
    async def main():
        async with serving(create_app(engine, max_batch=2)) as base:
            status, out, _ = await post(base, "/generate", {"input_ids": [PROMPT] * 3})
            assert status == 400 and "max_batch" in out["error"]["message"]

    run(main())


def test_engine_exception_is_500_and_server_keeps_serving(engine, monkeypatch):
    real = engine_mod.paged_forward
    calls = {"n": 0}

    def failing_forward(*a, **kw):  # the real engine's step fails once, as an engine bug would
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in forward")
        return real(*a, **kw)

    monkeypatch.setattr(engine_mod, "paged_forward", failing_forward)

    async def main():
        async with serving(create_app(engine)) as base:
            status, out, _ = await post(base, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
            assert status == 500 and "boom in forward" in out["error"]["message"] and out["error"]["code"] == 500
            async with EngineClient(base, retries=3, backoff=0.01) as client:
                assert await client.health()
                res = await client.generate(greedy(3))
                assert len(res.output_ids) == 3

    run(main())


# ------------------------------------------------------------------------------ other endpoints
def test_model_info_and_server_info(engine, ckpt):
    async def main():
        async with serving(create_app(engine)) as base:
            async with EngineClient(base) as client:
                info = await client.model_info()
                assert info["model_path"] == str(ckpt) and info["is_generation"] is True
                assert info["weight_version"] == str(engine.version)
                assert info["agentrl"] == {"num_hidden_layers": 4, "moe_layers": [0, 1, 2, 3], "num_experts": 8,
                                           "top_k": 2, "routed_experts_enabled": True}
                assert layout_from_model_info(info) == engine.layout
                sinfo = await client.server_info()
                assert sinfo["enable_return_routed_experts"] is True
                assert sinfo["model_path"] == str(ckpt) and "version" in sinfo
                for k in ("prefilled_tokens", "cached_tokens", "running", "waiting", "free_slots"):
                    assert k in sinfo
                assert await client.health()
            status, text, _ = await get(base, "/health_generate")
            assert status == 200

    run(main())


def test_flush_cache(engine):
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    async def main():
        async with serving(create_app(engine)) as base:
            status, text, ctype = await post(base, "/flush_cache")
            assert status == 200 and ctype.startswith("text/plain") and "flushed" in text.lower()
            async with EngineClient(base) as client:
                first = await client.generate(greedy(3, prompt=prompt))
                again = await client.generate(greedy(3, prompt=prompt))
                assert first.cached_tokens == 0 and again.cached_tokens > 0
                await client.flush_cache()
                after = await client.generate(greedy(3, prompt=prompt))
                assert after.cached_tokens == 0 and after.output_ids == first.output_ids

    run(main())


def test_abort_request_endpoint(engine):
    async def main():
        async with serving(create_app(engine)) as base:
            status, _, _ = await post(base, "/abort_request", {"rid": "no-such-request"})
            assert status == 200
            status, out, _ = await post(base, "/abort_request", {})
            assert status == 400 and "rid" in out["error"]["message"]
            async with EngineClient(base) as client:
                req = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=3000, ignore_eos=True),
                                      return_routed_experts=True)
                task = asyncio.ensure_future(client.generate(req))
                await asyncio.sleep(0.3)
                await client.abort(req.rid)
                res = await asyncio.wait_for(task, 30)
                assert res.finish_reason["type"] == "abort" and len(res.output_ids) < 3000

    run(main())


def test_update_weights_from_disk_bumps_weight_version(ckpt, ckpt2):
    eng = Engine.from_pretrained(str(ckpt), dtype="float32", max_total_tokens=1024).start()
    try:
        async def main():
            async with serving(create_app(eng)) as base:
                async with EngineClient(base) as client:
                    before = await client.generate(greedy(4, return_routed_experts=True))
                    assert before.weight_version == 0 and set(before.routed_versions.tolist()) == {0}
                    v = await client.update_weights_from_disk(str(ckpt2))
                    assert v == 1 and eng.version == 1
                    assert (await client.model_info())["weight_version"] == "1"
                    after = await client.generate(greedy(4, return_routed_experts=True))
                    assert after.weight_version == 1 and after.output_versions == [1] * 4
                    assert set(after.routed_versions.tolist()) == {1}
                    assert after.cached_tokens == 0  # the update flushed the prefix cache
                    with pytest.raises(EngineHTTPError) as ei:
                        await client.update_weights_from_disk(str(ckpt2) + "-missing")
                    assert ei.value.status == 400
                    assert eng.version == 1
                status, out, _ = await post(base, "/update_weights_from_disk",
                                            {"model_path": str(ckpt), "abort_all_requests": True, "load_format": "auto"})
                assert status == 200 and out["success"] is True and out["num_paused_requests"] == 0
                assert out["weight_version"] == "2"
                status, out, _ = await post(base, "/update_weights_from_disk", {})
                assert status == 400

        run(main())
    finally:
        eng.shutdown()


def test_64_concurrent_requests_through_the_client(engine):
    async def main():
        async with serving(create_app(engine)) as base:
            async with EngineClient(base) as client:
                reqs = [GenerateRequest([1 + i % 50, 2, 3, 4 + i], SamplingParams(max_new_tokens=1 + i % 9, ignore_eos=True,
                                                                                  seed=i),
                                        return_logprob=True, return_routed_experts=(i % 2 == 0)) for i in range(64)]
                outs = await client.generate_batch(reqs)
            for req, out in zip(reqs, outs):
                n = req.sampling.max_new_tokens
                assert out.rid == req.rid
                assert len(out.output_ids) == n and out.completion_tokens == n and len(out.output_logprobs) == n
                if req.return_routed_experts:
                    assert out.routed_experts.shape == (4 + n - 1, 4, 2)
                else:
                    assert out.routed_experts is None

    run(main())


# --------------------------------------------------------------- client against other servers
def _sglang_like_response(ids_in, ids_out, wire_rows=None, weight_version="default", **meta_extra):
    meta = {"id": "x", "finish_reason": {"type": "length", "length": len(ids_out)}, "prompt_tokens": len(ids_in),
            "completion_tokens": len(ids_out), "cached_tokens": 0, "weight_version": weight_version,
            "e2e_latency": 0.01, "output_token_logprobs": [[-0.5, t, None] for t in ids_out], **meta_extra}
    if wire_rows is not None:
        meta["routed_experts"] = encode_wire(wire_rows)
    return {"text": "", "output_ids": ids_out, "meta_info": meta}


def test_client_retries_503_then_succeeds():
    hits = {"n": 0}

    async def gen(request):
        hits["n"] += 1
        body = await request.json()
        if hits["n"] <= 2:
            return web.Response(status=503, text="warming up")
        return web.json_response(_sglang_like_response(body["input_ids"], [1, 2, 3]))

    async def main():
        app = web.Application()
        app.router.add_post("/generate", gen)
        async with serving(app) as base:
            async with EngineClient(base, retries=3, backoff=0.01) as client:
                req = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=3), return_logprob=True)
                out = await client.generate(req)
                assert out.output_ids == [1, 2, 3] and out.output_logprobs == [-0.5] * 3
                assert hits["n"] == 3 and client.attempts == 3
            hits["n"] = -10  # always 503 now: retries exhausted
            async with EngineClient(base, retries=2, backoff=0.01) as client:
                with pytest.raises(EngineConnectionError, match="after 3 attempts.*503"):
                    await client.generate(GenerateRequest(PROMPT))
                assert client.attempts == 3

    run(main())


def test_client_does_not_retry_4xx():
    hits = {"n": 0}

    async def gen(request):
        hits["n"] += 1
        if hits["n"] == 2:  # SGLang's sampling-params parser answers with a plain string error
            return web.json_response({"error": "unknown field `wat`, expected one of `max_new_tokens`"}, status=400)
        return web.json_response({"error": {"message": "The input (5000 tokens) is longer than the model's context"}},
                                 status=400)

    async def main():
        app = web.Application()
        app.router.add_post("/generate", gen)
        async with serving(app) as base:
            async with EngineClient(base, retries=3, backoff=0.01) as client:
                with pytest.raises(EngineHTTPError) as ei:
                    await client.generate(GenerateRequest(PROMPT))
                assert ei.value.status == 400 and "longer than the model's context" in ei.value.message
                assert hits["n"] == 1
                with pytest.raises(EngineHTTPError, match="unknown field `wat`"):
                    await client.generate(GenerateRequest(PROMPT))
                assert hits["n"] == 2

    run(main())


def test_client_connection_refused_and_timeout():
    aborted = []

    async def slow(request):
        await asyncio.sleep(2)
        return web.json_response({})

    async def abort(request):
        aborted.append((await request.json())["rid"])
        return web.Response()

    async def main():
        # nothing listens on this port (bound then closed)
        app = web.Application()
        async with serving(app) as dead:
            pass
        async with EngineClient(dead, retries=2, backoff=0.01) as client:
            with pytest.raises(EngineConnectionError, match="3 attempts"):
                await client.generate(GenerateRequest(PROMPT))
            assert not await client.health()
            with pytest.raises(TimeoutError):
                await client.wait_ready(0.3)
        app = web.Application()
        app.router.add_post("/generate", slow)
        app.router.add_post("/abort_request", abort)
        async with serving(app) as base:
            async with EngineClient(base, timeout=0.2, retries=1, backoff=0.01) as client:
                req = GenerateRequest(PROMPT)
                t0 = time.monotonic()
                with pytest.raises(EngineConnectionError, match="timed out"):
                    await client.generate(req)
                assert time.monotonic() - t0 < 1.5
                assert aborted == [req.rid, req.rid]  # each timed-out attempt is aborted on the server

    run(main())


def test_missing_routed_experts_is_a_clear_error():
    async def gen(request):
        body = await request.json()
        return web.json_response(_sglang_like_response(body["input_ids"], [4, 5]))  # no routed_experts

    async def main():
        app = web.Application()
        app.router.add_post("/generate", gen)
        async with serving(app) as base:
            layout = RoutingLayout(4, (0, 1, 2, 3), 8, 2)
            async with EngineClient(base, layout=layout) as client:
                with pytest.raises(RoutedExpertsMissingError, match="--enable-return-routed-experts"):
                    await client.generate(GenerateRequest(PROMPT, return_routed_experts=True))
                out = await client.generate(GenerateRequest(PROMPT))  # not asked for: fine
                assert out.routed_experts is None

    run(main())


def test_client_against_an_sglang_shaped_server(tmp_path):
    """Real SGLang's shape: no agentrl block (layout from config.json at model_path), no per-row versions,
    weight_version a string, rows [start_len, N-1) on the wire with all layers."""
    ck = init_model("tiny-moe", tmp_path / "m", seed=0, decoder_sparse_step=2)
    layout = RoutingLayout(4, (1, 3), 8, 2)
    rng = np.random.default_rng(0)
    state = {"weight_version": "default", "ignore_start": False, "last_body": None}

    def rows(n):
        moe = np.stack([rng.permutation(8)[:2] for _ in range(n * 2)]).reshape(n, 2, 2).astype(np.uint8)
        return moe

    async def gen(request):
        body = await request.json()
        state["last_body"] = body
        out_ids = [3] * body["sampling_params"]["max_new_tokens"]
        n = len(body["input_ids"]) + len(out_ids)
        start = 0 if state["ignore_start"] else body.get("routed_experts_start_len", 0)
        state["moe"] = rows(n - 1)
        wire = moe_to_wire(state["moe"], layout)[start:]
        extra = {"weight_versions": state["segments"]} if "segments" in state else {}
        return web.json_response(_sglang_like_response(body["input_ids"], out_ids, wire,
                                                       weight_version=state["weight_version"], **extra))

    async def model_info(request):
        return web.json_response({"model_path": str(ck), "tokenizer_path": str(ck), "is_generation": True,
                                  "preferred_sampling_params": None, "weight_version": state["weight_version"]})

    async def update(request):
        body = await request.json()
        state["update_body"] = body
        if body.get("weight_version") is not None:
            state["weight_version"] = body["weight_version"]
        return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                                  "num_paused_requests": 0})

    async def main():
        app = web.Application()
        app.router.add_post("/generate", gen)
        app.router.add_get("/get_model_info", model_info)
        app.router.add_post("/update_weights_from_disk", update)
        async with serving(app) as base:
            async with EngineClient(base) as client:
                req = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=3, seed=5), return_routed_experts=True)
                out = await client.generate(req)
                assert state["last_body"] == sglang_generate_payload(req)
                assert (await client.get_layout()) == layout
                np.testing.assert_array_equal(out.routed_experts, state["moe"])
                assert out.weight_version == 0 and out.routed_versions.tolist() == [0] * (len(PROMPT) + 2)
                # incremental rows
                req = GenerateRequest(PROMPT, SamplingParams(max_new_tokens=3), return_routed_experts=True,
                                      routed_experts_start_len=5)
                out = await client.generate(req)
                np.testing.assert_array_equal(out.routed_experts, state["moe"][5:])
                # a server that ignores routed_experts_start_len (sends every row): the client keeps the tail
                state["ignore_start"] = True
                out = await client.generate(req)
                np.testing.assert_array_equal(out.routed_experts, state["moe"][5:])
                # weight updates: the client sends weight_version so SGLang reports integers from then on
                assert await client.update_weights_from_disk("/some/ckpt", abort_in_flight=True) == 1
                assert state["update_body"] == {"model_path": "/some/ckpt", "abort_all_requests": True,
                                                "weight_version": "1"}
                out = await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2),
                                                            return_routed_experts=True))
                assert out.weight_version == 1 and set(out.routed_versions.tolist()) == {1}
                assert out.output_versions == [1, 1]
                # newer SGLang: per-token weight_versions segments (an update landed after token 0)
                state["segments"] = [{"version": "1", "start": 0, "end": 1}, {"version": "2", "start": 1, "end": 3}]
                state["weight_version"] = "2"
                out = await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=3),
                                                            return_routed_experts=True))
                assert out.weight_version == 2 and out.output_versions == [1, 2, 2]
                assert out.routed_versions.tolist() == [1] * len(PROMPT) + [2, 2]  # row r made token r+1

    run(main())


def test_client_rejects_a_wrong_row_count():
    layout = RoutingLayout(4, (0, 1, 2, 3), 8, 2)

    async def gen(request):
        body = await request.json()
        n = len(body["input_ids"]) + 2
        wire = moe_to_wire(np.tile(np.array([0, 1], dtype=np.uint8), (n - 3, 4, 1)), layout)  # 2 rows short
        return web.json_response(_sglang_like_response(body["input_ids"], [1, 2], wire))

    async def main():
        app = web.Application()
        app.router.add_post("/generate", gen)
        async with serving(app) as base:
            async with EngineClient(base, layout=layout) as client:
                with pytest.raises(EngineResponseError, match="expected 9 = N-1-start_len"):
                    await client.generate(GenerateRequest(PROMPT, SamplingParams(max_new_tokens=2),
                                                          return_routed_experts=True))

    run(main())


def test_sglang_generate_payload():
    req = GenerateRequest([1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5,
                                                    stop=["\n"], stop_token_ids=[2], seed=11),
                          return_logprob=True, return_routed_experts=True, routed_experts_start_len=2, rid="abc")
    assert sglang_generate_payload(req) == {
        "input_ids": [1, 2, 3],
        "sampling_params": {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 5, "ignore_eos": False,
                            "stop": ["\n"], "stop_token_ids": [2], "sampling_seed": 11},
        "return_logprob": True, "rid": "abc", "stream": False,
        "return_routed_experts": True, "routed_experts_start_len": 2,
    }
    plain = sglang_generate_payload(GenerateRequest([4], rid="r"))
    assert plain == {"input_ids": [4], "rid": "r", "stream": False, "return_logprob": False,
                     "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 128,
                                         "ignore_eos": False}}
    json.dumps(plain)
    assert decode_wire(encode_wire(np.zeros((2, 4, 2), np.int32)), 4, 2).shape == (2, 4, 2)
