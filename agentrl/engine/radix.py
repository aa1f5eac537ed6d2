"""Radix prefix cache over token ids, mapping cached prefixes to KV slots.

Owns: the tree (match with edge split, insert, lock while in use, LRU eviction of unlocked leaves,
flush). It never allocates or frees memory itself: it reports which slots it adopted or dropped,
and the slot pool (memory.py) keeps the reference counts. Because routing rows live in a table
indexed by the same slots, a prefix hit returns the KV *and* the routing rows of that prefix.
Does not own: slot allocation (memory.py) or scheduling (engine.py).
"""

from __future__ import annotations

import itertools


class Node:
    __slots__ = ("key", "slots", "children", "parent", "lock", "last_access")

    def __init__(self, key: tuple[int, ...] = (), slots: tuple[int, ...] = (), parent: Node | None = None) -> None:
        self.key, self.slots, self.parent = key, slots, parent
        self.children: dict[int, Node] = {}
        self.lock = 0
        self.last_access = 0


def common_prefix(a, b, start: int = 0) -> int:
    """Length of the common prefix of a and b[start:]."""
    n = 0
    limit = min(len(a), len(b) - start)
    while n < limit and a[n] == b[start + n]:
        n += 1
    return n


class RadixCache:
    """Token-id radix tree; each edge stores the KV slots of its tokens (one slot per token)."""

    def __init__(self) -> None:
        self.root = Node()
        self._clock = itertools.count(1)
        self.num_tokens = 0  # tokens (= slots) held by the tree

    # ------------------------------------------------------------------ lookup / insert
    def match(self, ids) -> tuple[list[int], Node]:
        """Longest cached prefix of `ids`: (its slots, deepest node). Splits an edge matched partway,
        so the returned node covers exactly the matched prefix (and can be locked)."""
        node, pos, slots = self.root, 0, []
        now = next(self._clock)
        node.last_access = now
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            n = common_prefix(child.key, ids, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            slots.extend(child.slots)
            pos += n
            node = child
        return slots, node

    def insert(self, ids, slots) -> list[int]:
        """Cache `ids` with their `slots`. Returns the slots the tree adopted (the caller's slots for
        the part that was not cached yet); for an already-cached part the tree keeps its own."""
        assert len(ids) == len(slots)
        node, pos = self.root, 0
        now = next(self._clock)
        adopted: list[int] = []
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                new = Node(tuple(ids[pos:]), tuple(slots[pos:]), node)
                new.last_access = now
                node.children[ids[pos]] = new
                adopted.extend(new.slots)
                self.num_tokens += len(new.key)
                break
            n = common_prefix(child.key, ids, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pos += n
            node = child
        return adopted

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child`'s edge after n tokens; returns the new upper node (keeps child's lock count)."""
        parent = child.parent
        upper = Node(child.key[:n], child.slots[:n], parent)
        upper.lock, upper.last_access = child.lock, child.last_access
        parent.children[child.key[0]] = upper
        child.key, child.slots, child.parent = child.key[n:], child.slots[n:], upper
        upper.children[child.key[0]] = child
        return upper

    # ------------------------------------------------------------------ locks
    def lock(self, node: Node) -> None:
        while node is not None:
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock -= 1
            assert node.lock >= 0, "radix lock underflow"
            node = node.parent

    # ------------------------------------------------------------------ eviction
    def evict(self, num_tokens: int) -> list[int]:
        """Drop least-recently-used unlocked leaves until `num_tokens` slots are released (or none is
        left to drop); returns the released slots."""
        released: list[int] = []
        leaves = [n for n in self._nodes() if not n.children and n.lock == 0 and n is not self.root]
        leaves.sort(key=lambda n: n.last_access)
        while leaves and len(released) < num_tokens:
            leaf = leaves.pop(0)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            released.extend(leaf.slots)
            self.num_tokens -= len(leaf.key)
            if parent is not self.root and not parent.children and parent.lock == 0:
                # keep the list ordered by last access
                i = next((j for j, n in enumerate(leaves) if n.last_access > parent.last_access), len(leaves))
                leaves.insert(i, parent)
        return released

    def evictable(self) -> int:
        """Slots that eviction could release now (tokens in subtrees with no lock)."""
        return sum(len(n.key) for n in self._nodes() if n.lock == 0 and n is not self.root)

    def flush(self) -> list[int]:
        """Forget every cached prefix; returns all slots the tree held (locked ones included: their
        users hold their own references, see memory.SlotPool)."""
        slots = [s for n in self._nodes() if n is not self.root for s in n.slots]
        self.root = Node()
        self.num_tokens = 0
        return slots

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
