"""What the kernels run on: the CPU's features (AVX2, FMA, F16C, VNNI) and LOCALMIX_KERNELS, the
formats the vector kernels take, and the sizes they are tuned to (tile, prefetch distance, block).

LOCALMIX_KERNELS=plain runs the plain Numba loops even where the CPU has AVX2; LOCALMIX_KERNELS=avx2
leaves VNNI's vpdpwssd out. Both are read once, on first use.

float16 scales arrive as their uint16 bits (Numba has no float16 arrays): the vector path converts
them in LLVM (`fpext half`), the plain path through HALF_TO_FLOAT, a 65536-entry table.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import llvmlite.binding as llvm


HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
# What the vector kernels run: the stored formats, and 2 bits for the expert cache's shadow copies
# (2-bit groups of 32 are a quarter of a 32-byte chunk, which the kernels do not split: plain path).
FORMATS = [(bits, group_size) for bits in (4, 8) for group_size in (32, 64, 128)] + [(2, 64), (2, 128)]
TILE = 4              # tokens multiplied per pass over a weight row in prefill: unpack once, use 4 times
PREFETCH = 8192       # bytes ahead of the row being read: with the hardware prefetcher alone a row
                      # streams at a third of the memory bandwidth here, 8 KiB ahead at 3/4 of it
BLOCK_BYTES = 16384   # weight rows per block in prefill: a block stays in L1 while tiles of tokens pass


@functools.cache
def cpu_features() -> dict:
    return dict(llvm.get_host_cpu_features())


@functools.cache
def has_vector_kernels() -> bool:
    """Whether this CPU runs the AVX2 kernels (and LOCALMIX_KERNELS=plain does not turn them off)."""
    if os.environ.get("LOCALMIX_KERNELS", "") == "plain":
        return False
    return all(cpu_features().get(f, False) for f in ("avx2", "fma", "f16c"))


def vnni_instruction() -> str | None:
    """vpdpwssd (multiply int16 pairs, add them and accumulate: one instruction for pmaddwd and
    paddd) in 256 bits, VEX-encoded (AVX-VNNI) or EVEX (AVX512-VNNI with VL); None without."""
    f = cpu_features()
    if os.environ.get("LOCALMIX_KERNELS", "") == "avx2":
        return None
    if f.get("avxvnni", False):
        return "{vex} vpdpwssd"
    if f.get("avx512vnni", False) and f.get("avx512vl", False):
        return "vpdpwssd"
    return None


def values_per_lane(bits: int) -> int:
    return 16 // bits
