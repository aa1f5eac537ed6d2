"""Embedded engine throughput, measured side by side in one run on the same machine.

1. Routing-row capture on vs off: the same concurrent generation workload, the two settings
   alternating round by round (goal: capture costs <= 2%).
2. Multi-turn agent workload vs transformers `generate` on the same model (fp32 both) and batch:
   B episodes x T turns; each turn appends environment tokens to the history and generates tokens.
   transformers re-prefills the whole history every turn (its cache does not outlive a `generate`
   call); the engine serves the history from its radix cache (goal >= 3x). Two length profiles:
   "fixed": every turn appends E env tokens and generates G (transformers' best case: no padding,
   no finished rows); "varied": per turn, env tokens uniform in [1, 2E-1] and a response length
   uniform in [1, 2G-1] (same means), as tool outputs and replies vary in agent episodes; a batched
   `generate` pads histories to the longest and decodes until the longest reply ends (its finished
   rows idle along, as with EOS), the engine frees each sequence when it is done.
3. The same multi-turn workload against the real SGLang server on CPU, when its venv exists
   (../shared/sglang-cpu), through agentrl's client. SGLang is started only for that part.

    python benchmarks/engine.py [--episodes 32] [--turns 4] [--env-tokens 16] [--gen 32] [--no-sglang]
    python benchmarks/engine.py --device cuda [--preset small-moe]     # both on a GPU, bf16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from agentrl.engine.engine import DTYPES, Engine
from agentrl.engine.types import GenerateRequest, SamplingParams
from agentrl.model.checkpoint import init_model


Episode = list[tuple[list[int], int]]  # per turn: (env token ids appended, tokens to generate)


def episodes(n: int, turns: int, env_tokens: int, gen_tokens: int, vocab: int, varied: bool = False,
             seed: int = 0) -> list[Episode]:
    """`n` episodes of `turns` turns; the first turn's env part (the prompt) is twice as long."""
    g = torch.Generator().manual_seed(seed)

    def length(mean: int) -> int:
        return int(torch.randint(1, 2 * mean, (1,), generator=g)) if varied else mean

    return [[(torch.randint(9, vocab, (length(env_tokens) * (1 if t else 2),), generator=g).tolist(), length(gen_tokens))
             for t in range(turns)] for _ in range(n)]


async def run_multiturn(generate, eps: list[Episode], routed: bool) -> int:
    """All episodes concurrently; turn t+1 of an episode starts when its turn t returns."""

    async def one(ep):
        hist, new = [], 0
        for env, gen in ep:
            hist = hist + env
            params = SamplingParams(temperature=1.0, max_new_tokens=gen, ignore_eos=True, seed=0)
            out = await generate(GenerateRequest(hist, params, return_logprob=True, return_routed_experts=routed))
            hist = hist + out.output_ids
            new += len(out.output_ids)
        return new

    return sum(await asyncio.gather(*(one(ep) for ep in eps)))


def bench_capture(ckpt, eps, rounds: int, device: str = "cpu") -> dict[str, float]:
    """Tokens/s with capture on vs off, fresh engines (no cache carried over), the two run back to back
    in each round (order alternating). The overhead is the median of the rounds' on/off ratios: pairing
    cancels the machine's slow drifts, which on a shared 2-core box move single runs by +-5%."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    with Engine.from_pretrained(ckpt, dtype="bfloat16", device=device) as eng:  # first-use costs, untimed
        asyncio.run(run_multiturn(eng.generate, eps, routed=True))
    for r in range(rounds):
        for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
            with Engine.from_pretrained(ckpt, dtype="bfloat16", capture_routing=mode == "on", device=device) as eng:
                t0 = time.perf_counter()
                n = asyncio.run(run_multiturn(eng.generate, eps, routed=mode == "on"))
                times[mode].append(n / (time.perf_counter() - t0))
    ratio = statistics.median(on / off for on, off in zip(times["on"], times["off"]))
    return {**{k: statistics.median(v) for k, v in times.items()}, "ratio": ratio}


def bench_hf(ckpt, eps, device: str = "cpu", dtype: torch.dtype = torch.float32,
             experts: str = "eager") -> float:
    """transformers generate, batch = all episodes, re-prefilling the history each turn; each turn decodes
    until the longest reply of the batch is done, and each row keeps its own reply length."""
    import transformers

    # "eager" is transformers' fastest MoE path on this CPU (grouped_mm measured ~9x slower here)
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype,
                                                             experts_implementation=experts).to(device).eval()
    hist = [[] for _ in eps]
    new = 0
    t0 = time.perf_counter()
    for t in range(len(eps[0])):
        hist = [h + ep[t][0] for h, ep in zip(hist, eps)]
        lens = [ep[t][1] for ep in eps]
        s = max(map(len, hist))
        ids = torch.zeros(len(hist), s, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, h in enumerate(hist):
            ids[i, s - len(h):], mask[i, s - len(h):] = torch.tensor(h), 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(lens),
                                 min_new_tokens=max(lens), do_sample=True, pad_token_id=0)
        gen = out[:, s:].cpu()
        hist = [h + g[:n].tolist() for h, g, n in zip(hist, gen, lens)]
        new += sum(lens)
    return new / (time.perf_counter() - t0)


def bench_ours(ckpt, eps, device: str = "cpu", dtype: str = "float32") -> tuple[float, float]:
    """The engine on its default one intra-op thread (more threads contend with its asyncio thread).
    Returns (new tokens/s, new tokens per second of model forward): the second is what the engine would
    reach if scheduling, sampling and the episodes' own code cost nothing, a bound on any such gain."""
    with Engine.from_pretrained(ckpt, dtype=dtype, device=device) as eng:
        t0 = time.perf_counter()
        n = asyncio.run(run_multiturn(eng.generate, eps, routed=True))
        return n / (time.perf_counter() - t0), n / eng.counters["forward_s"]


