"""The embedded engine against a full-sequence fp32 recompute with the same model."""

import asyncio
import os
import random
import time

import numpy as np
import pytest
import torch

from agentrl.engine.engine import Engine
from agentrl.engine.radix import RadixCache
from agentrl.engine.types import GenerateRequest, RequestError, SamplingParams
from agentrl.model import load_pretrained
from agentrl.model.checkpoint import init_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # a wider init than the default makes next-token and router decisions far from ties
    return init_model("tiny-moe", tmp_path_factory.mktemp("engine") / "tiny", seed=0, initializer_range=0.08)


@pytest.fixture(scope="module")
def ref(ckpt):
    return load_pretrained(ckpt).eval()


# AGENTRL_ENGINE_DEVICE=cuda runs every engine of this file on a GPU against the same host fp32 reference
DEVICE = os.environ.get("AGENTRL_ENGINE_DEVICE", "cpu")


def engine(ckpt, **kw) -> Engine:
    return Engine.from_pretrained(ckpt, dtype=kw.pop("dtype", "float32"), device=DEVICE, **kw).start()


def reference(model, seq: list[int]):
    """fp32 full-sequence forward: rows [N-1, L, k] and next-token logprobs [N-1]."""
    with torch.no_grad(), model.routing_replay.record():
        logits = model(torch.tensor([seq])).logits[0]
    rows = model.routing_replay.recorded[:-1].numpy()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
    return rows, lp.numpy(), logits


