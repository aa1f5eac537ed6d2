"""The embedded inference engine: continuous batching over a paged KV pool with a radix prefix
cache whose slots carry each token's MoE routing row and policy version.

Owns: request admission and scheduling (one thread runs the model; asyncio callers await futures),
chunked prefill, sampling, stop conditions, weight updates, abort, and assembling results with
routing rows for every fed token (DESIGN.md Contract 1).
Does not own: the KV/row storage (memory.py), the prefix tree (radix.py), the model step
(forward.py), HTTP (server.py).

Policies
- Memory: a request is admitted only when the pool (after evicting unlocked cached prefixes, LRU)
  can hold its worst case (prompt + max_new_tokens - 1 fed tokens, minus its cached prefix), and
  those slots are allocated then, in one run, so a running request never runs out of KV and its
  KV stays close together; the ones it does not fill return at its end. Others wait in FIFO order.
- Prefix cache: a request reuses the longest cached prefix of its prompt (never the last prompt
  token: its logits must be computed). On finish, its fed tokens are inserted into the tree; the
  KV, rows and versions of reused slots are the ones computed when the prefix was first fed.
- Weight update (`in_flight`): "continue" keeps running requests going on the new weights; every
  output token and every row carries the version of the weights that produced it, and a request
  holding rows of an older version is not inserted into the cache. "abort" finishes running and
  waiting requests with finish_reason abort (the caller retries). Either way the version is bumped
  and the prefix cache (and its rows) is flushed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from agentrl.engine.forward import Segment, StepWeights, paged_forward
from agentrl.engine.memory import SlotPool
from agentrl.engine.radix import RadixCache, common_prefix
from agentrl.engine.sampling import sample_batch
from agentrl.engine.types import GenerateOutput, GenerateRequest, RequestError
from agentrl.model.checkpoint import fuse_experts, load_pretrained, read_state_dict
from agentrl.model.modeling import MoEForCausalLM
from agentrl.routing import RoutingLayout

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
MIN_SHARED_PREFILL = 16  # prompt tokens another request is about to cache that make a new request wait a step
STOP_SLACK_TOKENS = 8  # tokens decoded beyond a stop string's length (a character may span several tokens)


@dataclass
class EngineConfig:
    dtype: str = "bfloat16"  # inference dtype; may differ from the learner's, as SGLang's does
    max_total_tokens: int = 65536  # KV pool size in tokens (slots)
    chunk_size: int = 512  # prefill tokens per step (long prompts are prefilled in chunks)
    max_running: int = 256  # requests decoding at once
    capture_routing: bool = True  # write routing rows beside KV (off only for overhead benchmarks)
    seed: int = 0  # generator for requests without their own seed
    threads: int = 1  # intra-op threads of the scheduler thread (CPU); small decode steps run faster on one
    device: str = "cpu"  # where the model and the KV pool live ("cuda", "cuda:1", ...); rows and sampling stay on the host

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.max_total_tokens < 2 or self.chunk_size < 1 or self.max_running < 1:
            raise ValueError("max_total_tokens >= 2, chunk_size >= 1 and max_running >= 1 are required")


class _Req:
    def __init__(self, req: GenerateRequest, fut: concurrent.futures.Future, max_new: int, gen) -> None:
        self.req, self.fut, self.max_new, self.gen = req, fut, max_new, gen
        self.tokens = list(req.input_ids)
        self.prompt_len = len(self.tokens)
        self.slots: list[int] = []  # KV slots of fed tokens (one reference each held by this request)
        # the cached prefix's slots, then every slot the request may still fill, allocated at admission
        # (one run from the free list: a request's KV stays close together, which the decode gather likes)
        self.slot_arr = np.zeros(self.prompt_len + max_new, dtype=np.int64)
        self.allocated = 0  # slot_arr[:allocated] holds a reference of this request
        self.prompt_cached = False  # its fed prompt is in the radix cache (see Engine._cache_prompt)
        self.node = None  # locked radix node of the cached prefix
        self.cached = 0
        self.out_ids: list[int] = []
        self.out_lp: list[float] = []
        self.out_ver: list[int] = []
        self.finish: dict | None = None
        self.text_cut: int | None = None
        self.t0 = time.perf_counter()

    def to_feed(self) -> int:
        """Tokens still to feed now: the rest of the prompt, or the last sampled token."""
        end = self.prompt_len - 1 if self.max_new == 0 else len(self.tokens)
        return end - len(self.slots)


class Engine:
    """In-process engine. Thread-safe `submit`; `await generate(...)` from any event loop."""

    def __init__(self, model: MoEForCausalLM, cfg: EngineConfig | None = None, tokenizer=None,
                 model_path: str = "") -> None:
        self.cfg = cfg or EngineConfig()
        self.model = model.to(device=self.cfg.device, dtype=DTYPES[self.cfg.dtype]).eval()
        self._weights = StepWeights(self.model)  # the step's layout of the weights; rebuilt on every load
        self.config = model.config
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.layout = RoutingLayout.from_config(self.config) if self.config.moe_layers else None
        self.version = 0
        c = self.config
        self.pool = SlotPool(self.cfg.max_total_tokens, c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                             DTYPES[self.cfg.dtype], len(c.moe_layers), c.num_experts_per_tok,
                             self.layout.dtype if self.layout else None, device=self.cfg.device)
        self.tree = RadixCache()
        self.eos_ids = {t for t in (c.eos_token_id, getattr(tokenizer, "eos_token_id", None)) if t is not None}
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.counters = dict(prefilled_tokens=0, decoded_tokens=0, cached_tokens=0, steps=0, finished=0,
                             aborted=0, evicted_tokens=0, deferred=0,
                             forward_s=0.0)  # seconds in the model forward (the rest is scheduling and sampling)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "bfloat16", **kw) -> Engine:
        cfg = EngineConfig(dtype=dtype, **kw)
        model = load_pretrained(model_dir, dtype=DTYPES[dtype])
        tok = None
        if (Path(model_dir) / "tokenizer.json").exists() or (Path(model_dir) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
        return cls(model, cfg, tok, str(model_dir))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="agentrl-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for r in self._waiting + self._running:
            self._finish(r, {"type": "abort", "message": "engine shut down"})

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ API
    def submit(self, req: GenerateRequest) -> concurrent.futures.Future:
        """Validate and enqueue; the future resolves to a GenerateOutput."""
        c, n = self.config, len(req.input_ids)
        if max(req.input_ids) >= c.vocab_size or min(req.input_ids) < 0:
            raise RequestError(f"input_ids must be in [0, {c.vocab_size})")
        if n >= c.max_position_embeddings:
            raise RequestError(f"prompt has {n} tokens; the model's context is {c.max_position_embeddings}")
        max_new = min(req.sampling.max_new_tokens, c.max_position_embeddings - n)
        if n + max_new - 1 > self.cfg.max_total_tokens:
            raise RequestError(f"prompt + max_new_tokens ({n + max_new}) exceeds the KV pool "
                               f"({self.cfg.max_total_tokens} tokens)")
        if req.routed_experts_start_len > n + max_new:
            raise RequestError("routed_experts_start_len is beyond the end of the sequence")
        if self._thread is None:
            raise RuntimeError("engine not started: call start() or use it as a context manager")
        gen = torch.Generator().manual_seed(req.sampling.seed) if req.sampling.seed is not None else self._gen
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Req(req, fut, max_new, gen))
        self._wake.set()
        return fut

    async def generate(self, request: GenerateRequest) -> GenerateOutput:
        return await asyncio.wrap_future(self.submit(request))

    def generate_sync(self, request: GenerateRequest) -> GenerateOutput:
        return self.submit(request).result()

    def abort(self, rid: str) -> bool:
        with self._lock:
            known = any(r.req.rid == rid for r in self._waiting + self._running + list(self._inbox.queue))
            if known:
                self._aborts.add(rid)
        self._wake.set()
        return known

    def flush_cache(self) -> bool:
        return self._command(self._flush)

    def update_weights_from_state_dict(self, state: dict[str, torch.Tensor],
                                       in_flight: Literal["continue", "abort"] = "continue",
                                       version: int | None = None) -> int:
        """Load new weights (fused or per-expert keys); sets the policy version to `version` (the
        learner's) or bumps it by one, and returns it."""
        return self._command(lambda: self._update(fuse_experts(state), in_flight, version))

    def update_weights_from_disk(self, path: str | Path, in_flight: Literal["continue", "abort"] = "continue",
                                 version: int | None = None) -> int:
        from agentrl.model.checkpoint import load_config

        ids = dict(eos_token_id=None, pad_token_id=None, bos_token_id=None)  # special-token ids may differ
        if load_config(path).replace(**ids) != self.config.replace(**ids):
            raise RequestError(f"checkpoint {path} has a different architecture than the served model")
        state = read_state_dict(path)
        out = self.update_weights_from_state_dict(state, in_flight, version)
        self.model_path = str(path)
        return out

    def stats(self) -> dict:
        return dict(self.counters, version=self.version, running=len(self._running), waiting=len(self._waiting),
                    free_slots=self.pool.free, cached_prefix_tokens=self.tree.num_tokens)

    # ------------------------------------------------------------------ commands run between steps
    def _command(self, fn):
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("cmd", fn, fut))
        self._wake.set()
        return fut.result()

    def _flush(self) -> bool:
        self.pool.unref(self.tree.flush())
        return True

    def _update(self, state: dict[str, torch.Tensor], in_flight: str, version: int | None = None) -> int:
        if in_flight not in ("continue", "abort"):
            raise ValueError(f"in_flight must be 'continue' or 'abort', got {in_flight!r}")
        if in_flight == "abort":
            for r in list(self._running) + list(self._waiting):
                self._finish(r, {"type": "abort", "message": "weights updated"})
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        self._weights = StepWeights(self.model)
        if unexpected or [m for m in missing if not m.endswith("e_score_correction_bias")]:
            raise RequestError(f"weights do not match the model: missing={missing}, unexpected={unexpected}")
        self.version = self.version + 1 if version is None else int(version)
        self._flush()
        return self.version

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)  # applies to this (scheduler) thread's kernels
        while not self._stop:
            self._drain()
            if not self._running and not self._waiting:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            segs, owners = self._schedule()
            if not segs:
                self._wake.wait(0.01)
                self._wake.clear()
                continue
            try:
                self._step(segs, owners)
            except Exception as e:  # a failing step fails its requests, not the engine
                for r in set(owners):
                    if not r.fut.done():
                        self._release(r)
                        r.fut.set_exception(e)
                    if r in self._running:
                        self._running.remove(r)

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple) and item[0] == "cmd":
                _, fn, fut = item
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)
            else:
                self._waiting.append(item)
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        for r in [r for r in self._running + self._waiting if r.req.rid in aborts]:
            self._finish(r, {"type": "abort", "message": "aborted by request"})

    def _admit(self, r: _Req) -> bool:
        prefix = r.tokens[: r.prompt_len - 1]
        slots, node = self.tree.match(prefix)
        need = r.prompt_len + r.max_new - 1 - len(slots)
        self.tree.lock(node)
        short = need - self.pool.free
        if short > 0:
            released = self.tree.evict(short)
            self.counters["evicted_tokens"] += len(released)
            self.pool.unref(released)
        if need > self.pool.free:
            self.tree.unlock(node)
            return False
        self.pool.ref(slots)
        r.slots, r.node, r.cached = list(slots), node, len(slots)
        r.slot_arr[: len(slots)] = slots
        r.slot_arr[len(slots): len(slots) + need] = self.pool.alloc(need)
        r.allocated = len(slots) + need
        self.counters["cached_tokens"] += len(slots)
        return True

    def _defer(self, r: _Req) -> bool:
        """True if a running request whose prompt is not cached yet shares at least `MIN_SHARED_PREFILL`
        more tokens of r's prompt than the cache holds. r is then admitted once that prompt is cached
        (after its prefill), so a GRPO group's prompt is prefilled once and every member reads the same
        KV and routing rows for it."""
        prompt = r.tokens[: r.prompt_len - 1]
        cached = None
        for o in self._running:
            if o.prompt_cached or not prompt or o.tokens[0] != prompt[0]:
                continue
            if cached is None:
                cached = len(self.tree.match(prompt)[0])
            n = common_prefix(prompt, o.tokens[: o.prompt_len])
            if n >= cached + MIN_SHARED_PREFILL:
                self.counters["deferred"] += 1
                return True
        return False

    def _cache_prompt(self, r: _Req) -> None:
        """Once a request's prompt is fed, its prefix enters the radix cache (not only at finish), so
        requests with the same prompt that arrive while it decodes hit the cache."""
        fed = len(r.slots)
        r.prompt_cached = True
        if (self.pool.version[r.slots] == self.version).all():
            self.pool.ref(self.tree.insert(r.tokens[:fed], r.slots))

    def _schedule(self) -> tuple[list[Segment], list[_Req]]:
        segs, owners = [], []
        budget = self.cfg.chunk_size
        # decode tokens first (one each), then continuing prefills, then new admissions (FIFO)
        order = sorted(self._running, key=lambda r: r.to_feed() > 1)
        i = 0
        while i < len(self._waiting) and len(self._running) < self.cfg.max_running:
            r = self._waiting[i]
            if self._defer(r):  # wait one step for the cache instead of computing the same prefix twice
                i += 1
                continue
            if not self._admit(r):
                break  # out of KV: later requests wait too (FIFO)
            self._waiting.pop(i)
            self._running.append(r)
            order.append(r)
        for r in order:
            n = r.to_feed()
            if n <= 0:
                self._finish(r, {"type": "length"})  # max_new_tokens == 0: nothing (more) to feed
                continue
            if n > 1:
                if budget <= 0:
                    continue
                n = min(n, budget)
                budget -= n
            start = len(r.slots)
            r.slots.extend(r.slot_arr[start: start + n].tolist())
            end_of_input = len(r.slots) == len(r.tokens)
            segs.append(Segment(r.tokens[start: start + n], start, r.slot_arr[: start + n], end_of_input))
            owners.append(r)
        return segs, owners

    def _step(self, segs: list[Segment], owners: list[_Req]) -> None:
        t0 = time.perf_counter()
        logits, rows, new_slots = paged_forward(self.model, self.pool, segs, self.cfg.capture_routing, self._weights)
        self.counters["forward_s"] += time.perf_counter() - t0
        self.pool.write_rows(new_slots, rows, self.version)
        self.counters["steps"] += 1
        sampled = [r for seg, r in zip(segs, owners) if seg.want_logits]
        toks, lps = sample_batch(logits, [r.req.sampling for r in sampled], [r.gen for r in sampled])
        j = 0
        for seg, r in zip(segs, owners):
            if len(seg.ids) == 1 and r.out_ids:
                self.counters["decoded_tokens"] += 1
            else:
                self.counters["prefilled_tokens"] += len(seg.ids)
            if not seg.want_logits:
                continue
            if not r.prompt_cached and len(r.slots) >= r.prompt_len:
                self._cache_prompt(r)
            tok, lp = toks[j], lps[j]
            j += 1
            r.tokens.append(tok)
            r.out_ids.append(tok)
            r.out_lp.append(lp)
            r.out_ver.append(self.version)
            self._check_stop(r, tok)

    def _check_stop(self, r: _Req, tok: int) -> None:
        p = r.req.sampling
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_ids):
            return self._finish(r, {"type": "stop", "matched": tok})
        if p.stop and self.tokenizer is not None:
            # a stop string not seen before must end in the new token's text: decode only the last few
            # tokens (each yields at least one character, or a part of one), and the whole output only
            # when one shows up there, for its exact cut (a long reply stays linear, not quadratic)
            window = max(map(len, p.stop)) + STOP_SLACK_TOKENS
            tail = self.tokenizer.decode(r.out_ids[-window:], skip_special_tokens=True)
            if any(s in tail for s in p.stop):
                text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
                for s in p.stop:
                    i = text.find(s)
                    if i >= 0:
                        r.text_cut = i
                        return self._finish(r, {"type": "stop", "matched": s})
        if len(r.out_ids) >= r.max_new:
            self._finish(r, {"type": "length"})

    def _release(self, r: _Req) -> None:
        """Give back the request's lock, its slot references and the slots it was given but did not
        fill; cache its fed tokens if they were all computed by the current weights."""
        if r.node is not None:
            self.tree.unlock(r.node)
            r.node = None
        fed = len(r.slots)
        if fed and r.finish and r.finish["type"] != "abort" and (self.pool.version[r.slots] == self.version).all():
            self.pool.ref(self.tree.insert(r.tokens[:fed], r.slots))
        self.pool.unref(r.slots)
        self.pool.unref(r.slot_arr[fed: r.allocated])
        r.allocated = fed

    def _finish(self, r: _Req, reason: dict) -> None:
        if r.fut.done():
            return
        r.finish = reason
        rows = versions = None
        start = r.req.routed_experts_start_len
        if r.req.return_routed_experts and self.layout is not None:
            rows, versions = self.pool.rows(r.slots[start:])
            if not self.cfg.capture_routing:
                rows = None
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
            if r.text_cut is not None:
                text = text[: r.text_cut]
        out = GenerateOutput(
            rid=r.req.rid, output_ids=list(r.out_ids), finish_reason=reason, prompt_tokens=r.prompt_len,
            completion_tokens=len(r.out_ids), cached_tokens=r.cached, weight_version=self.version,
            output_logprobs=list(r.out_lp) if r.req.return_logprob else None, output_versions=list(r.out_ver),
            routed_experts=rows, routed_versions=versions, routed_experts_start_len=start, text=text,
        )
        self._release(r)
        if r in self._running:
            self._running.remove(r)
        if r in self._waiting:
            self._waiting.remove(r)
        self.counters["aborted" if reason["type"] == "abort" else "finished"] += 1
        r.fut.set_result(out)
