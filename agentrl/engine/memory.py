"""Slot-addressed engine memory: the KV pool, the routing table beside it, and slot refcounts.

Owns: `SlotPool`, which holds for every KV slot s
  - `k[layer, s]`, `v[layer, s]`      the token's keys and values (engine dtype),
  - `routing[s]`                      the token's experts `[moe_layers, top_k]` (uint8/uint16),
  - `version[s]`                      the policy version of the weights that computed both,
and a reference count per slot (the radix cache holds one reference on each slot it caches, each
running request one on each slot of its sequence); a slot returns to the free list at zero.
Rows therefore live *beside* the KV they were computed with: whatever reuses a slot's KV (a
prefix-cache hit) reads the same slot's row, with no recomputation.
Does not own: which prefixes are cached (radix.py) or scheduling (engine.py).
"""

from __future__ import annotations

import numpy as np
import torch


class OutOfSlots(RuntimeError):
    pass


class SlotPool:
    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 moe_layers: int, top_k: int, row_dtype: np.dtype | None, device: str | torch.device = "cpu") -> None:
        self.num_slots = num_slots
        self.k = torch.zeros(num_layers, num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.routing = np.zeros((num_slots, moe_layers, top_k), dtype=row_dtype) if moe_layers else None
        self.version = np.full(num_slots, -1, dtype=np.int64)
        self.refs = np.zeros(num_slots, dtype=np.int32)
        self._free = list(range(num_slots - 1, -1, -1))  # a stack; pop() gives low slots first

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """n fresh slots with one reference each (the caller's)."""
        if n > len(self._free):
            raise OutOfSlots(f"need {n} KV slots, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        self.refs[out] = 1
        return out

    def ref(self, slots) -> None:
        if len(slots):
            np.add.at(self.refs, np.asarray(slots), 1)

    def unref(self, slots) -> None:
        """Drop one reference from each slot; slots reaching zero are freed (their row and version too)."""
        if not len(slots):
            return
        s = np.asarray(slots)
        np.subtract.at(self.refs, s, 1)
        assert (self.refs[s] >= 0).all(), "slot refcount underflow"
        dead = np.unique(s[self.refs[s] == 0])
        self.version[dead] = -1
        self._free.extend(dead[::-1].tolist())  # popped in ascending order: runs of slots stay runs

    def write_rows(self, slots: torch.Tensor, rows: torch.Tensor | None, version: int) -> None:
        """Record, for slots just filled by a forward, their routing rows and policy version."""
        idx = slots.numpy()
        if self.routing is not None and rows is not None:
            self.routing[idx] = rows.numpy().astype(self.routing.dtype, copy=False)
        self.version[idx] = version

    def rows(self, slots) -> tuple[np.ndarray | None, np.ndarray]:
        idx = np.asarray(slots, dtype=np.int64)
        return (None if self.routing is None else self.routing[idx].copy()), self.version[idx].copy()