def check_against_reference(model, prompt, out):
    seq = list(prompt) + out.output_ids
    rows, lp, logits = reference(model, seq)
    n = len(prompt)
    np.testing.assert_allclose(out.output_logprobs, lp[n - 1:], atol=2e-5)
    start = out.routed_experts_start_len
    assert out.routed_experts.shape == (len(seq) - 1 - start, 4, 2)
    assert (out.routed_experts.astype(np.int64) == rows[start:]).all()
    return logits


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(9, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_rows_and_logprobs_equal_full_sequence_fp32_recompute(ckpt, ref):
    with engine(ckpt) as eng:
        p = prompt(0, 30)
        t0 = time.perf_counter()
        out = eng.generate_sync(GenerateRequest(p, GREEDY, return_logprob=True, return_routed_experts=True))
        wall = time.perf_counter() - t0
        # the forward-time counter (benchmarks/engine.py's bound) covers the steps, within the request's time
        assert eng.counters["steps"] == 12 and 0 < eng.counters["forward_s"] < wall
    logits = check_against_reference(ref, p, out)
    # greedy: each output token is the argmax of the reference logits at its position
    assert out.output_ids == [int(logits[len(p) - 1 + i].argmax()) for i in range(len(out.output_ids))]
    assert out.finish_reason == {"type": "length"} and out.completion_tokens == 12
    assert (out.routed_versions == 0).all() and out.output_versions == [0] * 12


def test_prefix_hit_reuses_kv_and_rows_without_recomputation(ckpt, ref):
    with engine(ckpt) as eng:
        p = prompt(1, 40)
        first = eng.generate_sync(GenerateRequest(p, GREEDY, return_logprob=True, return_routed_experts=True))
        before = dict(eng.counters)
        turn2 = p + first.output_ids + prompt(2, 7)  # next turn: history + new environment tokens
        second = eng.generate_sync(GenerateRequest(turn2, GREEDY, return_logprob=True, return_routed_experts=True))
        prefilled = eng.counters["prefilled_tokens"] - before["prefilled_tokens"]
    hist = len(p) + len(first.output_ids) - 1  # tokens of turn 1 that were fed (and cached)
    assert second.cached_tokens == hist
    assert prefilled == len(turn2) - hist  # only the new tokens were computed
    assert (second.routed_experts[:hist] == first.routed_experts).all()  # identical rows for the prefix
    check_against_reference(ref, turn2, second)
    # same prompt again: everything but the last prompt token is cached, same logits -> same logprobs
    with engine(ckpt) as eng:
        a = eng.generate_sync(GenerateRequest(p, GREEDY, return_logprob=True))
        b = eng.generate_sync(GenerateRequest(p, GREEDY, return_logprob=True))
    assert b.cached_tokens == len(p) - 1 and b.output_ids == a.output_ids
    np.testing.assert_allclose(b.output_logprobs, a.output_logprobs, atol=1e-6)


def test_a_group_submitted_at_once_prefills_its_prompt_once(ckpt, ref):
    """8 samples of one prompt arriving together (a GRPO group): one request prefills the prompt, the
    others wait a step for the cache, so the prompt is computed once and all members carry the very
    same rows for it; each output still equals the fp32 full-sequence recompute."""
    p = prompt(11, 40)
    other = prompt(12, 25)
    with engine(ckpt) as eng:
        reqs = [GenerateRequest(p, SamplingParams(temperature=1.0, max_new_tokens=6, seed=i), return_logprob=True,
                                return_routed_experts=True) for i in range(8)]
        reqs.append(GenerateRequest(other, GREEDY, return_logprob=True, return_routed_experts=True))
        futs = [eng.submit(r) for r in reqs]
        outs = [f.result() for f in futs]
        counters = dict(eng.counters)
    assert counters["prefilled_tokens"] == len(p) + 7 + len(other)  # 7 members fed only the last prompt token
    assert counters["deferred"] >= 7
    assert [o.cached_tokens for o in outs[:8]].count(len(p) - 1) == 7
    for o in outs[:8]:
        assert (o.routed_experts[: len(p) - 1] == outs[0].routed_experts[: len(p) - 1]).all()
    assert len({tuple(o.output_ids) for o in outs[:8]}) > 1  # the samples still differ
    for r, o in zip(reqs, outs):
        check_against_reference(ref, r.input_ids, o)


def test_routed_experts_start_len_returns_the_tail(ckpt, ref):
    with engine(ckpt) as eng:
        p = prompt(3, 25)
        full = eng.generate_sync(GenerateRequest(p, GREEDY, return_routed_experts=True))
        tail = eng.generate_sync(GenerateRequest(p, GREEDY, return_routed_experts=True, routed_experts_start_len=20))
    assert tail.routed_experts.shape[0] == len(p) + 12 - 1 - 20
    assert (tail.routed_experts == full.routed_experts[20:]).all()


def test_chunked_prefill_matches(ckpt, ref):
    with engine(ckpt, chunk_size=7) as eng:
        p = prompt(4, 45)
        out = eng.generate_sync(GenerateRequest(p, GREEDY, return_logprob=True, return_routed_experts=True))
        assert eng.counters["steps"] >= 45 // 7 + 12
    check_against_reference(ref, p, out)


def test_64_concurrent_requests(ckpt, ref):
    async def run(eng):
        reqs = [GenerateRequest(prompt(100 + i, 5 + i % 23), SamplingParams(temperature=1.0, max_new_tokens=4 + i % 9, ignore_eos=True,
                                seed=i), return_logprob=True, return_routed_experts=True) for i in range(64)]
        return reqs, await asyncio.gather(*(eng.generate(r) for r in reqs))

    with engine(ckpt) as eng:
        reqs, outs = asyncio.run(run(eng))
        assert eng.stats()["running"] == 0
    for r, o in zip(reqs, outs):
        assert o.rid == r.rid and o.completion_tokens == r.sampling.max_new_tokens
        check_against_reference(ref, r.input_ids, o)


def test_eviction_under_a_small_pool_keeps_results_correct(ckpt, ref):
    with engine(ckpt, max_total_tokens=160) as eng:
        outs = []
        for i in range(12):  # 12 x ~48 tokens through a 160-slot pool: the cache must evict
            p = prompt(200 + i, 36)
            outs.append((p, eng.generate_sync(GenerateRequest(p, GREEDY, return_logprob=True, return_routed_experts=True))))
        assert eng.counters["evicted_tokens"] > 0
        # all memory accounted for: free + cached == pool, nothing referenced twice
        assert eng.pool.free + eng.tree.num_tokens == 160
        assert set(np.unique(eng.pool.refs)) <= {0, 1}
    for p, o in outs:
        check_against_reference(ref, p, o)


def test_weight_update_flushes_cache_and_bumps_versions(ckpt, ref, tmp_path):
    other = init_model("tiny-moe", tmp_path / "other", seed=1, initializer_range=0.08)
    with engine(ckpt) as eng:
        p = prompt(5, 30)
        before = eng.generate_sync(GenerateRequest(p, GREEDY, return_routed_experts=True))
        v = eng.update_weights_from_disk(other)
        assert v == eng.version == 1 and eng.tree.num_tokens == 0
        after = eng.generate_sync(GenerateRequest(p, GREEDY, return_logprob=True, return_routed_experts=True))
        assert after.cached_tokens == 0 and after.weight_version == 1
        assert (after.routed_versions == 1).all() and set(after.output_versions) == {1}
        check_against_reference(load_pretrained(other).eval(), p, after)
        assert before.output_ids != after.output_ids
        # back to the first weights from an in-process state dict
        assert eng.update_weights_from_state_dict(ref.state_dict()) == 2
        again = eng.generate_sync(GenerateRequest(p, GREEDY, return_routed_experts=True))
        assert again.output_ids == before.output_ids and (again.routed_experts == before.routed_experts).all()


@pytest.mark.parametrize("policy", ["continue", "abort"])
def test_requests_in_flight_during_a_weight_update(ckpt, ref, policy):
    with engine(ckpt) as eng:
        p = prompt(6, 20)
        long = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
        fut = eng.submit(GenerateRequest(p, long, return_logprob=True, return_routed_experts=True))
        while eng.counters["decoded_tokens"] < 5:
            pass
        eng.update_weights_from_state_dict({k: v * 1.01 for k, v in ref.state_dict().items()}, in_flight=policy)
        out = fut.result()
        if policy == "abort":
            assert out.finish_reason["type"] == "abort" and out.completion_tokens < 200
        else:
            assert out.finish_reason == {"type": "length"}
            # per-token versions: old weights first, new weights after; rows likewise
            assert out.output_versions[0] == 0 and out.output_versions[-1] == 1
            assert out.output_versions == sorted(out.output_versions)
            assert set(out.routed_versions.tolist()) == {0, 1}
            assert eng.tree.num_tokens == 0  # a sequence with stale KV is not cached
        assert eng.pool.free == eng.cfg.max_total_tokens - eng.tree.num_tokens


def test_abort_releases_memory(ckpt):
    with engine(ckpt) as eng:
        fut = eng.submit(GenerateRequest(prompt(7, 10), SamplingParams(max_new_tokens=500, ignore_eos=True), rid="x"))
        while eng.counters["decoded_tokens"] < 3:
            pass
        assert eng.abort("x") and not eng.abort("nope")
        out = fut.result()
        assert out.finish_reason["type"] == "abort" and 0 < out.completion_tokens < 500
        # everything is free again except the prompt, cached (and evictable) once it was prefilled
        assert eng.tree.num_tokens == 10 and eng.tree.evictable() == 10
        assert eng.pool.free == eng.cfg.max_total_tokens - 10


def test_sampling_controls(ckpt):
    with engine(ckpt) as eng:
        p = prompt(8, 15)
        g = eng.generate_sync(GenerateRequest(p, GREEDY))
        s = lambda **kw: eng.generate_sync(GenerateRequest(p, SamplingParams(max_new_tokens=12, **kw))).output_ids
        assert s(top_k=1) == g.output_ids
        assert s(top_p=1e-6) == g.output_ids
        assert s(seed=3) == s(seed=3)
        assert s(seed=3) != s(seed=4)
        stop_tok = g.output_ids[3]
        out = eng.generate_sync(GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=12,
                                                                  stop_token_ids=[stop_tok])))
        assert out.output_ids == g.output_ids[: g.output_ids.index(stop_tok) + 1]
        assert out.finish_reason == {"type": "stop", "matched": stop_tok}
        zero = eng.generate_sync(GenerateRequest(p, SamplingParams(max_new_tokens=0), return_routed_experts=True))
        assert zero.output_ids == [] and zero.routed_experts.shape[0] == len(p) - 1
        # the slots given at admission and left unfilled by early stops came back: free + cached == pool
        assert eng.pool.free + eng.tree.num_tokens == eng.cfg.max_total_tokens
        assert set(np.unique(eng.pool.refs)) <= {0, 1}


