"""What the kernels run on: the CPU's features (AVX2, FMA, F16C, VNNI) and LOCALMIX_KERNELS,
the formats the vector kernels take, and the sizes they are tuned to (tile, prefetch distance, block,
the rows per tile that the CPU's vector registers hold).

LOCALMIX_KERNELS=plain runs the plain Numba loops even where the CPU has AVX2; LOCALMIX_KERNELS=avx2
runs what a CPU with AVX2 alone would (no VNNI's vpdpwssd); LOCALMIX_KERNELS=avx2-vnni keeps to 256-bit
vectors on a CPU with AVX-512 (the 512-bit kernels were measured on a Zen 5 only, whose 512-bit units
are full width; on other CPUs compare with `localmix bench`). Each is read once, on first use, and is
part of the kernels' cache folder's name (localmix/__init__.py).

A feature the CPU lists is not always one a program may use: LLVM's list already checks that the OS
saves the registers it needs (XCR0), but AMX, which the kernels do not use, Linux also makes a
process ask for (one that does not dies with SIGILL, as llama.cpp's native build did here), and a
virtual machine may list it and fault. `amx_usable` asks and tries a tile in a child process; it
is for reports (scripts/speed_vs_llama.py), not called on the way to a model's first token.

float16 scales arrive as their uint16 bits (Numba has no float16 arrays): the vector path converts
them in LLVM (`fpext half`), the plain path through HALF_TO_FLOAT, a 65536-entry table.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import llvmlite.binding as llvm
from numba.extending import register_jitable


HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
# What the vector kernels run: the stored formats, and 2 bits for the expert cache's shadow copies
# (2-bit groups of 32 are a quarter of a 32-byte chunk, which the kernels do not split: plain path).
FORMATS = [(bits, group_size) for bits in (4, 8) for group_size in (32, 64, 128)] + \
    [(bits, group_size) for bits in (2, 3) for group_size in (64, 128)]
TILE = 4              # tokens multiplied per pass over a weight row in prefill: unpack once, use 4 times
PREFETCH = 8192       # bytes ahead of the row being read: with the hardware prefetcher alone a row
                      # streams at a third of the memory bandwidth here, 8 KiB ahead at 3/4 of it
BLOCK_BYTES = 16384   # weight rows per block in prefill: a block stays in L1 while tiles of tokens pass


_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158
# ldtilecfg [rdi]; tilezero tmm0; tilerelease; ret
_AMX_PROBE = bytes.fromhex("c4e2784907" "c4e27b49c0" "c4e27849c0" "c3")


@functools.cache
def amx_usable() -> bool:
    """Whether AMX's tiles work in this process: Linux (5.16 on) grants them only on request (a
    process that does not ask dies with SIGILL on its first tile instruction), and a virtual machine
    may list them and still fault. So: ask, then configure and zero a tile in a child process."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        if ctypes.CDLL(None).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return runs_in_child(_AMX_PROBE)


def runs_in_child(code: bytes) -> bool:
    """Whether x86-64 machine code (a function of one pointer argument: a zeroed 64-byte tile
    configuration naming palette 1 with one 16 x 64-byte tile) returns normally in a forked child:
    a fault there (SIGILL) ends only the child."""
    import ctypes
    import faulthandler
    import mmap
    try:
        memory = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        memory.write(code)
        function = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.addressof(ctypes.c_char.from_buffer(memory)))
        config = (ctypes.c_uint8 * 64)(1)  # palette 1; tmm0: 16 rows of 64 bytes
        config[16], config[48] = 64, 16
        pid = os.fork()
        if pid == 0:
            faulthandler.disable()  # a fault here is an answer, not a crash to report
            function(ctypes.addressof(config))
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    except (OSError, ValueError):
        return False


@functools.cache
def cpu_features() -> dict:
    return dict(llvm.get_host_cpu_features())


def vector_registers() -> int:
    """The vector registers of the CPU Numba compiles for: 32 with AVX-512 (also for 256-bit code),
    16 with AVX2. A CPU named in NUMBA_CPU_NAME without NUMBA_CPU_FEATURES counts as 16."""
    from numba.core import config
    if config.CPU_NAME and config.CPU_NAME != "host":
        features = {f[1:]: f[0] == "+" for f in (config.CPU_FEATURES or "").split(",") if f}
    else:
        features = cpu_features()
    return 32 if features.get("avx512f", False) else 16


