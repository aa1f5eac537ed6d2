"""Radix prefix cache over token ids, mapping cached prefixes to KV slots.

Owns: the tree (match with edge split, insert, lock while in use, LRU eviction of unlocked leaves,
flush). Eviction pops a heap of evictable-leaf candidates (O(log n) per evicted leaf, not a scan of
the tree per call). It never allocates or frees memory itself: it reports which slots it adopted or dropped,
and the slot pool (memory.py) keeps the reference counts. Because routing rows live in a table
indexed by the same slots, a prefix hit returns the KV *and* the routing rows of that prefix.
Does not own: slot allocation (memory.py) or scheduling (engine.py).
"""

from __future__ import annotations

import heapq
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
        self._num_nodes = 0  # nodes below the root
        # eviction candidates (last_access, tie, node), pushed whenever a node may have become an unlocked
        # leaf or a leaf's last_access changed; an entry is checked when popped (lazy deletion)
        self._heap: list[tuple[int, int, Node]] = []
        self._tie = itertools.count()

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
        self._candidate(node)
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
                self._num_nodes += 1
                node = new
                break
            n = common_prefix(child.key, ids, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pos += n
            node = child
        self._candidate(node)
        return adopted

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child`'s edge after n tokens; returns the new upper node (keeps child's lock count)."""
        parent = child.parent
        upper = Node(child.key[:n], child.slots[:n], parent)
        upper.lock, upper.last_access = child.lock, child.last_access
        parent.children[child.key[0]] = upper
        child.key, child.slots, child.parent = child.key[n:], child.slots[n:], upper
        upper.children[child.key[0]] = child
        self._num_nodes += 1
        return upper

    # ------------------------------------------------------------------ locks
    def lock(self, node: Node) -> None:
        while node is not None:
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        leaf = node
        while node is not None:
            node.lock -= 1
            assert node.lock >= 0, "radix lock underflow"
            node = node.parent
        self._candidate(leaf)

    # ------------------------------------------------------------------ eviction
    def evict(self, num_tokens: int) -> list[int]:
        """Drop least-recently-used unlocked leaves until `num_tokens` slots are released (or none is
        left to drop); returns the released slots. A parent left without children joins the candidates
        with its own last access, so a cold branch goes leaf by leaf up to where it forks."""
        released: list[int] = []
        heap = self._heap
        while heap and len(released) < num_tokens:
            stamp, _, leaf = heapq.heappop(heap)
            if not self._evictable_leaf(leaf) or leaf.last_access != stamp:
                continue  # stale entry: locked, grew children, touched since, or already gone
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            leaf.parent = None
            released.extend(leaf.slots)
            self.num_tokens -= len(leaf.key)
            self._num_nodes -= 1
            self._candidate(parent)
        return released

    def _evictable_leaf(self, node: Node) -> bool:
        parent = node.parent  # None once evicted (and for the root)
        return (parent is not None and not node.children and node.lock == 0
                and parent.children.get(node.key[0]) is node)

    def _candidate(self, node: Node) -> None:
        if node is self.root or node.children or node.lock:
            return
        heapq.heappush(self._heap, (node.last_access, next(self._tie), node))
        if len(self._heap) > 4 * self._num_nodes + 64:  # mostly stale entries: rebuild from the tree
            self._heap = [(n.last_access, next(self._tie), n) for n in self._nodes() if self._evictable_leaf(n)]
            heapq.heapify(self._heap)

    def evictable(self) -> int:
        """Slots that eviction could release now (tokens in subtrees with no lock)."""
        return sum(len(n.key) for n in self._nodes() if n.lock == 0 and n is not self.root)

    def flush(self) -> list[int]:
        """Forget every cached prefix; returns all slots the tree held (locked ones included: their
        users hold their own references, see memory.SlotPool)."""
        slots = [s for n in self._nodes() if n is not self.root for s in n.slots]
        self.root = Node()
        self.num_tokens = self._num_nodes = 0
        self._heap = []
        return slots

    def _nodes(self):
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