def test_a_request_gets_its_slots_in_one_run(ckpt):
    """Slots are allocated at admission in one run: a decoding request's KV stays contiguous however
    many requests decode beside it (the decode gather reads it with few cache and TLB misses)."""
    with engine(ckpt) as eng:
        futs = [eng.submit(GenerateRequest(prompt(300 + i, 9), SamplingParams(max_new_tokens=20, ignore_eos=True)))
                for i in range(8)]
        while eng.counters["decoded_tokens"] < 8 * 5:
            pass
        with eng._lock:
            arrs = [np.array(r.slots) for r in list(eng._running)]  # the prompt's slots, then the decoded ones'
        [f.result() for f in futs]
    assert arrs and all(len(a) > 9 and (np.diff(a) == 1).all() for a in arrs)


def test_stop_strings_cut_text(ckpt):
    with engine(ckpt) as eng:
        p = prompt(9, 12)
        g = eng.generate_sync(GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=20)))
        assert g.text, "needs some text to stop on"
        stop = g.text[len(g.text) // 2: len(g.text) // 2 + 2]
        out = eng.generate_sync(GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=20, stop=[stop])))
        assert out.finish_reason == {"type": "stop", "matched": stop}
        assert stop not in out.text and g.text.startswith(out.text)



def test_stop_strings_are_checked_on_the_newest_tokens_only(ckpt):
    """Per step, stop strings are searched in the decoded text of the newest tokens (a window of the
    longest stop string's length plus slack), so checking a long reply is linear in its length; the
    whole output is decoded once a stop string shows up, and the cut is the whole text's first match."""
    from agentrl.engine.engine import STOP_SLACK_TOKENS

    with engine(ckpt) as eng:
        real, sizes = eng.tokenizer, []

        class Counting:  # the engine's own tokenizer, recording how many tokens each decode gets
            def __getattr__(self, name):
                return getattr(real, name)

            def decode(self, ids, **kw):
                sizes.append(len(ids))
                return real.decode(ids, **kw)

        eng.tokenizer = Counting()
        p, n = prompt(11, 12), 120
        free = eng.generate_sync(GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)))
        sizes.clear()
        never = "\x00never"
        out = eng.generate_sync(GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True,
                                                                  stop=[never])))
        assert out.output_ids == free.output_ids and out.text == free.text
        assert len(sizes) == n + 1 and max(sizes[:-1]) == len(never) + STOP_SLACK_TOKENS and sizes[-1] == n
        late = free.text[3 * len(free.text) // 4:][:3]
        assert len(free.text) > 40 and late.strip(), "needs a long reply to stop late in"
        sizes.clear()
        cut = eng.generate_sync(GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True,
                                                                  stop=["\x00never", late])))
        assert cut.finish_reason == {"type": "stop", "matched": late}
        assert cut.text == free.text[: free.text.find(late)]
        assert sum(s == len(cut.output_ids) for s in sizes) == 2  # the match's whole-text search, the reply


