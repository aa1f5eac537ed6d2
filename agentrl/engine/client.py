"""Async HTTP client for an SGLang-compatible server: agentrl's own (`agentrl.engine.server`) or a real
`sglang.launch_server` (0.5.x, started with ``--enable-return-routed-experts`` for routing rows).

Owns: the `/generate` payload (`sglang_generate_payload`, shared by every caller so it is tested
once), decoding responses into `GenerateOutput` (tokens, logprobs, routing rows converted from the
wire layout to internal MoE rows, policy-version tags), retries with exponential backoff, per-request
timeouts and clear errors.

Routing layout: given, or discovered once from ``/get_model_info`` -- our server's ``agentrl`` block,
else the ``config.json`` under the reported ``model_path`` (works for SGLang on the same machine /
shared filesystem; otherwise pass ``layout=`` explicitly).

Policy versions: our server sends per-row (``routed_experts_versions``) and per-token
(``output_token_versions``) versions. Real SGLang sends ``meta_info["weight_version"]`` (a string,
``"default"`` until set) and, in newer releases, ``weight_versions`` segments over the output tokens.
A version string that parses as an int is used as is; otherwise the tag is this client's own count of
weight updates done through it. The client sends ``weight_version=str(new_version)`` with every
``update_weights_from_disk`` so that SGLang reports integer versions from then on. With segments, output
token j gets its segment's version and row r the version of the token it produced (prompt rows: the
first output token's); without them every token and row gets the version current at the finish.

Does not own: the server, the engine, or launching SGLang.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import numpy as np

from agentrl.engine.types import GenerateOutput, GenerateRequest
from agentrl.routing import RoutingLayout, decode_wire, wire_to_moe

__all__ = [
    "EngineClient",
    "EngineClientError",
    "EngineConnectionError",
    "EngineHTTPError",
    "EngineResponseError",
    "RoutedExpertsMissingError",
    "sglang_generate_payload",
]

log = logging.getLogger(__name__)

_RETRY_STATUSES = frozenset({502, 503, 504})


class EngineClientError(RuntimeError):
    """Base class of the client's errors."""


class EngineHTTPError(EngineClientError):
    """The server answered with an error status; `message` is the server's own message."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        super().__init__(f"HTTP {status}{' from ' + url if url else ''}: {message}")
        self.status = status
        self.message = message
        self.url = url


class EngineConnectionError(EngineClientError):
    """The server could not be reached (or kept timing out / answering 502-504) after all retries."""


class EngineResponseError(EngineClientError):
    """The server answered 200 but the response is not what the request asked for."""


class RoutedExpertsMissingError(EngineResponseError):
    """return_routed_experts was requested but the response has no routed_experts."""


def sglang_generate_payload(request: GenerateRequest) -> dict[str, Any]:
    """The JSON body of SGLang's ``POST /generate`` for one request (non-streaming, token ids in).

    Fields that real SGLang may not know (``routed_experts_start_len``, ``sampling_seed``) are sent only
    when they differ from their defaults.
    """
    sp = request.sampling
    sampling: dict[str, Any] = {
        "temperature": float(sp.temperature),
        "top_p": float(sp.top_p),
        "top_k": int(sp.top_k),
        "max_new_tokens": int(sp.max_new_tokens),
        "ignore_eos": bool(sp.ignore_eos),
    }
    if sp.stop:
        sampling["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        sampling["stop_token_ids"] = [int(t) for t in sp.stop_token_ids]
    if sp.seed is not None:
        sampling["sampling_seed"] = int(sp.seed)  # SGLang's name for the per-request seed
    payload: dict[str, Any] = {
        "input_ids": [int(t) for t in request.input_ids],
        "sampling_params": sampling,
        "return_logprob": bool(request.return_logprob),
        "rid": request.rid,
        "stream": False,
    }
    if request.return_routed_experts:
        payload["return_routed_experts"] = True
        if request.routed_experts_start_len:
            payload["routed_experts_start_len"] = int(request.routed_experts_start_len)
    return payload


def _parse_version(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        return int(str(v).strip())
    except ValueError:
        return None


def _segment_versions(segments: Any, n: int, default: int) -> list[int] | None:
    """Per-token versions from SGLang's ``meta_info["weight_versions"]`` (newer SGLang):
    ``[{"version": str, "start": i, "end": j}, ...]`` over output tokens. None when absent/unusable."""
    if not isinstance(segments, list) or not segments or n == 0:
        return None
    out = [default] * n
    try:
        for seg in segments:
            v = _parse_version(seg.get("version"))
            lo, hi = max(int(seg["start"]), 0), min(int(seg["end"]), n)
            out[lo:hi] = [default if v is None else v] * max(hi - lo, 0)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return out


def _error_message(text: str) -> str:
    """The server's message out of an error body: {"error": {"message"}}, {"message"}, {"detail"} or text."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text.strip() or "(empty body)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        for k in ("message", "detail"):
            if k in body:
                return str(body[k])
    return text.strip()


