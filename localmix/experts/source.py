"""The one interface through which the model and the backends reach a layer's experts.

A layer holds an ExpertSource, given at construction: ResidentExperts (localmix.experts.resident),
every expert in memory, or CachedExperts (localmix.experts.cache), a layer's view of an expert cache
within a memory budget. Callers use these methods and never ask which of the two they hold: only
experts/ decides what is resident.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from localmix.model import Expert


class ExpertSource(Sequence):
    """A layer's experts, by index."""

    @abstractmethod
    def __len__(self) -> int:
        """The layer's number of experts (1 for a dense MLP)."""

    @abstractmethod
    def __getitem__(self, expert: int) -> Expert:
        """One expert, brought into memory where it is not."""

    @property
    @abstractmethod
    def on_demand(self) -> bool:
        """Whether experts are brought in as they are asked for (an expert cache): an expert of one
        batch may then be evicted by the next, so work on it must be done before moving on."""

    @abstractmethod
    def is_resident(self, expert: int) -> bool:
        """Whether this expert is in memory now (asking does not bring it in); an index out of range
        (a dropped expert's marker) is not."""

    @abstractmethod
    def batches(self, chosen) -> Iterable[tuple[list[int], list[Expert]]]:
        """The chosen experts (indices in order) in batches that are in memory together, each as
        (indices, experts): one batch, unless the source holds fewer experts than were chosen."""

    @abstractmethod
    def for_token(self, chosen) -> Iterable[tuple[list[int], list[Expert]]]:
        """One decoded token's experts as groups of (indices, experts) computed in turn, each brought
        in as it is reached (an expert cache gives those in memory first while it reads the others,
        or answers with low-bit shadow copies for those not in memory)."""

    @abstractmethod
    def on_vector_kernels(self) -> bool:
        """Whether the vector kernels take every expert matrix, its format and its width (the
        experts may differ in format: `localmix shrink`), found without bringing experts in."""

    @abstractmethod
    def shapes(self) -> set[tuple[int, int]]:
        """The (bits, group size) pairs of the experts' quantized matrices, found without bringing
        experts in."""

    @abstractmethod
    def expert_bytes(self) -> int:
        """The bytes of one expert's weights as a decoded token reads them (the largest expert's),
        found without bringing experts in."""

    @abstractmethod
    def speculate(self, h: np.ndarray, k: int) -> None:
        """A hint from this layer's normed hidden state of one token, routed to k experts per token
        (the call's): the source may start reading the next layer's likely experts (nothing to do
        where all are resident)."""