def test_bad_requests_are_clear_errors(ckpt):
    with engine(ckpt, max_total_tokens=64) as eng:
        with pytest.raises(RequestError, match="KV pool"):
            eng.submit(GenerateRequest(prompt(0, 60), SamplingParams(max_new_tokens=10)))
        with pytest.raises(RequestError, match="input_ids"):
            eng.submit(GenerateRequest([1, 10**6]))
        with pytest.raises(RequestError, match="unknown sampling param"):
            SamplingParams.from_dict({"temprature": 1})
        with pytest.raises(RequestError, match="empty"):
            GenerateRequest([])


def test_bf16_engine_and_dense_model(ckpt, tmp_path):
    with engine(ckpt, dtype="bfloat16") as eng:
        out = eng.generate_sync(GenerateRequest(prompt(10, 20), GREEDY, return_routed_experts=True))
        assert out.routed_experts.dtype == np.uint8 and out.routed_experts.shape == (31, 4, 2)
    dense = init_model("tiny-dense", tmp_path / "dense")
    with engine(dense) as eng:
        out = eng.generate_sync(GenerateRequest(prompt(10, 20), GREEDY, return_routed_experts=True))
        assert out.routed_experts is None and out.completion_tokens == 12


def test_radix_cache_match_insert_split_lock_evict():
    t = RadixCache()
    assert t.insert([1, 2, 3, 4], [10, 11, 12, 13]) == [10, 11, 12, 13]
    slots, node = t.match([1, 2, 9])  # partial edge match splits the edge
    assert slots == [10, 11] and node.key == (1, 2)
    assert t.insert([1, 2, 3, 5, 6], [20, 21, 22, 23, 24]) == [23, 24]  # only the new suffix is adopted
    assert t.match([1, 2, 3, 5, 6, 7])[0] == [10, 11, 12, 23, 24]
    _, locked = t.match([1, 2, 3, 4])
    t.lock(locked)
    t.match([1, 2, 3, 5])  # touch the other branch last: it is still the one evicted (the first is locked)
    assert sorted(t.evict(100)) == [23, 24]
    t.unlock(locked)
    assert sorted(t.evict(1)) == [13]  # LRU leaf first; one token asked, the whole leaf goes
    assert sorted(t.flush()) == [10, 11, 12] and t.num_tokens == 0


