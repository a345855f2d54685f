"""The small operations between products: routing, RMSNorm, rotary embedding, attention over a float32
or float16 KV cache. Their numpy twins are the reference functions of localmix.model."""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

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


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def _attend(q, keys, values, positions, window, half, out):
    T, heads, dim = q.shape
    group = heads // keys.shape[1]
    scale = np.float32(dim ** -0.5)
    for job in prange(T * heads):
        t, h = job // heads, job % heads
        kv = h // group
        last = positions[t]
        first = max(0, last - window + 1) if window > 0 else 0
        scores = np.empty(last - first + 1, np.float32)
        peak = -np.inf
        for s in range(first, last + 1):
            dot = np.float32(0.0)
            for d in range(dim):
                dot += q[t, h, d] * _as_float(half, keys[s, kv, d])
            scores[s - first] = dot * scale
            peak = max(peak, scores[s - first])
        total = np.float32(0.0)
        for i in range(scores.size):
            scores[i] = np.exp(scores[i] - peak)
            total += scores[i]
        row = out[t, h * dim:(h + 1) * dim]
        row[:] = 0.0
        for s in range(first, last + 1):
            weight = scores[s - first] / total
            for d in range(dim):
                row[d] += weight * _as_float(half, values[s, kv, d])


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
