"""The prefix cache's tree against a reference model: random inserts, matches, locks and evictions;
every slot is either free or held exactly once, locked slots are never evicted, and a match returns
exactly the slots inserted for that prefix."""

from __future__ import annotations

import random

from pipeserve.scheduler.radix_cache import RadixCache


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_random_operations_agree_with_a_reference_model():
    rng = random.Random(7)
    cache = RadixCache()
    ref: dict[tuple[int, ...], int] = {}  # every cached prefix position: token path -> slot
    free = list(range(1, 5001))
    locked: list[tuple[object, list[int]]] = []  # (node, tokens it protects)
    for _ in range(3000):
        op = rng.random()
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]  # small alphabet: sharing
        if op < 0.45 and len(free) >= len(tokens):
            peeked = cache.peek(tokens)
            slots_matched, node = cache.match(tokens)
            assert peeked == len(slots_matched)
            m = len(slots_matched)
            assert slots_matched == [ref[tuple(tokens[: i + 1])] for i in range(m)]
            assert m == max(k for k in range(len(tokens) + 1) if tuple(tokens[:k]) in ref or k == 0)
            new = [free.pop() for _ in range(len(tokens) - m)]
            held = cache.insert(tokens, slots_matched + new)
            assert held >= m
            free.extend(new[: held - m])  # duplicates of what the tree held already
            for i in range(len(tokens)):
                ref.setdefault(tuple(tokens[: i + 1]), (slots_matched + new)[i])
        elif op < 0.7:
            slots_matched, node = cache.match(tokens)
            cache.lock(node)
            locked.append((node, tokens[: len(slots_matched)]))
        elif op < 0.85 and locked:
            node, _ = locked.pop(rng.randrange(len(locked)))
            cache.unlock(node)
        else:
            protected = {ref[tuple(t[: i + 1])] for _, t in locked for i in range(len(t))}
            freed = cache.evict(rng.randrange(1, 20))
            assert not protected & set(freed)
            free.extend(freed)
            for path in [p for p, s in ref.items() if s in set(freed)]:
                del ref[path]
            # a prefix stays cached only with every shorter prefix of it
            assert all(p[:-1] in ref for p in ref if len(p) > 1)
        assert cache.size == len(ref) and len(free) + cache.size == 5000
        assert cache.leaves == {n for n in cache._nodes() if not n.children}  # kept, not walked
        assert len(set(ref.values())) == len(ref) and not set(ref.values()) & set(free)
        unlocked_paths = {p for p in ref} - {
            tuple(t[: i + 1]) for _, t in locked for i in range(len(t))
        }
        assert cache.evictable <= len(unlocked_paths) + sum(len(t) for _, t in locked)
    for node, _ in locked:
        cache.unlock(node)
    assert cache.evictable == cache.size
    assert sorted(cache.evict(10**9)) == sorted(ref.values())
    assert cache.size == 0 and cache.evictable == 0


def test_eviction_is_least_recently_used_and_deterministic():
    cache = RadixCache()
    cache.insert([1, 2, 3], [10, 11, 12])
    cache.insert([1, 2, 4], [10, 11, 13])  # shares [1, 2]: 10, 11 are duplicates
    cache.insert([5], [20])
    cache.match([1, 2, 3])  # touched: the most recent
    assert cache.evict(1) == [13]  # [1, 2, 4]'s own leaf is the least recent
    assert cache.evict(1) == [20]
    slots, node = cache.match([1, 2, 3, 9])
    assert slots == [10, 11, 12]
    cache.lock(node)
    assert cache.evict(5) == [] and cache.evictable == 0
    cache.unlock(node)
    assert sorted(cache.evict(5)) == [10, 11, 12]


def test_extend_adds_only_past_exactly_the_cached_prefix():
    """`extend` (a running request's prompt joining the tree) inserts in one walk where the tree
    holds exactly `cached` of the tokens, inside an edge too, and changes nothing otherwise."""
    rng = random.Random(3)
    for _ in range(300):
        cache = RadixCache()
        next_slot = iter(range(1, 10**6))
        for _ in range(rng.randrange(0, 6)):  # some cached paths over a small alphabet
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
            cache.insert(tokens, [next(next_slot) for _ in tokens])
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
        have = cache.peek(tokens)
        cached = have + rng.choice([-1, 0, 0, 1])
        before = (cache.size, sorted(s for n in cache._nodes() for s in n.slots))
        mine = cache.match(tokens)[0] + [next(next_slot) for _ in tokens[have:]]
        leaf = cache.extend(tokens, mine, cached)
        if cached != have or have == len(tokens):
            assert leaf is None
            assert (cache.size, sorted(s for n in cache._nodes() for s in n.slots)) == before
            continue
        assert not leaf.children and leaf in cache.leaves
        assert cache.match(tokens) == (mine, leaf)
        assert cache.size == before[0] + len(tokens) - have
        assert cache.leaves == {n for n in cache._nodes() if not n.children}