def test_weights_of_another_architecture_are_refused(ckpt, tmp_path):
    dense = init_model("tiny-dense", tmp_path / "dense")
    with engine(ckpt) as eng:
        with pytest.raises(RequestError, match="different architecture"):
            eng.update_weights_from_disk(dense)
        assert eng.version == 0
        other_ids = init_model("tiny-moe", tmp_path / "same", seed=3, initializer_range=0.08)
        assert eng.update_weights_from_disk(other_ids) == 1  # same architecture, new weights: accepted


def test_inverse_cdf_sampling_matches_the_distribution():
    """Drawn token frequencies match softmax(logits / T) after top-k, and truncated tokens never appear."""
    from agentrl.engine.sampling import sample_batch

    logits = torch.log(torch.tensor([0.05, 0.5, 0.0001, 0.3, 0.1499, 0.0]))
    n = 40_000
    torch.manual_seed(0)
    toks, _ = sample_batch(logits.repeat(n, 1), [SamplingParams(temperature=1.0, top_k=4)] * n, [None] * n)
    freq = torch.bincount(torch.tensor(toks), minlength=6).double() / n
    kept = torch.tensor([0.05, 0.5, 0.0, 0.3, 0.1499, 0.0], dtype=torch.float64)
    expect = kept / kept.sum()
    assert freq[2] == 0 and freq[5] == 0  # outside the top 4
    assert torch.allclose(freq, expect, atol=4 * (0.25 / n) ** 0.5)  # 4 sigma


def test_batched_sampling_follows_the_per_request_rule():
    """`sample_batch` (what the engine runs) == `sample_one` row by row, seeded rows drawing the same
    tokens from the same generators, for greedy, temperature, top-k and top-p rows mixed in one batch."""
    from agentrl.engine.sampling import sample_batch, sample_one

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 50, generator=g) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=1.0, top_k=3, top_p=0.5),
              SamplingParams(temperature=0.0, top_k=2), SamplingParams(temperature=2.0, top_p=0.95)]
    for seed in range(20):
        gens_a = [torch.Generator().manual_seed(seed * 100 + i) for i in range(7)]
        gens_b = [torch.Generator().manual_seed(seed * 100 + i) for i in range(7)]
        toks, lps = sample_batch(logits, params, gens_a)
        for i, p in enumerate(params):
            tok, lp = sample_one(logits[i], p, gens_b[i])
            assert toks[i] == tok and lps[i] == pytest.approx(lp, abs=1e-5), (seed, i)
    # unseeded rows share one draw; every token is allowed by its row's top-k / top-p
    toks, _ = sample_batch(logits.repeat(30, 1), params * 30, [None] * 210)
    for i, (tok, p) in enumerate(zip(toks, params * 30)):
        row = logits[i % 7]
        if p.top_k > 0:
            assert tok in torch.topk(row, p.top_k).indices.tolist()
        if p.temperature == 0:
            assert tok == int(row.argmax())


