"""The scale search of quantize() as a Numba kernel: the numpy twin (affine.search_scales) makes
some twenty passes over the whole tensor; this makes them over one group at a time, in registers,
on every core. Same algorithm, float32 like its twin; the tests check the two against each other."""

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def _search(x, weight, bits, steps, out_scale, out_bias):
    groups, size = x.shape
    n_bins = (1 << bits) - 1
    for g in prange(groups):
        w = weight[g % weight.shape[0]]
        lo, hi = x[g, 0], x[g, 0]
        for i in range(size):
            lo = min(lo, x[g, i])
            hi = max(hi, x[g, i])
        span = max(hi - lo, np.float32(1e-12))
        best_scale = np.float32(span / n_bins)
        best_bias = lo
        best_err = np.float32(0.0)
        for i in range(size):
            q = min(max(np.rint((x[g, i] - lo) / best_scale), 0), n_bins)
            best_err += w[i] * (q * best_scale + best_bias - x[g, i]) ** 2
        for step in range(steps + 1):
            inv = np.float32((n_bins - 1.0 + 2.0 * step / steps) / span)
            sw = sq = sqq = sx = sqx = np.float32(0.0)
            for i in range(size):
                q = min(max(np.rint((x[g, i] - lo) * inv), 0), n_bins)
                sw += w[i]
                sq += w[i] * q
                sqq += w[i] * q * q
                sx += w[i] * x[g, i]
                sqx += w[i] * q * x[g, i]
            det = sw * sqq - sq * sq
            if det > 1e-12 * max(sw * sqq, 1e-30):
                scale = np.float32((sw * sqx - sq * sx) / det)
                bias = np.float32((sqq * sx - sq * sqx) / det)
            else:
                scale, bias = np.float32(span / n_bins), lo
            err = np.float32(0.0)
            for i in range(size):
                q = min(max(np.rint((x[g, i] - lo) * inv), 0), n_bins)
                err += w[i] * (q * scale + bias - x[g, i]) ** 2
            if err < best_err:
                best_err, best_scale, best_bias = err, scale, bias
        out_scale[g] = best_scale
        out_bias[g] = best_bias


def search_scales_numba(x: np.ndarray, weight: np.ndarray, bits: int, steps: int):
    scale = np.empty(x.shape[0], np.float32)
    bias = np.empty(x.shape[0], np.float32)
    _search(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(weight, np.float32), bits, steps, scale, bias)
    return scale, bias
