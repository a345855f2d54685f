"""Which expert leaves a full cache: LRU, LFU and Pinned, and the name each goes by.

A policy hears of every use (`used`), every expert read ahead of time (`loaded`) and every
eviction (`removed`), and names the `victim`, the first key in its order that may go; the cache does
the rest. `pinned` is the set of keys it never evicts (empty but for Pinned). A victim is found in
about constant time, not by a pass over every expert in a slot: a miss of the Qwen3-30B-A3B shape
in 8 GiB evicts one of 2,300 at every miss, 230 misses a token, and that pass took a fifth of the
decoding time (py-spy).
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Callable

MayGo = Callable[[object], bool]  # whether the cache may evict this key now (in a slot, not in use)


class LRU:
    """Evict the expert used longest ago."""

    pinned: frozenset | set = frozenset()  # experts never evicted: none, but for Pinned

    def __init__(self):
        self.order: OrderedDict = OrderedDict()

    def used(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def removed(self, key) -> None:
        self.order.pop(key, None)

    def loaded(self, key) -> None:
        """Brought in ahead of time: as recent as a use, without counting as one."""
        LRU.used(self, key)

    def victim(self, may_go: MayGo):
        """The key to evict: the first in this policy's order that may go; None if none may."""
        return next((key for key in self.order if may_go(key)), None)


class LFU(LRU):
    """Evict the expert used least often (since the start), the one used longest ago on ties. The keys
    are kept in buckets by their count of uses, each bucket in the order of last use, and the counts
    in a heap, lazily: a count whose bucket emptied stays until it comes to the top (or the heap,
    grown past twice the buckets, is rebuilt)."""

    def __init__(self):
        super().__init__()
        self.uses: Counter = Counter()
        self.buckets: dict[int, OrderedDict] = {}
        self.counts: list[int] = []  # a heap holding every count that has a bucket, each once
        self.in_heap: set[int] = set()

    def used(self, key) -> None:
        self._leave(key)
        super().used(key)
        self.uses[key] += 1
        self._enter(key)

    def loaded(self, key) -> None:
        self._leave(key)
        LRU.used(self, key)
        self._enter(key)

    def removed(self, key) -> None:
        super().removed(key)
        self._leave(key)

    def _enter(self, key) -> None:
        count = self.uses[key]
        self.buckets.setdefault(count, OrderedDict())[key] = None
        if count not in self.in_heap:
            self.in_heap.add(count)
            heapq.heappush(self.counts, count)
        if len(self.counts) > 2 * len(self.buckets) + 64:
            self.counts = sorted(self.buckets)
            self.in_heap = set(self.counts)

    def _leave(self, key) -> None:
        count = self.uses[key]
        bucket = self.buckets.get(count)
        if bucket is not None and key in bucket:
            del bucket[key]
            if not bucket:
                del self.buckets[count]

    def victim(self, may_go: MayGo):
        while self.counts and self.counts[0] not in self.buckets:
            self.in_heap.discard(heapq.heappop(self.counts))
        if self.counts:  # nearly always: the least used bucket has a key that may go
            key = next((key for key in self.buckets[self.counts[0]] if may_go(key)), None)
            if key is not None:
                return key
        for count in sorted(self.buckets):  # the least used are all in use or being read
            key = next((key for key in self.buckets[count] if may_go(key)), None)
            if key is not None:
                return key
        return None


class Pinned(LRU):
    """Keep a fixed set of hot experts (from the routing statistics of a calibration run, see
    `hot_experts`) and share the other slots by LRU."""

    def __init__(self, pinned=()):
        super().__init__()
        self.pinned = set(pinned)

    def victim(self, may_go: MayGo):
        return super().victim(lambda key: key not in self.pinned and may_go(key))


POLICIES = {"lru": LRU, "lfu": LFU, "pinned": Pinned}