def layout_from_model_info(info: dict[str, Any]) -> RoutingLayout | None:
    """Routing layout from /get_model_info: the ``agentrl`` block, else ``config.json`` at model_path.

    Returns None for a dense model. Raises EngineClientError when neither source is available.
    """
    block = info.get("agentrl")
    if isinstance(block, dict):
        if not block.get("moe_layers"):
            return None
        return RoutingLayout(
            int(block["num_hidden_layers"]), tuple(block["moe_layers"]), int(block["num_experts"]), int(block["top_k"])
        )
    path = info.get("model_path")
    cfg_file = os.path.join(str(path), "config.json") if path else None
    if not cfg_file or not os.path.isfile(cfg_file):
        raise EngineClientError(
            f"cannot discover the routing layout: the server reports model_path={path!r}, which has no "
            "config.json on this machine; pass layout=RoutingLayout(...) to EngineClient"
        )
    with open(cfg_file) as f:
        cfg = json.load(f)
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM config inside
        cfg = {**cfg, **cfg["text_config"]}
    ns = SimpleNamespace(**cfg)
    num_experts = getattr(ns, "num_experts", None) or getattr(ns, "num_local_experts", None)
    if not num_experts:
        return None
    for k in ("decoder_sparse_step", "mlp_only_layers", "first_k_dense_replace"):
        if not hasattr(ns, k):
            setattr(ns, k, None)
    layout = RoutingLayout.from_config(ns)
    return layout


