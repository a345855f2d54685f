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
        self._formats: tuple | None = None

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, expert):
        return self.experts[expert]

    def is_resident(self, expert: int) -> bool:
        return 0 <= expert < len(self.experts)

    def batches(self, chosen):
        return [(list(chosen), [self.experts[e] for e in chosen])]

    def for_token(self, chosen):
        return [self.experts[e] for e in chosen]

    def formats(self) -> tuple:
        if self._formats is None:  # asked at every layer of every token: found once
            self._formats = self._find_formats()
        return self._formats

    def _find_formats(self) -> tuple:
        matrices = [m for e in self.experts for m in (e.w1, e.w3, e.w2)]
        if not all(is_quantized(m) for m in matrices):
            return None, None
        from localmix.kernels import runs_vector

        def one(ms):  # the one format of these matrices, if the vector kernels run it on their widths
            found = {(m.bits, m.group_size) for m in ms}
            runs = all(runs_vector(m.bits, m.group_size, m.shape[1]) for m in ms)
            return found.pop() if len(found) == 1 and runs else None
        return one(matrices[0::3] + matrices[1::3]), one(matrices[2::3])

    def shapes(self) -> set[tuple[int, int]]:
        return {(m.bits, m.group_size) for e in self.experts for m in (e.w1, e.w2, e.w3) if is_quantized(m)}

    def expert_bytes(self) -> int:
        return max((sum(nbytes(m) for m in (e.w1, e.w2, e.w3, e.b1, e.b2, e.b3) if m is not None)
                    for e in self.experts), default=0)

    def speculate(self, h: np.ndarray, k: int) -> None:
        pass
