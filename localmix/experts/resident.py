"""Resident experts: all of a layer's experts in memory (the model's files mapped, or float arrays)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from localmix.experts.source import ExpertSource
from localmix.store import is_quantized, nbytes


class ResidentExperts(ExpertSource):
    """A layer's experts, every one in memory: a list of Expert behind the ExpertSource interface."""

    on_demand = False

    def __init__(self, experts: Iterable):
        self.experts = list(experts)
        self._vector: bool | None = None

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, expert):
        return self.experts[expert]

    def is_resident(self, expert: int) -> bool:
        return 0 <= expert < len(self.experts)

    def batches(self, chosen):
        return [(list(chosen), [self.experts[e] for e in chosen])]

    def for_token(self, chosen):
        return self.batches(chosen)

    def on_vector_kernels(self) -> bool:
        if self._vector is None:  # asked at every layer of every token: found once
            from localmix.kernels import runs_vector
            matrices = [m for e in self.experts for m in (e.w1, e.w3, e.w2)]
            self._vector = all(is_quantized(m) and runs_vector(m.bits, m.group_size, m.shape[1]) for m in matrices)
        return self._vector

    def shapes(self) -> set[tuple[int, int]]:
        return {(m.bits, m.group_size) for e in self.experts for m in (e.w1, e.w2, e.w3) if is_quantized(m)}

    def expert_bytes(self) -> int:
        return max((sum(nbytes(m) for m in (e.w1, e.w2, e.w3, e.b1, e.b2, e.b3) if m is not None)
                    for e in self.experts), default=0)

    def speculate(self, h: np.ndarray, k: int) -> None:
        pass
