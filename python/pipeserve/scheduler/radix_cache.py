"""Stage 0's prefix cache: a radix tree over token ids whose nodes hold the KV slots of those
tokens (page size 1). Only stage 0 keeps it: every later stage and TP peer follows the slots that
the batch descriptor carries, so all of them reuse and evict the same KV by construction.

A request matches its prompt at admission and locks the path it matched (`lock`), so no eviction
takes those slots while it runs; at its release its computed tokens are inserted (`insert`) and the
path unlocked. Unlocked leaves are evicted least recently used first (`evict`); "recent" is a
counter of matches and inserts, never a clock, so the same request stream evicts the same slots.
"""

from __future__ import annotations

import heapq


class Node:
    __slots__ = ("children", "key", "lock", "order", "parent", "slots", "tick")

    def __init__(
        self, parent: Node | None, key: list[int], slots: list[int], tick: int, order: int = 0
    ) -> None:
        self.parent = parent
        self.order = order  # creation order: breaks ties of `tick` without set or memory order
        self.key = key  # the tokens of this edge
        self.slots = slots  # their KV slots, one each
        self.children: dict[int, Node] = {}  # by first token
        self.lock = 0  # requests running on this node or below it
        self.tick = tick  # last match or insert through it


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix: list comparisons (C loops), bisecting on a mismatch."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo]; a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixCache:
    def __init__(self) -> None:
        self.root = Node(None, [], [], 0)
        self.root.lock = 1  # never evicted
        self.size = 0  # slots held by the tree
        self.evictable = 0  # of those, the slots no running request has locked
        self.tick = 0
        self.created = 0
        # nodes without children (never the root): what an eviction looks at, kept as the tree
        # changes so that an eviction does not walk the tree (the heap orders them, not the set)
        self.leaves: set[Node] = set()

    def _node(self, parent: Node, key: list[int], slots: list[int], tick: int) -> Node:
        self.created += 1
        return Node(parent, key, slots, tick, self.created)

    def match(self, tokens: list[int]) -> tuple[list[int], Node]:
        """The slots of the longest cached prefix of `tokens`, and the node to lock for them (it
        may hold more tokens than matched: locking it protects those too)."""
        self.tick += 1
        node, i, slots = self.root, 0, []
        while i < len(tokens) and (child := node.children.get(tokens[i])) is not None:
            k = _common(child.key, tokens[i:])
            slots.extend(child.slots[:k])
            child.tick = self.tick
            node, i = child, i + k
            if k < len(child.key):
                break
        return slots, node

    def peek(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` are cached (no effect on eviction order)."""
        node, i = self.root, 0
        while i < len(tokens) and (child := node.children.get(tokens[i])) is not None:
            k = _common(child.key, tokens[i : i + len(child.key)])
            node, i = child, i + k
            if k < len(child.key):
                break
        return i

    def lock(self, node: Node) -> None:
        while node is not None:
            if node.lock == 0:
                self.evictable -= len(node.slots)
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not None:
            node.lock -= 1
            if node.lock == 0:
                self.evictable += len(node.slots)
            node = node.parent

    def insert(self, tokens: list[int], slots: list[int]) -> int:
        """Adds `tokens` with their `slots`; returns how many leading tokens the tree held already
        (their slots in `slots` are duplicates, the caller's to free)."""
        self.tick += 1
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                self._add_leaf(node, tokens[i:], slots[i:])
                return i
            k = _common(child.key, tokens[i:])
            if k < len(child.key):
                child = self._split(child, k)
            child.tick = self.tick
            node, i = child, i + k
        return i

    def extend(self, tokens: list[int], slots: list[int], cached: int) -> Node | None:
        """`insert` of a running request's tokens, made only where the tree holds exactly their
        first `cached` (its own cached path): one walk, and the new leaf to lock, or None (and no
        change) where it holds more or fewer of them."""
        node, i = self.root, 0
        while i < len(tokens) and (child := node.children.get(tokens[i])) is not None:
            k = _common(child.key, tokens[i : i + len(child.key)])
            if k < len(child.key):
                if i + k != cached:
                    return None
                node, i = self._split(child, k), i + k
                break
            node, i = child, i + k
        if i != cached or i >= len(tokens):
            return None
        self.tick += 1
        return self._add_leaf(node, tokens[i:], slots[i:])

    def _add_leaf(self, parent: Node, key: list[int], slots: list[int]) -> Node:
        """A new unlocked leaf under `parent` holding `key` with `slots`."""
        new = self._node(parent, key, slots, self.tick)
        parent.children[key[0]] = new
        self.leaves.discard(parent)
        self.leaves.add(new)
        self.size += len(new.slots)
        self.evictable += len(new.slots)
        return new

    def _split(self, child: Node, k: int) -> Node:
        """Cuts `child`'s edge after k tokens; returns the new upper node (same lock count: a lock
        below it is a lock on it)."""
        upper = self._node(child.parent, child.key[:k], child.slots[:k], child.tick)
        upper.lock = child.lock
        upper.children[child.key[k]] = child
        child.parent.children[upper.key[0]] = upper
        child.parent, child.key, child.slots = upper, child.key[k:], child.slots[k:]
        return upper

    def evict(self, num_slots: int) -> list[int]:
        """Frees at least `num_slots` slots (fewer if the tree has no more unlocked), leaves least
        recently used first; returns them."""
        leaves = [(n.tick, n.order, n) for n in self.leaves if n.lock == 0]
        heapq.heapify(leaves)
        freed: list[int] = []
        while leaves and len(freed) < num_slots:
            _, _, node = heapq.heappop(leaves)
            freed.extend(node.slots)
            parent = node.parent
            del parent.children[node.key[0]]
            self.leaves.discard(node)
            self.size -= len(node.slots)
            self.evictable -= len(node.slots)
            if parent is not self.root and not parent.children:
                self.leaves.add(parent)
                if parent.lock == 0:
                    heapq.heappush(leaves, (parent.tick, parent.order, parent))
        return freed

    def _nodes(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.extend(node.children.values())
            stack.extend(node.children.values())
        return out
