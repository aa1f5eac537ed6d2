"""SGLang-compatible HTTP server for the embedded engine (aiohttp).

Owns: the HTTP surface of an `Engine` -- request parsing and validation, the JSON response shape,
error responses and the wire form of routing rows. Speaks SGLang's native API (0.5.x) so the same
client (`agentrl.engine.client.EngineClient`) and tools work against this server and a real
`sglang.launch_server`:

* ``POST /generate`` -- ``text`` | ``input_ids`` (single or batch), ``sampling_params``,
  ``return_logprob``, ``return_routed_experts``, ``routed_experts_start_len``, ``rid``;
  ``stream: true`` is refused (400). Response ``{"text", "output_ids", "meta_info"}`` (a list for a
  batch). ``meta_info["routed_experts"]`` is base64 of little-endian int32 ``[rows, num_hidden_layers,
  top_k]`` with dense layers 0 (Contract 1), rows ``[routed_experts_start_len, N-1)``. agentrl
  extensions (ignored by SGLang clients): ``output_token_versions`` (list[int], policy version per
  output token) and ``routed_experts_versions`` (base64 int32 LE, one version per row).
* ``GET /health``, ``GET /health_generate``, ``GET /get_model_info`` (plus an ``agentrl`` block with
  the routing layout), ``GET /get_server_info``, ``POST|GET /flush_cache`` (plain text, as SGLang),
  ``POST /update_weights_from_disk``, ``POST /abort_request``.
* ``POST /v1/chat/completions`` and ``GET /v1/models``: the OpenAI-compatible chat API with native
  tool calls (agentrl.engine.openai_api), as SGLang also serves.
* Errors are ``{"error": {"message", "code"}}`` with a 4xx status for a bad request (malformed JSON,
  wrong types, unknown sampling keys, too long a prompt, body over ``max_request_bytes`` -> 413,
  batch over ``max_batch``) and 500 for an unexpected engine exception; the server keeps serving.

Does not own: scheduling, batching, caching or weights (the engine does that).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from typing import Any

import numpy as np
from aiohttp import web

from agentrl.engine.openai_api import add_routes as add_openai_routes
from agentrl.engine.types import GenerateOutput, GenerateRequest, RequestError, SamplingParams
from agentrl.routing import encode_wire, moe_to_wire

__all__ = ["create_app", "serve", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_MAX_BATCH"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BATCH = 1024

_ENGINE_KEY = web.AppKey("agentrl_engine", object)
_CFG_KEY = web.AppKey("agentrl_server_cfg", dict)

# /generate fields we accept. SGLang has many more; the ones below are accepted only at their
# neutral value (anything else is a clear 400 rather than a silently ignored option).
_GENERATE_FIELDS = {
    "text", "input_ids", "sampling_params", "return_logprob", "return_routed_experts",
    "routed_experts_start_len", "rid", "stream",
}
_NEUTRAL_FIELDS: dict[str, tuple[Any, ...]] = {
    "logprob_start_len": (None, -1),
    "top_logprobs_num": (None, 0),
    "token_ids_logprob": (None,),
    "return_text_in_logprobs": (None, False),
    "return_hidden_states": (None, False),
    "lora_path": (None,),
    "log_metrics": (None, True, False),
    "image_data": (None,),
    "session_params": (None,),
    "custom_logit_processor": (None,),
    "bootstrap_host": (None,),
    "bootstrap_port": (None,),
    "bootstrap_room": (None,),
    "data_parallel_rank": (None,),
    "priority": (None, 0),
}


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


@web.middleware
async def _errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except _BadRequest as e:
        return _error(e.message, e.status)
    except RequestError as e:
        return _error(str(e), 400)
    except web.HTTPRequestEntityTooLarge as e:
        return _error(f"request body too large: {e.text}", 413)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.reason if e.text is None else f"{e.reason}: {e.text}".rstrip(": "), e.status)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # an engine bug: report it, keep serving
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(f"internal error: {type(e).__name__}: {e}", 500)


# ------------------------------------------------------------------------------------------ parsing
async def _read_json(request: web.Request, *, allow_empty: bool = False) -> Any:
    cfg = request.app[_CFG_KEY]
    limit = cfg["max_request_bytes"]
    if request.content_length is not None and request.content_length > limit:
        raise _BadRequest(f"request body of {request.content_length} bytes exceeds the limit of {limit} bytes", 413)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _BadRequest(f"request body exceeds the limit of {limit} bytes", 413) from None
    if len(raw) > limit:
        raise _BadRequest(f"request body of {len(raw)} bytes exceeds the limit of {limit} bytes", 413)
    if not raw.strip():
        if allow_empty:
            return {}
        raise _BadRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadRequest(f"malformed JSON body: {e}") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bool_field(body: dict, key: str, default: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, list):
        if not all(isinstance(b, bool) for b in v):
            raise _BadRequest(f"{key} must be a bool or a list of bools")
        return v
    if not isinstance(v, bool):
        raise _BadRequest(f"{key} must be a bool, got {type(v).__name__}")
    return v


def _per_item(value: Any, n: int, key: str, batched: bool) -> list[Any]:
    """A field that may be given once for the whole batch or as a list with one entry per item."""
    if batched and isinstance(value, list):
        if len(value) != n:
            raise _BadRequest(f"{key} has {len(value)} entries for a batch of {n}")
        return value
    if not batched and isinstance(value, list):
        raise _BadRequest(f"{key} must not be a list for a single request")
    return [value] * n


def _sampling(d: Any) -> SamplingParams:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise _BadRequest(f"sampling_params must be an object, got {type(d).__name__}")
    d = dict(d)
    if "sampling_seed" in d:  # SGLang's name for the per-request seed
        seed = d.pop("sampling_seed")
        if d.get("seed") is not None and seed is not None and d["seed"] != seed:
            raise _BadRequest("sampling_params has both seed and sampling_seed with different values")
        if seed is not None:
            d["seed"] = seed
    for k in ("temperature", "top_p"):
        if k in d and d[k] is not None and (isinstance(d[k], bool) or not isinstance(d[k], (int, float))):
            raise _BadRequest(f"sampling param {k} must be a number, got {d[k]!r}")
    for k in ("top_k", "max_new_tokens", "seed"):
        if k in d and d[k] is not None and not _is_int(d[k]):
            raise _BadRequest(f"sampling param {k} must be an integer, got {d[k]!r}")
    if "stop" in d and d["stop"] is not None:
        s = d["stop"]
        if not (isinstance(s, str) or (isinstance(s, list) and all(isinstance(x, str) for x in s))):
            raise _BadRequest(f"sampling param stop must be a string or a list of strings, got {s!r}")
    if "stop_token_ids" in d and d["stop_token_ids"] is not None:
        s = d["stop_token_ids"]
        if not (isinstance(s, list) and all(_is_int(x) for x in s)):
            raise _BadRequest(f"sampling param stop_token_ids must be a list of integers, got {s!r}")
    for k in ("top_k", "temperature", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos"):
        if k in d and d[k] is None:
            d.pop(k)  # SGLang treats null as "use the default"
    if d.get("top_k") is not None and d["top_k"] >= (1 << 30):
        d["top_k"] = -1  # SGLang's TOP_K_ALL
    return SamplingParams.from_dict(d)


def _parse_generate(body: Any, engine: Any, max_batch: int) -> tuple[list[GenerateRequest], bool]:
    """Body of /generate -> requests (in order) and whether the input was a batch."""
    if not isinstance(body, dict):
        raise _BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    for k, v in body.items():
        if k in _GENERATE_FIELDS:
            continue
        if k in _NEUTRAL_FIELDS:
            if v not in _NEUTRAL_FIELDS[k]:
                raise _BadRequest(f"field {k}={v!r} is not supported by this server")
            continue
        raise _BadRequest(f"unknown field {k!r}")
    if body.get("stream"):
        raise _BadRequest("stream=true is not supported by this server (send stream=false)")

    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise _BadRequest("exactly one of 'text' or 'input_ids' must be given")
    if text is not None:
        tok = getattr(engine, "tokenizer", None)
        if tok is None:
            raise _BadRequest("this model has no tokenizer: send input_ids instead of text")
        if isinstance(text, str):
            batched, texts = False, [text]
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            batched, texts = True, text
        else:
            raise _BadRequest("text must be a string or a non-empty list of strings")
        if len(texts) > max_batch:
            raise _BadRequest(f"batch of {len(texts)} exceeds max_batch={max_batch}")
        prompts = [list(tok.encode(t)) for t in texts]
    else:
        if isinstance(ids, list) and ids and all(_is_int(t) for t in ids):
            batched, prompts = False, [ids]
        elif isinstance(ids, list) and ids and all(isinstance(p, list) for p in ids):
            batched, prompts = True, ids
            if len(prompts) > max_batch:
                raise _BadRequest(f"batch of {len(prompts)} exceeds max_batch={max_batch}")
            for i, p in enumerate(prompts):
                if not (p and all(_is_int(t) for t in p)):
                    raise _BadRequest(f"input_ids[{i}] must be a non-empty list of integers")
        else:
            raise _BadRequest("input_ids must be a non-empty list of integers or a list of such lists")
    vocab = getattr(getattr(engine, "config", None), "vocab_size", None)
    for i, p in enumerate(prompts):
        if not p:
            raise _BadRequest(f"prompt {i} is empty after tokenization")
        bad = [t for t in p if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise _BadRequest(f"input_ids of prompt {i} has token ids out of range [0, {vocab}): {bad[:5]}")

    n = len(prompts)
    sps = _per_item(body.get("sampling_params"), n, "sampling_params", batched)
    logprob = _per_item(_bool_field(body, "return_logprob"), n, "return_logprob", batched)
    routed = _per_item(_bool_field(body, "return_routed_experts"), n, "return_routed_experts", batched)
    starts = _per_item(body.get("routed_experts_start_len", 0), n, "routed_experts_start_len", batched)
    rids = _per_item(body.get("rid"), n, "rid", batched)
    if any(routed) and getattr(engine, "layout", None) is None:
        raise _BadRequest("return_routed_experts: this model has no MoE layers, so there are no routing rows")
    reqs = []
    for i in range(n):
        start = 0 if starts[i] is None else starts[i]
        if not _is_int(start) or start < 0:
            raise _BadRequest(f"routed_experts_start_len must be a non-negative integer, got {start!r}")
        if start > len(prompts[i]):
            raise _BadRequest(
                f"routed_experts_start_len={start} exceeds the prompt length {len(prompts[i])}"
            )
        rid = rids[i]
        if rid is not None and not isinstance(rid, str):
            raise _BadRequest(f"rid must be a string, got {type(rid).__name__}")
        kw = {} if rid is None else {"rid": rid}
        reqs.append(GenerateRequest(
            input_ids=[int(t) for t in prompts[i]],
            sampling=_sampling(sps[i]),
            return_logprob=bool(logprob[i]),
            return_routed_experts=bool(routed[i]),
            routed_experts_start_len=int(start),
            **kw,
        ))
    if len({r.rid for r in reqs}) != len(reqs):
        raise _BadRequest("rid values in a batch must be unique")
    return reqs, batched


# ---------------------------------------------------------------------------------------- responses
def _versions_b64(versions: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(versions, dtype="<i4").tobytes()).decode("ascii")


def _response(engine: Any, req: GenerateRequest, out: GenerateOutput, latency: float) -> dict:
    text = out.text
    if text is None:
        tok = getattr(engine, "tokenizer", None)
        text = tok.decode(out.output_ids, skip_special_tokens=True) if tok is not None else ""
    meta: dict[str, Any] = {
        "id": out.rid,
        "finish_reason": out.finish_reason,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
        "weight_version": str(out.weight_version),
        "e2e_latency": latency,
    }
    if req.return_logprob:
        lps = out.output_logprobs or []
        if len(lps) != len(out.output_ids):
            raise RuntimeError(
                f"engine returned {len(lps)} logprobs for {len(out.output_ids)} output tokens"
            )
        meta["output_token_logprobs"] = [
            [float(lp) if math.isfinite(lp) else None, int(t), None] for lp, t in zip(lps, out.output_ids)
        ]
    versions = out.output_versions
    meta["output_token_versions"] = (
        [int(v) for v in versions] if versions is not None else [int(out.weight_version)] * len(out.output_ids)
    )
    if req.return_routed_experts and out.routed_experts is not None:
        # (no rows -- routing capture off -- means no key, as SGLang without the server flag)
        layout = engine.layout
        rows = out.routed_experts
        wire = moe_to_wire(np.asarray(rows), layout)
        meta["routed_experts"] = encode_wire(wire)
        rv = out.routed_versions
        if rv is None:
            rv = np.full(len(wire), out.weight_version, dtype=np.int64)
        if len(rv) != len(wire):
            raise RuntimeError(f"engine returned {len(rv)} row versions for {len(wire)} rows")
        meta["routed_experts_versions"] = _versions_b64(np.asarray(rv))
    return {"text": text, "output_ids": [int(t) for t in out.output_ids], "meta_info": meta}


# ----------------------------------------------------------------------------------------- handlers
async def _generate_one(engine: Any, req: GenerateRequest) -> dict:
    t0 = time.perf_counter()
    try:
        out = await engine.generate(req)
    except asyncio.CancelledError:
        try:
            engine.abort(req.rid)
        except Exception:  # noqa: BLE001 -- best effort
            pass
        raise
    return _response(engine, req, out, time.perf_counter() - t0)


async def generate(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    body = await _read_json(request)
    reqs, batched = _parse_generate(body, engine, request.app[_CFG_KEY]["max_batch"])
    if not batched:
        return web.json_response(await _generate_one(engine, reqs[0]))
    tasks = [asyncio.ensure_future(_generate_one(engine, r)) for r in reqs]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:  # one item failed: do not leave its siblings running (cancel aborts them)
            t.cancel()
        raise
    return web.json_response(list(results))


async def health(request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def health_generate(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    req = GenerateRequest(
        input_ids=[0], sampling=SamplingParams(temperature=0.0, max_new_tokens=1), rid=f"HEALTH_CHECK_{time.time()}"
    )
    try:
        await asyncio.wait_for(engine.generate(req), timeout=request.app[_CFG_KEY]["health_timeout"])
    except Exception as e:  # noqa: BLE001
        return web.Response(status=503, text=f"unhealthy: {type(e).__name__}: {e}")
    return web.Response(text="OK")


def _layout_info(engine: Any) -> dict:
    cfg = engine.config
    layout = getattr(engine, "layout", None)
    return {
        "num_hidden_layers": int(cfg.num_hidden_layers),
        "moe_layers": [int(i) for i in (layout.moe_layers if layout is not None else cfg.moe_layers)],
        "num_experts": int(cfg.num_experts),
        "top_k": int(layout.top_k if layout is not None else cfg.num_experts_per_tok),
        "routed_experts_enabled": _routing_enabled(engine),
    }


def _routing_enabled(engine: Any) -> bool:
    ecfg = getattr(engine, "cfg", None)
    return getattr(engine, "layout", None) is not None and bool(getattr(ecfg, "capture_routing", True))


async def get_model_info(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    path = str(engine.model_path)
    return web.json_response({
        "model_path": path,
        "tokenizer_path": path if getattr(engine, "tokenizer", None) is not None else None,
        "is_generation": True,
        "weight_version": str(engine.version),
        "agentrl": _layout_info(engine),
    })


async def get_server_info(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    cfg = request.app[_CFG_KEY]
    stats = engine.stats()
    info = {k: v for k, v in stats.items()} if isinstance(stats, dict) else {}
    info.update({
        "model_path": str(engine.model_path),
        "enable_return_routed_experts": _routing_enabled(engine),
        "version": "agentrl",
        "weight_version": str(engine.version),
        "max_request_bytes": cfg["max_request_bytes"],
        "max_batch": cfg["max_batch"],
        "agentrl": _layout_info(engine),
    })
    return web.json_response(json.loads(json.dumps(info, default=_jsonable)))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


async def flush_cache(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    ok = engine.flush_cache()
    return web.Response(
        text="Cache flushed.\n" if ok else "Cache not flushed: some cached prefixes are in use.\n",
        status=200 if ok else 400,
    )


async def update_weights_from_disk(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        raise _BadRequest("model_path (a non-empty string) is required")
    abort = body.get("abort_all_requests", False)
    if not isinstance(abort, bool):
        raise _BadRequest("abort_all_requests must be a bool")
    # load_format and weight_version are accepted and ignored: this server's version is the engine's
    # own counter, bumped by every successful update.
    try:
        version = await asyncio.to_thread(
            engine.update_weights_from_disk, path, "abort" if abort else "continue"
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = f"Failed to update weights from {path}: {type(e).__name__}: {e}"
        return web.json_response(
            {"success": False, "message": msg, "num_paused_requests": 0, "error": {"message": msg, "code": 400}},
            status=400,
        )
    return web.json_response({
        "success": True,
        "message": f"Succeeded to update model weights. Weight version updated to {version}.",
        "num_paused_requests": 0,
        "weight_version": str(version),
        "version": int(version),
    })


async def abort_request(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    body = await _read_json(request)
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    rid = body.get("rid")
    if body.get("abort_all"):
        fn = getattr(engine, "abort_all", None)
        if fn is None:
            raise _BadRequest("abort_all is not supported by this engine; abort by rid")
        fn()
        return web.Response()
    if not isinstance(rid, str) or not rid:
        raise _BadRequest("rid (a non-empty string) is required")
    engine.abort(rid)
    return web.Response()


# -------------------------------------------------------------------------------------------- app
def create_app(
    engine: Any,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    health_timeout: float = 20.0,
) -> web.Application:
    """The aiohttp application serving `engine` (already started) with SGLang's native API."""
    app = web.Application(middlewares=[_errors_middleware], client_max_size=max_request_bytes + 1)
    app[_ENGINE_KEY] = engine
    app[_CFG_KEY] = {"max_request_bytes": int(max_request_bytes), "max_batch": int(max_batch),
                     "health_timeout": float(health_timeout)}
    app.router.add_route("POST", "/generate", generate)
    app.router.add_route("PUT", "/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_get("/get_server_info", get_server_info)
    app.router.add_route("POST", "/flush_cache", flush_cache)
    app.router.add_route("GET", "/flush_cache", flush_cache)
    app.router.add_post("/update_weights_from_disk", update_weights_from_disk)
    app.router.add_post("/abort_request", abort_request)
    add_openai_routes(app, _ENGINE_KEY, _read_json)
    return app


def serve(
    engine: Any,
    host: str = "127.0.0.1",
    port: int = 30000,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
    start_engine: bool = True,
) -> None:
    """Run the server until interrupted (blocking). With start_engine (default) this starts the engine's
    scheduler first and shuts it down on exit; pass False for an engine that is already running."""
    started = False
    if start_engine:
        engine.start()
        started = True
    try:
        web.run_app(create_app(engine, max_request_bytes, max_batch), host=host, port=port,
                    print=lambda *a: log.info(" ".join(map(str, a))))
    finally:
        if started:
            engine.shutdown()

