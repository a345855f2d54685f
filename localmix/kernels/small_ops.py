"""The small operations between products: routing, RMSNorm, rotary embedding, attention over a float32
or float16 KV cache. Their numpy twins are the reference functions of localmix.model."""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from localmix.kernels.exp import exp32
from localmix.kernels.features import HALF_TO_FLOAT


@njit(cache=True, nogil=True)
def route_tokens(x, router, k, renormalize, bias):
    """model.route_tokens in one call: softmax over the router's logits plus its bias (zeros where
    the router has none), the k largest, most probable first (the lower index first on ties, as a
    stable sort puts them), renormalized where asked."""
    T, E = x.shape[0], router.shape[0]
    chosen = np.empty((T, k), np.int64)
    weights = np.empty((T, k), np.float32)
    probs = np.empty(E, np.float32)
    for t in range(T):
        for e in range(E):
            total = np.float32(0.0)
            for d in range(x.shape[1]):
                total += x[t, d] * router[e, d]
            probs[e] = total + bias[e]
        peak = probs.max()
        probs = np.exp(probs - peak)
        probs /= probs.sum()
        taken = np.zeros(E, np.bool_)
        for slot in range(k):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or probs[e] > probs[best]):
                    best = e
            taken[best] = True
            chosen[t, slot], weights[t, slot] = best, probs[best]
        if renormalize:
            weights[t] /= weights[t].sum()
    return chosen, weights


@njit(cache=True, nogil=True)
def rms_norm(x, weight, eps):
    out = np.empty_like(x)
    T, D = x.shape
    for t in range(T):
        total = np.float32(0.0)
        for d in range(D):
            total += x[t, d] * x[t, d]
        inverse = np.float32(1.0) / np.sqrt(total / np.float32(D) + np.float32(eps))
        for d in range(D):
            out[t, d] = weight[d] * (x[t, d] * inverse)
    return out


@njit(cache=True, nogil=True)
def apply_rope(x, positions, inv_freq):
    """Rotate [T, heads, head_dim] in place, in the rotate-half convention."""
    T, heads, dim = x.shape
    half = dim // 2
    for t in range(T):
        for i in range(half):
            angle = np.float32(positions[t]) * inv_freq[i]
            cos, sin = np.cos(angle), np.sin(angle)
            for h in range(heads):
                a, b = x[t, h, i], x[t, h, i + half]
                x[t, h, i] = a * cos - b * sin
                x[t, h, i + half] = b * cos + a * sin
    return x


def _as_float(table, value):
    pass


@overload(_as_float)
def _as_float_overload(table, value):
    if isinstance(value, types.Float):
        return lambda table, value: value
    return lambda table, value: table[value]  # float16 bits


@njit(inline="always")
def _float_rows(cache, half, first, n, kv, out):
    """Rows first..first+n of one KV head of a cache as float32 in out[:n]: contiguous, so that the
    loops over them vectorize (a strided view of the cache does not)."""
    for j in range(n):
        for d in range(out.shape[1]):
            out[j, d] = _as_float(half, cache[first + j, kv, d])


