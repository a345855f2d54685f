"""warm_up: the kernels compiled (or loaded from Numba's cache) before a model's first token, timed, so
that a first start can say why it is slow."""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from localmix.kernels.experts import swiglu
from localmix.kernels.features import TILE, chunk_values
from localmix.kernels.products import matmul
from localmix.kernels.small_ops import apply_rope, attend, rms_norm, route_tokens


class _Packed(NamedTuple):
    words: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int


def warm_up(shapes, vector: bool | None = None) -> float:
    """Compile (or load from Numba's cache) the kernels for these (bits, group_size) pairs; returns
    the seconds it took, so a first start can say why it is slow."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for bits, group_size in sorted(set(shapes)):
        n = max(group_size, chunk_values(bits)) * 2
        words = rng.integers(0, 2**32, (4, n * bits // 32), dtype=np.uint32)
        scales = np.ones((4, n // group_size), np.float16)
        for tokens in (1, TILE + 1):  # decoding and prompts run different variants
            matmul(np.ones((tokens, n), np.float32), _Packed(words, scales, scales, bits, group_size), vector)
    one = np.ones((1, 1), np.float32)
    swiglu(np.ones((1, 2), np.float32))
    swiglu(np.ones((2, 2), np.float32))
    rms_norm(one, one[0], np.float32(1e-5))
    route_tokens(np.ones((1, 2), np.float32), np.ones((2, 2), np.float32), 1, True, np.zeros(2, np.float32))
    apply_rope(np.ones((1, 1, 2), np.float32), np.zeros(1, np.int64), one[0])
    for dtype in (np.float32, np.float16):
        cache = np.ones((1, 1, 2), dtype)  # [length, kv_heads, dim]
        attend(np.ones((1, 1, 2), np.float32), cache, cache, np.zeros(1, np.int64), None)
    return time.perf_counter() - start
