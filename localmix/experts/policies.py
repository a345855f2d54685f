"""Which expert leaves a full cache: LRU, LFU and Pinned, and the name each goes by.

A policy hears of every use (`used`), every expert read ahead of time (`loaded`) and every
eviction (`removed`), and names the `victim` among the keys that may go; the cache does the rest.
`pinned` is the set of keys it never evicts (empty but for Pinned).
"""

from __future__ import annotations

from collections import Counter, OrderedDict


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

    def victim(self, keys):
        """The key to evict among these; None if none may go."""
        keys = set(keys)
        return next((key for key in self.order if key in keys), None)


class LFU(LRU):
    """Evict the expert used least often (since the start), the older one on ties."""

    def __init__(self):
        super().__init__()
        self.uses: Counter = Counter()

    def used(self, key) -> None:
        super().used(key)
        self.uses[key] += 1

    def victim(self, keys):
        keys = set(keys)
        return min((key for key in self.order if key in keys), key=lambda k: self.uses[k], default=None)


class Pinned(LRU):
    """Keep a fixed set of hot experts (from the routing statistics of a calibration run, see
    `hot_experts`) and share the other slots by LRU."""

    def __init__(self, pinned=()):
        super().__init__()
        self.pinned = set(pinned)

    def victim(self, keys):
        return super().victim(set(keys) - self.pinned)


POLICIES = {"lru": LRU, "lfu": LFU, "pinned": Pinned}
