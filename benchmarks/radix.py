"""Radix-cache eviction when the KV pool is full: agentrl's heap of evictable leaves vs a scan of the tree
per eviction (list every unlocked leaf, sort by last access: the previous implementation, and what SGLang's
RadixCache.evict does with its collect-leaves + heapify), side by side in one run.

A long-running server (`agentrl serve`) keeps its cache full, so every admission evicts: each round matches
a new prompt that shares a system prompt with the cached ones, locks it, evicts room for it, inserts it and
unlocks it, on a tree already holding `n` cached conversations.

    python benchmarks/radix.py [--sizes 1000 4000 16000] [--rounds 2000]
"""

from __future__ import annotations

import argparse
import bisect
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from agentrl.engine.radix import RadixCache  # noqa: E402


class ScanEvictCache(RadixCache):
    """The baseline (the previous `RadixCache.evict`): every eviction lists and sorts all unlocked leaves of
    the tree; a parent left without children joins that list in order."""

    def evict(self, num_tokens: int) -> list[int]:
        released: list[int] = []
        leaves = sorted((n for n in self._nodes() if n is not self.root and not n.children and n.lock == 0),
                        key=lambda n: n.last_access)
        while leaves and len(released) < num_tokens:
            leaf = leaves.pop(0)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            released.extend(leaf.slots)
            self.num_tokens -= len(leaf.key)
            if parent is not self.root and not parent.children and parent.lock == 0:
                bisect.insort(leaves, parent, key=lambda n: n.last_access)
        return released


def admissions(cache: RadixCache, n: int, rounds: int, system: list[int], turn: int, seed: int) -> float:
    """Microseconds per admission on a cache pre-filled with n conversations (system prompt + `turn` tokens)."""
    rng = random.Random(seed)
    slot = iter(range(10**9))

    def conversation() -> list[int]:
        return system + [rng.randrange(1000, 50000) for _ in range(turn)]

    for _ in range(n):
        ids = conversation()
        cache.insert(ids, [next(slot) for _ in ids])
    prompts = [conversation() for _ in range(rounds)]
    t0 = time.perf_counter()
    for ids in prompts:
        _, node = cache.match(ids)
        cache.lock(node)
        released = cache.evict(turn)
        cache.insert(ids, [next(slot) for _ in ids])
        cache.unlock(node)
        assert len(released) >= turn
    return (time.perf_counter() - t0) / rounds * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--turn", type=int, default=64, help="tokens per cached conversation after the system prompt")
    a = ap.parse_args()
    system = list(range(40))
    print(f"{'cached conversations':>21}{'scan (us/admission)':>21}{'heap (us/admission)':>21}{'heap / scan':>13}")
    for n in a.sizes:
        scan = admissions(ScanEvictCache(), n, a.rounds, system, a.turn, seed=n)
        heap = admissions(RadixCache(), n, a.rounds, system, a.turn, seed=n)
        print(f"{n:>21,}{scan:>21,.1f}{heap:>21,.1f}{heap / scan:>13.3f}")


if __name__ == "__main__":
    main()
