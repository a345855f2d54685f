"""An expert's file read into a slot: straight into the slot's memory (`pread`, no intermediate
copy and no memory map that the kernel would count against the process), by all the kernels'
threads when the model waits for it (a prompt's batch), by one thread otherwise: a reader of a
decoded token's misses (two at once, while the token's other experts compute) or a prefetch.

Where the system allows, the reads bypass the page cache (O_DIRECT): the slot holds the expert,
and a second copy in the page cache is memory the budget does not see, which a memory limit
charges all the same (a laptop's RAM, a cgroup). Measured inside memory cgroups (README, "A
laptop's memory"): the mini model in 1 GiB 20.9 -> 38.2 tok/s, Mixtral 8x7B's shape in 12 GiB
0.55 -> 0.76, its peak 12.0 -> 10.5 GiB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np
from numba import prange, types

from localmix.errors import LocalmixError
from localmix.store import align

_pread = types.ExternalFunction("pread", types.int64(types.int32, types.int64, types.uint64, types.int64))
PIECE = 4 << 20  # bytes per pread: a disk is read at ~2 GB/s here in 4 MiB requests, 1.4 in 50 MB ones
ALIGN = 4096     # O_DIRECT's alignment of memory, offsets and sizes


@numba.njit(parallel=True, nogil=True, cache=True)
def read_parallel(fd: int, address: int, size: int, parts: int) -> int:
    """Read a file's first `size` bytes to memory at `address` with `parts` threads, one piece each;
    returns the bytes read. One thread copies from the page cache at about 4-6 GB/s here, two at
    about 9-10: a miss, which the model waits for, is read by all the kernels' threads."""
    step = ((size + parts - 1) // parts + 4095) // 4096 * 4096
    got = np.zeros(parts, np.int64)
    for i in prange(parts):
        start, end = i * step, min(size, (i + 1) * step)
        while start < end:
            n = _pread(fd, address + start, min(end - start, PIECE), start)
            if n <= 0:
                break
            got[i] += n
            start += n
    return got.sum()


def read_into(path: Path, out: np.ndarray, size: int, parallel: bool = False) -> None:
    """Read the file's `size` bytes into `out` (a slot's uint8 row): with the kernels' threads
    (`parallel`, for a miss the model waits for) or in this thread alone (in the background, beside
    the kernels). A file that is not a regular one, cannot be read or is short: one-line error."""
    if path.exists() and not path.is_file():  # a FIFO would block the read for ever
        raise LocalmixError(f"{path}: not a regular file; run `localmix verify` on this model")
    try:
        fd = _open_direct(path, out, size)
        if fd is not None:  # whole aligned blocks, the last one past the end of the file
            blocks = align(size, ALIGN)
            try:
                got = min(size, read_parallel(fd, out.ctypes.data, blocks, numba.get_num_threads()) if parallel
                          else _read_pieces(fd, memoryview(out)[:blocks]))
            finally:
                os.close(fd)
        else:
            with open(path, "rb", buffering=0) as f:
                if parallel and hasattr(os, "pread"):
                    got = read_parallel(f.fileno(), out.ctypes.data, size, numba.get_num_threads())
                else:
                    got = f.readinto(memoryview(out)[:size])
    except OSError as e:
        raise LocalmixError(f"{path}: cannot read ({e.strerror}); run `localmix verify` on this model") from None
    if got != size:
        raise LocalmixError(f"{path}: truncated ({got} bytes, expected {size}); run `localmix verify` on "
                            f"this model")


def _read_pieces(fd: int, out: memoryview) -> int:
    """A background read in this thread alone, PIECE bytes a call (no Numba: a parallel region
    started from a second thread contends with the kernels' own)."""
    got = 0
    while got < len(out):
        n = os.preadv(fd, [out[got:got + PIECE]], got)
        if n <= 0:
            break
        got += n
    return got


def _open_direct(path: Path, out: np.ndarray, size: int) -> int | None:
    """A descriptor reading past the page cache, where the system, the file system and the slot
    allow it (aligned memory with room for whole blocks); else None: buffered reads."""
    if not hasattr(os, "O_DIRECT") or out.ctypes.data % ALIGN or out.size < align(size, ALIGN):
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:  # tmpfs and some others refuse O_DIRECT: the error, if any, comes from open() below
        return None