def _kernels_setting() -> str:
    return os.environ.get("LOCALMIX_KERNELS", "")


@functools.cache
def has_vector_kernels() -> bool:
    """Whether this CPU runs the AVX2 kernels (and LOCALMIX_KERNELS=plain does not turn them off)."""
    if _kernels_setting() == "plain":
        return False
    return all(cpu_features().get(f, False) for f in ("avx2", "fma", "f16c"))


def kernel_name() -> str:
    """What runs the quantized products here, in a word: avx512-vnni (prompts' full tiles and most
    formats' decoding in 512-bit vectors, the rest as avx2-vnni), avx2-vnni (256-bit vectors with
    vpdpwssd, VEX or EVEX), avx2 or plain."""
    if not has_vector_kernels():
        return "plain"
    if WIDE_VECTORS:
        return "avx512-vnni"
    return "avx2-vnni" if vnni_instruction() else "avx2"


def vnni_instruction() -> str | None:
    """vpdpwssd (multiply int16 pairs, add them and accumulate: one instruction for pmaddwd and
    paddd) in 256 bits, VEX-encoded (AVX-VNNI) or EVEX (AVX512-VNNI with VL); None without."""
    f = cpu_features()
    if _kernels_setting() == "avx2":
        return None
    if f.get("avxvnni", False):
        return "{vex} vpdpwssd"
    if f.get("avx512vnni", False) and f.get("avx512vl", False):
        return "vpdpwssd"
    return None


@register_jitable
def values_per_lane(bits: int) -> int:
    """Values of a 16-bit lane of unpacked weights: 16 // bits, and 4 for 3 bits (12 of the lane's
    bits: a 32-byte vector of lanes comes from 24 bytes, 64 values, as a 4-bit chunk's)."""
    return 4 if bits == 3 else 16 // bits


@register_jitable
def chunk_values(bits: int) -> int:
    """Values of a chunk: the weights one 256-bit vector of 16-bit lanes holds once unpacked."""
    return 16 * values_per_lane(bits)


# Rows of weights per full tile of prompt tokens: with two, each activation vector loaded serves
# both rows, but the tile then holds 2 x TILE accumulators, 2 x TILE sums and both rows' unpacked
# lanes, which fits in AVX-512's 32 vector registers and not in AVX2's 16 (4-bit prompts' products:
# +30% on a Zen 5 with 32, -10% when compiled for Haswell's 16: scripts/kernel_gops.py).
TILE_ROWS = 2 if vector_registers() == 32 else 1


# Full tiles (2 rows), and one token's rows of most formats (wide_decode), in 512-bit vectors where
# the CPU multiplies int16 pairs in them (AVX512-VNNI, BW) and the kernels may use them (no
# LOCALMIX_KERNELS setting, not a 16-register target): the products' GOPS +10% on a Zen 5
# (scripts/kernel_gops.py), where 512-bit vpdpwssd runs at twice the 256-bit rate. Most of a tile's
# instructions are not multiplications: per 64 values of a row and token, one group's float32
# scaling (convert, multiply, add) against 2 (8-bit) or 4 (4-bit) vpdpwssd, plus unpacking and the
# biases' part. So in 512 bits a tile takes WIDE_TILE tokens: the weights' unpacking, scales and
# biases serve twice as many (4-bit products +7-13%, a 512-token prompt +8% on a Zen 5), though its
# 16 sums and 16 accumulators no longer all fit in registers.
WIDE_TILE = 8
WIDE_VECTORS = (TILE_ROWS == 2 and _kernels_setting() == "" and
              all(cpu_features().get(f, False) for f in ("avx512bw", "avx512vnni")))


@register_jitable
def wide_decode(bits, group_size):
    """Whether one token's row products take 512-bit vectors for this format (with WIDE_VECTORS):
    where a 64-byte chunk holds one or two groups, whose dot products its 256-bit halves give."""
    return group_size * bits >= 256
