"""An expert's file read into a slot: straight into the slot's memory (`pread`, no intermediate
copy and no memory map that the kernel would count against the process), by all the kernels'
threads when the model waits for it, by one thread in the background.
"""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np
from numba import prange, types

from localmix.errors import LocalmixError

_pread = types.ExternalFunction("pread", types.int64(types.int32, types.int64, types.uint64, types.int64))


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
            n = _pread(fd, address + start, end - start, start)
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