class EngineClient:
    """Implements `InferenceEngine` over HTTP against our server or a real SGLang server."""

    def __init__(
        self,
        base_url: str,
        layout: RoutingLayout | None = None,
        timeout: float = 300.0,
        retries: int = 3,
        backoff: float = 0.5,
        session: aiohttp.ClientSession | None = None,
        max_connections: int = 1024,
        max_backoff: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_connections = int(max_connections)
        self._session = session
        self._own_session = session is None
        self._layout = layout
        self._layout_known = layout is not None
        self._layout_lock: asyncio.Lock | None = None
        # weight updates done through this client (version tag for servers without integer versions)
        self._version: int | None = None
        self.attempts = 0  # HTTP attempts made (for metrics / tests)

    # ------------------------------------------------------------------ session / lifecycle
    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or (self._own_session and self._session.closed):
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()
        if self._own_session:
            self._session = None

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ transport
    async def _request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        parse_json: bool = True,
        quiet: bool = False,
    ) -> Any:
        """One HTTP call with retries on connection errors, timeouts and 502/503/504."""
        warn = log.debug if quiet else log.warning
        url = self.base_url + path
        retries = self.retries if retries is None else retries
        timeout = self.timeout if timeout is None else timeout
        last: str = ""
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(min(self.backoff * (2 ** (attempt - 1)), self.max_backoff))
            self.attempts += 1
            try:
                async with self._get_session().request(
                    method, url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
                ) as resp:
                    text = await resp.text()
                    if resp.status in _RETRY_STATUSES:
                        last = f"HTTP {resp.status}: {_error_message(text)}"
                        warn("%s %s: %s (attempt %d/%d)", method, url, last, attempt + 1, retries + 1)
                        continue
                    if resp.status >= 400:
                        raise EngineHTTPError(resp.status, _error_message(text), url)
                    if not parse_json:
                        return text
                    try:
                        return json.loads(text)
                    except json.JSONDecodeError as e:
                        raise EngineResponseError(f"{method} {url}: response is not JSON ({e}): {text[:200]!r}") from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                last = f"{type(e).__name__}: {e}"
            except asyncio.TimeoutError:
                last = f"timed out after {timeout:g}s"
                await self._on_timeout(path, payload)
            warn("%s %s: %s (attempt %d/%d)", method, url, last, attempt + 1, retries + 1)
        raise EngineConnectionError(f"{method} {url} failed after {retries + 1} attempts: {last}")

    async def _on_timeout(self, path: str, payload: Any) -> None:
        """A /generate that timed out may still be running on the server: abort it before retrying,
        so that the retry (same rid) is not refused as a duplicate and no work is wasted."""
        if path == "/generate" and isinstance(payload, dict) and payload.get("rid"):
            try:
                await self._request("POST", "/abort_request", {"rid": payload["rid"]}, timeout=5.0, retries=0,
                                    parse_json=False)
            except EngineClientError:
                pass

    # ------------------------------------------------------------------ layout
    async def get_layout(self) -> RoutingLayout | None:
        """The routing layout (None for a dense model), discovered on first use when not given."""
        if self._layout_known:
            return self._layout
        if self._layout_lock is None:
            self._layout_lock = asyncio.Lock()
        async with self._layout_lock:
            if not self._layout_known:
                self._layout = layout_from_model_info(await self.model_info())
                self._layout_known = True
        return self._layout

    # ------------------------------------------------------------------ generate
    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        payload = sglang_generate_payload(request)
        data = await self._request("POST", "/generate", payload)
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        if not isinstance(data, dict) or "meta_info" not in data:
            raise EngineResponseError(f"/generate returned an unexpected body: {str(data)[:200]}")
        return await self._decode(request, data)

    async def generate_batch(self, requests: list[GenerateRequest]) -> list[GenerateOutput]:
        """Concurrent single calls (one HTTP request each), results in order."""
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def _decode(self, request: GenerateRequest, data: dict[str, Any]) -> GenerateOutput:
        meta: dict[str, Any] = data["meta_info"]
        lp_items = meta.get("output_token_logprobs")
        output_ids = data.get("output_ids")
        if output_ids is None:
            if lp_items is None:
                raise EngineResponseError("response has neither output_ids nor output_token_logprobs")
            output_ids = [int(item[1]) for item in lp_items]
        output_ids = [int(t) for t in output_ids]
        prompt_tokens = int(meta.get("prompt_tokens", len(request.input_ids)))
        completion_tokens = int(meta.get("completion_tokens", len(output_ids)))
        version = _parse_version(meta.get("weight_version"))
        if version is None:
            version = self._version or 0

        logprobs = None
        if request.return_logprob:
            if lp_items is None:
                raise EngineResponseError("return_logprob was requested but meta_info has no output_token_logprobs")
            logprobs = [float("nan") if item[0] is None else float(item[0]) for item in lp_items]
            if len(logprobs) != len(output_ids):
                raise EngineResponseError(
                    f"{len(logprobs)} output_token_logprobs for {len(output_ids)} output tokens"
                )

        out_versions = meta.get("output_token_versions")
        per_token = out_versions is not None and len(out_versions) == len(output_ids)
        if per_token:
            out_versions = [int(v) for v in out_versions]
        else:
            out_versions = _segment_versions(meta.get("weight_versions"), len(output_ids), version)
            per_token = out_versions is not None
            if out_versions is None:
                out_versions = [version] * len(output_ids)

        experts = row_versions = None
        start = int(request.routed_experts_start_len) if request.return_routed_experts else 0
        finish = meta.get("finish_reason")
        aborted = isinstance(finish, dict) and finish.get("type") == "abort"
        if request.return_routed_experts and not (aborted and meta.get("routed_experts") is None):
            experts, row_versions = await self._decode_rows(
                request, meta, prompt_tokens + completion_tokens, version, partial_ok=aborted
            )
            if per_token and "routed_experts_versions" not in meta and out_versions:
                # row r was fed to produce token r+1; rows of the prompt were computed with the
                # weights that produced the first output token
                idx = np.arange(start, start + len(experts)) - (prompt_tokens - 1)
                row_versions = np.asarray(out_versions, dtype=np.int64)[np.clip(idx, 0, len(out_versions) - 1)]

        return GenerateOutput(
            rid=str(meta.get("id", request.rid)),
            output_ids=output_ids,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cached_tokens=int(meta.get("cached_tokens") or 0),
            weight_version=version,
            output_logprobs=logprobs,
            output_versions=out_versions,
            routed_experts=experts,
            routed_versions=row_versions,
            routed_experts_start_len=start,
            text=data.get("text"),
        )

    async def _decode_rows(
        self, request: GenerateRequest, meta: dict[str, Any], n_tokens: int, version: int, partial_ok: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows [start_len, N-1) as internal MoE rows + a version per row. An aborted request
        (partial_ok) may carry fewer rows (those of the tokens fed before the abort)."""
        if meta.get("routed_experts") is None:
            raise RoutedExpertsMissingError(
                "return_routed_experts was requested but the response has no meta_info['routed_experts']: "
                "the server must run with --enable-return-routed-experts (SGLang) and serve a MoE model"
            )
        layout = await self.get_layout()
        if layout is None:
            raise EngineResponseError("the server returned routed_experts but reports a dense model (no MoE layers)")
        wire = decode_wire(meta["routed_experts"], layout.num_hidden_layers, layout.top_k,
                           meta.get("routed_experts_dtype"))
        start = int(request.routed_experts_start_len)
        expected = n_tokens - 1 - start
        if len(wire) != expected:
            if partial_ok and len(wire) < expected:
                pass
            elif start and len(wire) == n_tokens - 1:
                # a server that ignores routed_experts_start_len sends every row: keep the tail
                wire = wire[start:]
            else:
                raise EngineResponseError(
                    f"routed_experts has {len(wire)} rows, expected {expected} = N-1-start_len with "
                    f"N={n_tokens} (prompt+completion) and routed_experts_start_len={start}"
                )
        experts = wire_to_moe(wire, layout)
        rv = meta.get("routed_experts_versions")
        if rv is not None:
            try:
                versions = np.frombuffer(base64.b64decode(rv, validate=True), dtype="<i4").astype(np.int64)
            except (binascii.Error, ValueError) as e:
                raise EngineResponseError(f"routed_experts_versions is not valid base64 int32: {e}") from None
            if len(versions) != len(experts):
                raise EngineResponseError(
                    f"routed_experts_versions has {len(versions)} entries for {len(experts)} rows"
                )
        else:
            versions = np.full(len(experts), version, dtype=np.int64)
        return experts, versions

    # ------------------------------------------------------------------ control endpoints
    async def health(self) -> bool:
        """True when GET /health answers 200 (no retries)."""
        try:
            await self._request("GET", "/health", timeout=min(self.timeout, 10.0), retries=0, parse_json=False,
                                quiet=True)
            return True
        except EngineClientError:
            return False

    async def wait_ready(self, timeout: float) -> None:
        """Poll /health until it answers 200; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            if await self.health():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"server at {self.base_url} not ready after {timeout:g}s")
            await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
            delay = min(delay * 2, 2.0)

    async def model_info(self) -> dict:
        return await self._request("GET", "/get_model_info")

    async def server_info(self) -> dict:
        return await self._request("GET", "/get_server_info")

    async def flush_cache(self) -> None:
        await self._request("POST", "/flush_cache", parse_json=False)

    async def update_weights_from_disk(self, path: str, abort_in_flight: bool = False) -> int | str:
        """Load new weights from `path`; returns the server's new weight version (an int when known).

        Sends ``weight_version`` = this client's next version so real SGLang reports integer versions.
        """
        if self._version is None:
            v = _parse_version((await self.model_info()).get("weight_version"))
            self._version = v or 0
        new_version = self._version + 1
        body = {"model_path": str(path), "abort_all_requests": bool(abort_in_flight),
                "weight_version": str(new_version)}
        resp = await self._request("POST", "/update_weights_from_disk", body, retries=self.retries)
        if isinstance(resp, dict) and resp.get("success") is False:
            raise EngineHTTPError(400, str(resp.get("message")), self.base_url + "/update_weights_from_disk")
        got = None
        if isinstance(resp, dict):
            got = _parse_version(resp.get("version", resp.get("weight_version")))
        if got is None:
            info = await self.model_info()
            got = _parse_version(info.get("weight_version"))
            if got is None:
                got = new_version
        self._version = got
        return got

    async def abort(self, rid: str) -> None:
        await self._request("POST", "/abort_request", {"rid": rid}, parse_json=False)