def bench_sglang(ckpt, work: dict[str, list[Episode]]) -> dict[str, float] | None:
    try:
        from agentrl.engine.client import EngineClient
        from agentrl.engine.sglang import SGLangServer
    except ImportError:
        return None
    server = SGLangServer.cpu_test_server(str(ckpt), port=31877)
    if server is None:
        return None
    with server:
        async def go():
            res = {}
            async with EngineClient(server.base_url) as client:
                for p, eps in work.items():
                    await client.flush_cache()
                    t0 = time.perf_counter()
                    n = await run_multiturn(client.generate, eps, routed=True)
                    res[p] = n / (time.perf_counter() - t0)
            return res

        return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--env-tokens", type=int, default=16, help="env tokens per turn (mean, for 'varied')")
    ap.add_argument("--gen", type=int, default=32, help="generated tokens per turn (mean, for 'varied')")
    ap.add_argument("--profiles", default="fixed,varied", help="length profiles to compare with transformers")
    ap.add_argument("--rounds", type=int, default=12, help="paired rounds for capture on/off (median ratio)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of transformers and the engine (median)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: both engines on the GPU")
    ap.add_argument("--dtype", default=None, help="vs-transformers dtype (default: float32 on cpu, bfloat16 on cuda)")
    ap.add_argument("--no-sglang", action="store_true")
    args = ap.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    # on this CPU "eager" is transformers' fastest MoE path (grouped_mm ~9x slower); on a GPU both are tried
    experts = ["eager"] if args.device == "cpu" else ["eager", "grouped_mm"]
    profiles = args.profiles.split(",")
    with tempfile.TemporaryDirectory() as d:
        ckpt = init_model(args.preset, Path(d) / "m", seed=0)
        work = {p: episodes(args.episodes, args.turns, args.env_tokens, args.gen, 500, varied=p == "varied")
                for p in profiles}
        if args.device != "cpu":  # first-use costs (CUDA context, kernel selection) out of the timings
            warm = episodes(4, args.turns, args.env_tokens, 4, 500)
            bench_ours(ckpt, warm, args.device, dtype)
            for e in experts:
                bench_hf(ckpt, warm, args.device, DTYPES[dtype], e)
        cap = bench_capture(ckpt, work[profiles[0]], args.rounds, args.device)
        hf = {(p, e): [] for p in profiles for e in experts}
        ours: dict[str, list[float]] = {p: [] for p in profiles}
        bound: dict[str, list[float]] = {p: [] for p in profiles}
        for _ in range(args.repeats):
            for p, eps in work.items():
                for e in experts:
                    hf[p, e].append(bench_hf(ckpt, eps, args.device, DTYPES[dtype], e))
                tps, fwd = bench_ours(ckpt, eps, args.device, dtype)
                ours[p].append(tps)
                bound[p].append(fwd)
        sgl = None if args.no_sglang or args.device != "cpu" else bench_sglang(ckpt, work)
    where = "cpu, %d threads" % torch.get_num_threads() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"workload: {args.episodes} episodes x {args.turns} turns, +{args.env_tokens} env tokens and "
          f"{args.gen} generated tokens per turn (means), preset {args.preset}, {where}")
    print(f"{'run':<56}{'new tokens/s':>14}{'ratio':>10}")
    print(f"{f'engine bf16, capture off ({profiles[0]})':<56}{cap['off']:>14.0f}{1.0:>10.3f}")
    print(f"{f'engine bf16, capture on ({profiles[0]})':<56}{cap['on']:>14.0f}{cap['on'] / cap['off']:>10.3f}")
    print(f"  capture overhead: {100 * (1 - cap['ratio']):+.1f}% (median of {args.rounds} paired rounds' on/off "
          f"ratios; goal <= 2%)")
    for p in profiles:
        med = {e: statistics.median(hf[p, e]) for e in experts}
        best = max(med, key=med.get)
        base, mine = med[best], statistics.median(ours[p])
        print(f"{p} lengths:")
        for e in experts:
            tag = " (baseline)" if e == best else ""
            print(f"{f'  transformers generate {dtype}, {e}{tag}':<56}{med[e]:>14.0f}{med[e] / base:>10.2f}")
        print(f"{f'  engine {dtype}, rows on':<56}{mine:>14.0f}{mine / base:>10.2f}")
        fwd = statistics.median(bound[p])
        print(f"{f'  engine, model forward time only (bound)':<56}{fwd:>14.0f}{fwd / base:>10.2f}")
        share = statistics.median(o / b for o, b in zip(ours[p], bound[p]))
        print(f"    the model forward took {100 * share:.0f}% of the engine's run: with scheduling, sampling "
              f"and the episodes' code free, the engine would be at most {fwd / base:.2f}x")
        print(f"    medians of {args.repeats} alternating runs; engine: {[round(x) for x in ours[p]]}, "
              f"transformers: {[round(x) for x in hf[p, best]]}; goal >= 3x")
        if sgl is not None:
            print(f"{'  real SGLang server (CPU), rows on':<56}{sgl[p]:>14.0f}{sgl[p] / base:>10.2f}")
            print(f"    engine vs SGLang: {mine / sgl[p]:.2f}x")
    if sgl is None and args.device == "cpu":
        print("real SGLang: skipped (no ../shared/sglang-cpu venv, or --no-sglang)")


if __name__ == "__main__":
    main()
