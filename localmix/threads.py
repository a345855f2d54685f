"""Who gets the CPU cores.

Numba's kernels do every quantized product, so with them numpy's BLAS runs on one thread: what is
left for it (routers, attention scores) is small, and a second pool of BLAS threads spinning on
the same cores halved the kernels' speed here (prefill 55 -> 131 tok/s on the mini model when BLAS
is held to one thread). A float checkpoint, which has no quantized products, gives BLAS the threads.
"""

from __future__ import annotations

import os
import sys

import numba
from threadpoolctl import threadpool_limits

from localmix.errors import LocalmixError

_blas_limit = None  # kept alive: the limit holds while the object does


def physical_cores() -> int:
    """Cores, not hardware threads: two threads on one core share its vector units."""
    try:
        if sys.platform == "darwin":
            import subprocess
            return int(subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True,
                                      text=True, check=True).stdout)
        cores = set()
        with open("/proc/cpuinfo") as f:
            physical = None
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
        usable = len(os.sched_getaffinity(0))
        return max(1, min(len(cores) or usable, usable))
    except (OSError, ValueError, AttributeError, ImportError):
        return os.cpu_count() or 1


def use_threads(threads: int | None, quantized: bool) -> int:
    """Run the kernels on `threads` threads (default: the physical cores); returns the number."""
    global _blas_limit
    most = numba.config.NUMBA_NUM_THREADS
    threads = threads if threads is not None else min(physical_cores(), most)
    if not 1 <= threads <= most:
        raise LocalmixError(f"--threads must be between 1 and {most} (the CPUs this process may use), got {threads}")
    numba.set_num_threads(threads)
    _blas_limit = threadpool_limits(1 if quantized else threads, user_api="blas")
    return threads
