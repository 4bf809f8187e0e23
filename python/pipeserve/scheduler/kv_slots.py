"""Stage 0's KV slots: the free ones in an allocator, the cached ones in the prefix cache. A
request's slots are the cache's for its first `cached_len` positions (matched at admission, locked
while it runs) and its own after them; at its release its computed tokens join the cache, and the
slots the cache held already for them are freed."""

from __future__ import annotations

from pipeserve.scheduler.allocator import IndexAllocator
from pipeserve.scheduler.radix_cache import RadixCache
from pipeserve.scheduler.req import Req


class KVSlots:
    def __init__(self, num_slots: int, prefix_cache: bool) -> None:
        self.free_slots = IndexAllocator(num_slots, first=1)  # slot 0 is the pad slot
        self.cache = RadixCache() if prefix_cache else None
        self.num_cached_tokens = 0  # prompt tokens admitted from the cache, for the hit rate
        self.num_admitted_tokens = 0

    @property
    def size(self) -> int:
        return self.free_slots.size

    @property
    def available(self) -> int:
        """Slots an allocation may take: the free ones and the cached ones nobody has locked."""
        return self.free_slots.num_free + (self.cache.evictable if self.cache else 0)

    @property
    def num_cached(self) -> int:
        return self.cache.size if self.cache else 0

    def allocate(self, n: int) -> list[int]:
        short = n - self.free_slots.num_free
        if short > 0 and self.cache is not None:
            # a 32nd of the pool at least: an eviction walks the tree, so it runs rarely
            self.free_slots.free(self.cache.evict(max(short, self.size // 32)))
        return self.free_slots.allocate(n)

    def match(self, req: Req) -> None:
        """A request about to be admitted takes the cached KV of its longest cached prefix (all
        of its tokens but the last at most: that one's forward gives the next token)."""
        if self.cache is None or req.kv_len:
            return
        slots, node = self.cache.match(req.key_ids()[:-1])
        self.cache.lock(node)
        req.cache_node, req.cached_len = node, len(slots)
        req.slots, req.kv_len = slots, len(slots)

    def peek(self, req: Req) -> int:
        """The cached prefix `match` would give `req` now."""
        return 0 if self.cache is None else self.cache.peek(req.key_ids()[:-1])

    def commit(self, req: Req) -> None:
        """The prompt KV scheduled for `req` so far joins the cache now (its chunks are computed
        before any later microbatch reads them, on every stage), so that requests admitted in
        later steps reuse it while this one still runs. Only where the tree holds exactly its
        matched prefix of those tokens; else they stay its own until its release, as before."""
        n = min(req.kv_len, len(req.prompt_ids))
        if self.cache is None or n <= max(req.cached_len, req.declined_len):
            return
        node = self.cache.extend(req.key_ids()[:n], req.slots[:n], req.cached_len)
        if node is None:
            req.declined_len = n  # another request cached some of them meanwhile: not again
            return
        self.cache.lock(node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node, req.cached_len = node, n

    def unmatch(self, req: Req) -> None:
        """Undoes `match` for a request that was not admitted after all."""
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node, req.cached_len, req.slots, req.kv_len = None, 0, [], 0

    def admitted(self, req: Req) -> None:
        req.prompt_cached = min(req.cached_len, len(req.prompt_ids))
        self.num_cached_tokens += req.cached_len
        self.num_admitted_tokens += req.seq_len

    def release(self, req: Req) -> None:
        """Frees a request's slots; with the cache, its computed tokens join it."""
        if self.cache is None:
            self.free_slots.free(req.slots)
        else:
            # an aborted request's slots may run past its known tokens (its last samples dropped)
            tokens = req.key_ids()[: len(req.slots)]
            held = self.cache.insert(tokens, req.slots[: len(tokens)])
            # the cache had [cached_len, held) already; nothing keys the slots past the tokens
            self.free_slots.free(req.slots[req.cached_len : held] + req.slots[len(tokens) :])
            if req.cache_node is not None:
                self.cache.unlock(req.cache_node)
        req.slots, req.cache_node, req.cached_len, req.declined_len = [], None, 0, 0