QUERY_BLOCK = 16  # query tokens per job: with the heads that share a KV head, 64 rows of scores
KEY_BLOCK = 64    # keys (or values) converted to float32 at a time: 16 KiB at 64 values a head, in L1
TRANSPOSED_ROWS = 16  # from this many rows (queries) of a job, values are transposed for dot products:
                      # a 2048-token prompt's attention +20%; below it, a decoded token's -25%


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _attend(q, keys, values, positions, window, half, out):
    """Attention blocked like a matrix product, so that long prompts do not make it dominate: a job
    is a block of query tokens and one KV head. Each block of keys is converted to float32 once for
    all its queries (every token's heads of that KV head), then each row's softmax (exp32), then
    each block of values: for many rows (a prompt) transposed to [dim, keys], so that every inner
    loop is a dot product that LLVM vectorizes with no store per multiply-add (2.6 times the GMAC/s
    of a job per query head); for a decoded token's few rows, added row by row."""
    T, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    scale = np.float32(dim ** -0.5)
    blocks = (T + QUERY_BLOCK - 1) // QUERY_BLOCK
    for job in prange(blocks * kv_heads):
        t0, kv = (job // kv_heads) * QUERY_BLOCK, job % kv_heads
        t1 = min(T, t0 + QUERY_BLOCK)
        rows = (t1 - t0) * group  # row r: token t0 + r // group, head kv * group + r % group
        lo, hi = positions[t0], positions[t0]
        for t in range(t0, t1):
            first = max(0, positions[t] - window + 1) if window > 0 else 0
            lo, hi = min(lo, first), max(hi, positions[t])
        span = hi - lo + 1
        queries = np.empty((rows, dim), np.float32)
        for r in range(rows):
            for d in range(dim):
                queries[r, d] = q[t0 + r // group, kv * group + r % group, d] * scale
        scores = np.zeros((rows, span), np.float32)
        block = np.empty((KEY_BLOCK, dim), np.float32)
        for s0 in range(lo, hi + 1, KEY_BLOCK):
            n = min(KEY_BLOCK, hi + 1 - s0)
            _float_rows(keys, half, s0, n, kv, block)
            for r in range(rows):
                for j in range(n):
                    dot = np.float32(0.0)
                    for d in range(dim):
                        dot += queries[r, d] * block[j, d]
                    scores[r, s0 - lo + j] = dot
        for r in range(rows):  # softmax over each row's visible keys; the rest weigh 0
            last = positions[t0 + r // group]
            first = max(0, last - window + 1) if window > 0 else 0
            peak = -np.inf
            for s in range(first, last + 1):
                peak = max(peak, scores[r, s - lo])
            total = np.float32(0.0)
            for s in range(lo, hi + 1):
                visible = first <= s <= last
                weight = exp32(scores[r, s - lo] - peak) if visible else np.float32(0.0)
                scores[r, s - lo] = weight
                total += weight
            for s in range(lo, hi + 1):
                scores[r, s - lo] /= total
        mixed = np.zeros((rows, dim), np.float32)
        values_block = np.empty((dim, KEY_BLOCK), np.float32)
        for s0 in range(lo, hi + 1, KEY_BLOCK):
            n = min(KEY_BLOCK, hi + 1 - s0)
            if rows >= TRANSPOSED_ROWS:  # a prompt: values transposed once, a dot product over keys
                for j in range(n):
                    for d in range(dim):
                        values_block[d, j] = _as_float(half, values[s0 + j, kv, d])
                for r in range(rows):
                    weights = scores[r, s0 - lo:s0 - lo + n]
                    for d in range(dim):
                        total = np.float32(0.0)
                        for j in range(n):
                            total += weights[j] * values_block[d, j]
                        mixed[r, d] += total
            else:  # decoding's few rows: each value row added to each row's sum, nothing transposed
                _float_rows(values, half, s0, n, kv, block)
                for r in range(rows):
                    for j in range(n):
                        weight = scores[r, s0 - lo + j]
                        if weight != 0:
                            for d in range(dim):
                                mixed[r, d] += weight * block[j, d]
        for r in range(rows):
            h = kv * group + r % group
            out[t0 + r // group, h * dim:(h + 1) * dim] = mixed[r]


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, positions: np.ndarray,
           sliding_window: int | None) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v over the visible keys, for q [T, heads, dim] and a float32 or
    float16 cache [length, kv_heads, dim]; each KV head serves its group of query heads in place.
    Returns [T, heads * dim]."""
    T, heads, dim = q.shape
    out = np.empty((T, heads * dim), np.float32)
    _attend(q, *kernel_cache(keys, values), np.asarray(positions, np.int64), sliding_window or 0, HALF_TO_FLOAT, out)
    return out


def kernel_cache(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A KV cache as the kernels take it: float16 as its uint16 bits (Numba has no float16)."""
    if keys.dtype == np.float16:
        return keys.view(np.uint16), values.view(np.uint16)
    return keys, values
