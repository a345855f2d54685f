"""The experts' feed-forward: SwiGLU, and every routed expert of a layer in two passes of products."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from localmix.kernels.exp import exp32
from localmix.kernels.products import Job, run_jobs


@njit(inline="always")
def _swiglu_row(gate_up, t, out):
    N = out.shape[1]
    for n in range(N):
        g = gate_up[t, n]
        out[t, n] = g / (np.float32(1.0) + exp32(-g)) * gate_up[t, N + n]


# Not fastmath: the one-row and many-row variants must round alike (see _quantizer); exp32 is
# vectorized all the same. Two definitions, not one compiled twice with another `parallel`: Numba's
# cache keys a function by its code, not its options, and gave both the variant compiled first.
@njit(cache=True, nogil=True)
def _swiglu_serial(gate_up):
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    for t in range(gate_up.shape[0]):
        _swiglu_row(gate_up, t, out)
    return out


@njit(cache=True, nogil=True, parallel=True)
def _swiglu_parallel(gate_up):
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    for t in prange(gate_up.shape[0]):
        _swiglu_row(gate_up, t, out)
    return out


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up for [T, 2 * ffn] holding gate then up."""
    return (_swiglu_parallel if gate_up.shape[0] > 1 else _swiglu_serial)(gate_up)


def swiglu_reference(gate_up):
    gate, up = np.split(gate_up, 2, axis=1)
    return gate / (1.0 + np.exp(-gate)) * up


def experts_ffn(x: np.ndarray, experts: list, counts: list[int], vector: bool | None = None) -> np.ndarray:
    """w2(silu(w1 x) * w3 x) of each expert over its run of rows of x ([sum(counts), hidden]: the
    first counts[0] rows go to experts[0], and so on). The inputs are quantized once, then one pass
    multiplies every expert's w1 and w3, one more every w2: two starts of the threads per layer."""
    starts = np.cumsum([0] + list(counts))
    active = [(e, int(s), c) for e, s, c in zip(experts, starts, counts) if c]
    ffn = experts[0].w1.words.shape[0]
    gate_up = np.empty((x.shape[0], 2 * ffn), np.float32)
    run_jobs(x, [Job(e.w1, s, c, s, 0) for e, s, c in active] + [Job(e.w3, s, c, s, ffn) for e, s, c in active],
             gate_up, vector)
    out = np.empty((x.shape[0], experts[0].w2.words.shape[0]), np.float32)
    run_jobs(swiglu(gate_up), [Job(e.w2, s, c, s, 0) for e, s, c in active], out, vector)
    return out