@pytest.mark.parametrize("layout", ["decode only", "decode first", "interleaved", "prefill only"])
def test_one_step_of_any_segment_layout_equals_the_full_forward(ckpt, layout):
    """`paged_forward` against the model's own full-sequence forward, in float64: a step's segments may be
    single decode tokens (attended together, the query heads of a KV head as its queries) and prefill
    chunks (attended causally), in any order; the decode-only step skips the scatter. Every new token's
    routing row and each sampled position's logits must equal the full forward's."""
    from agentrl.engine.forward import Segment, StepWeights, paged_forward
    from agentrl.engine.memory import SlotPool

    model = load_pretrained(ckpt, dtype=torch.float64).eval()
    c = model.config
    pool = SlotPool(256, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, torch.float64,
                    len(c.moe_layers), c.num_experts_per_tok, np.uint8)
    seqs = [prompt(700 + i, 6 + 5 * i) for i in range(5)]
    decode = {"decode only": [0, 1, 2, 3, 4], "prefill only": [], "decode first": [0, 1], "interleaved": [1, 3]}[layout]
    free = iter(range(1, 256))  # slot 0 stays unused: a gather of padding never reads a live token
    slots = [np.array([next(free) for _ in s], dtype=np.int64) for s in seqs]
    weights = StepWeights(model)
    # history of the decoding sequences first (its own prefill step), then the step under test
    hist = [Segment(seqs[i][:-1], 0, slots[i][:-1], False) for i in decode]
    if hist:
        paged_forward(model, pool, hist, weights=weights)
    segs = [Segment(seqs[i][-1:], len(seqs[i]) - 1, slots[i], True) if i in decode
            else Segment(seqs[i][:3], 0, slots[i][:3], True) if layout == "interleaved" and i == 2
            else Segment(seqs[i], 0, slots[i], True) for i in range(5)]  # "interleaved": seq 2 is a chunk
    logits, rows, _ = paged_forward(model, pool, segs, weights=weights)
    n = 0
    for seg, out in zip(segs, logits):
        full = seg.ids if seg.start == 0 else seqs[[s for s in range(5) if slots[s] is seg.slots][0]]
        with torch.no_grad(), model.routing_replay.record():
            want = model(torch.tensor([full])).logits[0, -1]
        torch.testing.assert_close(out, want.float(), rtol=0, atol=1e-6)
        new = model.routing_replay.recorded[-len(seg.ids):].numpy()
        assert (rows[n:n + len(seg.ids)].numpy().astype(np.int64) == new).all()
        n += len(seg.ids)
    assert n == rows.shape[0]


class _ScanEvictCache(RadixCache):
    """Reference eviction by brute force: list every unlocked leaf, take the least recently used, repeat."""

    def evict(self, num_tokens):
        released = []
        while len(released) < num_tokens:
            leaves = [n for n in self._nodes() if n is not self.root and not n.children and n.lock == 0]
            if not leaves:
                break
            leaf = min(leaves, key=lambda n: n.last_access)
            del leaf.parent.children[leaf.key[0]]
            released.extend(leaf.slots)
            self.num_tokens -= len(leaf.key)
        return released


@pytest.mark.parametrize("seed", range(4))
def test_radix_eviction_is_lru_like_a_full_scan(seed):
    """Random inserts, matches, locks and evictions on the cache and on a brute-force reference: the same
    slots are released in the same order, and every slot is held by exactly one of tree and released."""
    rng = random.Random(seed)
    trees = [RadixCache(), _ScanEvictCache()]
    locks: list[list] = []  # per lock: the node in each tree
    next_slot, held = 0, set()
    for _ in range(600):
        op = rng.random()
        ids = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]  # 3 symbols: many shared prefixes
        if op < 0.4:
            slots = list(range(next_slot, next_slot + len(ids)))
            next_slot += len(ids)
            adopted = [t.insert(ids, slots) for t in trees]
            assert adopted[0] == adopted[1]
            held |= set(adopted[0])
        elif op < 0.6:
            got = [t.match(ids) for t in trees]
            assert got[0][0] == got[1][0]
            if rng.random() < 0.5:
                for t, (_, node) in zip(trees, got):
                    t.lock(node)
                locks.append([node for _, node in got])
        elif op < 0.75 and locks:
            for t, node in zip(trees, locks.pop(rng.randrange(len(locks)))):
                t.unlock(node)
        else:
            want = rng.randrange(1, 12)
            out = [t.evict(want) for t in trees]
            assert out[0] == out[1]
            assert set(out[0]) <= held
            held -= set(out[0])
        assert trees[0].num_tokens == trees[1].num_tokens == len(held)
    assert sorted(trees[0].flush()) == sorted(held)
