"""Who gets the CPU cores.

Numba's kernels do every quantized product, so with them numpy's BLAS runs on one thread: what is
left for it (routers, attention scores) is small, and a second pool of BLAS threads spinning on
the same cores halved the kernels' speed here (prefill 55 -> 131 tok/s on the mini model when BLAS
is held to one thread). A float checkpoint, which has no quantized products, gives BLAS the threads.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

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



class ThreadTuner:
    """While decoding, keep to the number of kernel threads that decodes fastest now: all of them
    (`most`) or one fewer, measured on the tokens themselves.

    A decoded token is hundreds of short parallel loops, each ending when its slowest thread does.
    When another process takes a core, the thread that shares it is descheduled for whole time
    slices and every loop waits for it, so all the threads can be slower than one fewer (README, "A
    busy laptop"). The mean time per token decides (a mean, not a median: the stalls are the
    cost): now and then (after 32 tokens, then at doubling intervals up to 256 while the choice
    holds; at once when two tokens in a row take twice the recent mean, or when running fewer
    threads the other processes leave the cores idle) a few tokens run with the other count, and
    the faster count stays. On an idle machine that is a few tokens in a few hundred at the slower
    count."""

    PROBE = 2            # tokens timed with the other count
    FIRST_INTERVAL = 32  # tokens before the first probe, and after a change
    LONGEST = 256        # the longest interval between probes
    KEPT = 8             # recent token times kept per count

    def __init__(self, most: int, fixed: bool = False):
        self.most, self.fixed = most, fixed or most < 2  # fixed: the user chose the count
        self.current = self.incumbent = most
        self.times: dict[int, list[float]] = {most: [], most - 1: []}
        self.interval = self.until_probe = self.FIRST_INTERVAL
        self.probing = self.slow = 0
        self.used: dict[int, int] = {most: 0, most - 1: 0}  # tokens decoded with each count
        self.sample = cpu_times()

    def _use(self, threads: int) -> None:
        self.current = threads
        numba.set_num_threads(threads)

    def start(self) -> None:
        """Decoding starts in this thread (Numba's thread count is per calling thread). Where
        other processes kept at least half a core busy since the last start (or since loading),
        it starts with one thread fewer, and the tokens then say whether that holds."""
        if self.fixed:
            return
        others, self.sample = cores_used_by_others(self.sample), cpu_times()
        if others is not None and others >= 0.5 and self.current == self.most and not self.probing:
            self.incumbent = self.most - 1
            self.until_probe = self.interval
            self.current = self.most - 1
        numba.set_num_threads(self.current)

    def record(self, seconds: float) -> None:
        """One decoded token took `seconds` with `current` threads."""
        if self.fixed:
            return
        self.used[self.current] += 1
        times = self.times[self.current]
        self.slow = self.slow + 1 if len(times) >= 4 and seconds > 2 * statistics.fmean(times) else 0
        times.append(seconds)
        del times[:-self.KEPT]
        if self.probing:
            self.probing -= 1
            if not self.probing:  # back to the faster count
                best = min(self.times, key=lambda n: statistics.fmean(self.times[n]))
                self.interval = self.FIRST_INTERVAL if best != self.incumbent else min(2 * self.interval, self.LONGEST)
                self.until_probe = self.interval
                self._use(best)
            return
        self.until_probe -= 1
        if self.current < self.most and self.used[self.current] % 8 == 0:
            # Fewer threads are not slowed when the other process stops: the CPU's idle time says so.
            others, self.sample = cores_used_by_others(self.sample), cpu_times()
            if others is not None and others < 0.5:
                self.until_probe = 0
        if self.until_probe <= 0 or self.slow >= 2:
            if self.slow >= 2:  # the load changed: the figures from before say nothing now
                times[:] = times[-2:]
            self.slow = 0
            self.incumbent = self.current
            other = self.most - 1 if self.current == self.most else self.most
            self.times[other] = []  # its old figures may be from another load
            self.probing = self.PROBE
            self._use(other)

    def timed(self, responses):
        """The responses of a generation, each token's model call and sampling timed (not the
        prompt's, nor the caller's time between tokens)."""
        if self.fixed:
            yield from responses
            return
        numba.set_num_threads(self.most)  # the prompt: long parallel loops, which the stalls cost little
        responses = iter(responses)
        first = True
        while True:
            start = time.perf_counter()
            try:
                response = next(responses)
            except StopIteration:
                return
            if first:
                self.start()
            else:
                self.record(time.perf_counter() - start)
            first = False
            yield response


def cpu_times() -> tuple[float, float, float] | None:
    """(wall seconds, CPU seconds all processes ran, CPU seconds this one ran); None off Linux."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return time.monotonic(), busy, own.user + own.system


def cores_used_by_others(since) -> float | None:
    """Cores that other processes kept busy on average since `since` (a cpu_times()); None if not
    known or the window is too short to say (under 0.1 s: the clock ticks are 10 ms)."""
    now = cpu_times()
    if since is None or now is None or now[0] - since[0] < 0.1:
        return None
    return max(0.0, (now[1] - since[1]) - (now[2] - since[2])) / (now[0] - since[0])
