"""Activations quantized once per product: int16 values in the order the kernels read them, one scale
per weight group, and the sums that centre the weights.

int16 and not llama.cpp's int8: on the mini model int8 activations alone move the logits by 6-8% of
their range (KL 0.0013-0.0016 from the exact product, half of what 8-bit weights cost), int16 by
3.5e-5 (scripts/activation_precision.py), and the integer product is the same price per weight byte.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from localmix.kernels.features import chunk_values, values_per_lane


@njit(inline="always", fastmath=True)
def _quantize_token(x, t, bits, group_size, xq, dx, sums, sums_by_token):
    K = x.shape[1]
    per_lane = values_per_lane(bits)
    per_chunk = 16 * per_lane
    middle = np.float32(1 << (bits - 1))
    values = np.empty(K, np.int16)  # natural order first: these loops vectorize
    for g in range(K // group_size):
        start = g * group_size
        peak, total = np.float32(0.0), np.float32(0.0)
        for k in range(start, start + group_size):
            peak = max(peak, abs(x[t, k]))
            total += x[t, k]
        d = peak / np.float32(32767.0) if peak > 0 else np.float32(1.0)
        inverse = np.float32(1.0) / d
        rounded = 0
        for k in range(start, start + group_size):
            v = np.int16(min(np.float32(32767.0), max(np.float32(-32767.0), np.rint(x[t, k] * inverse))))
            values[k] = v
            rounded += np.int32(v)
        dx[t, g] = d
        sums[g, 0, t] = sums_by_token[t, 0, g] = total
        sums[g, 1, t] = sums_by_token[t, 1, g] = middle * (total - d * np.float32(rounded))
    # value (lane, slot) of chunk c goes to slot * 32 + (c % 2) * 16 + lane of c's pair of chunks:
    # every lane's value j side by side, for a 32-byte chunk and for a 64-byte one (two chunks)
    for chunk in range(xq.shape[1] // per_chunk):
        base, pair = chunk * per_chunk, (chunk // 2) * 2 * per_chunk + (chunk % 2) * 16
        for slot in range(per_lane):
            for lane in range(16):
                k = base + lane * per_lane + slot
                xq[t, pair + slot * 32 + lane] = values[k] if k < K else 0


@njit(cache=True, nogil=True, fastmath=True)
def _quantize_serial(x, bits, group_size, xq, dx, sums, sums_by_token):
    """One token (or the few rows of a decoded token's experts): starting threads costs more."""
    for t in range(x.shape[0]):
        _quantize_token(x, t, bits, group_size, xq, dx, sums, sums_by_token)


# The format as constants: prompts quantize three times faster than with runtime values. The
# one-row and the many-row variants compile the same body, so a row comes out the same from both:
# an expert cache that splits a prompt's experts into batches changes no logit. They are two
# definitions, not one made twice with another `parallel`: Numba's cache tells functions apart by
# their code and the closure values they read, not by their options, and handed whichever variant
# it had compiled first to the other (prompts quantized on one thread, or each row started threads).
def _quantizer(bits: int, group_size: int):
    @njit(cache=True, nogil=True, fastmath=True)
    def quantize(x, xq, dx, sums, sums_by_token):
        for t in range(x.shape[0]):
            _quantize_token(x, t, bits, group_size, xq, dx, sums, sums_by_token)

    return quantize


def _parallel_quantizer(bits: int, group_size: int):
    @njit(cache=True, nogil=True, fastmath=True, parallel=True)
    def quantize_rows(x, xq, dx, sums, sums_by_token):
        for t in prange(x.shape[0]):
            _quantize_token(x, t, bits, group_size, xq, dx, sums, sums_by_token)

    return quantize_rows


_QUANTIZERS = {(bits, group_size, parallel): (_parallel_quantizer if parallel else _quantizer)(bits, group_size)
               for bits in (2, 3, 4, 8) for group_size in (32, 64, 128) for parallel in (False, True)}


@njit(cache=True, nogil=True)
def _activation_arrays(T, K, bits, group_size):
    """The arrays of QuantizedActivations for T rows of K values: values in whole 64-byte blocks
    of weights (two 32-byte chunks), zero-padded."""
    per_block = 2 * chunk_values(bits)
    return (np.empty((T, (K + per_block - 1) // per_block * per_block), np.int16),
            np.empty((T, K // group_size), np.float32),
            np.empty((K // group_size, 2, T), np.float32),
            np.empty((T, 2, K // group_size), np.float32))


@njit(cache=True, nogil=True)
def _quantized(x, bits, group_size):
    """quantize_activations' arrays, for kernels that call it."""
    xq, dx, sums, sums_by_token = _activation_arrays(x.shape[0], x.shape[1], bits, group_size)
    _quantize_serial(x, bits, group_size, xq, dx, sums, sums_by_token)
    return xq, dx, sums, sums_by_token


class QuantizedActivations(NamedTuple):
    values: np.ndarray         # int16 [T, K rounded up to 64 bytes of weights], in kernel order
    scales: np.ndarray         # float32 [T, groups]: x ~= scale * value within a group
    sums: np.ndarray           # float32 [groups, 2, T]: the sum of x, and m (sum x - sum x~), see below;
                               # token-minor, so that a tile of tokens loads them as one vector
    sums_by_token: np.ndarray  # float32 [T, 2, groups]: the same, groups side by side for one token


def quantize_activations(x: np.ndarray, bits: int, group_size: int) -> QuantizedActivations:
    """x [T, K] as int16 values v with one scale dx per weight group: x~ = dx v.

    A group's product is then s dx (q . v) + b sum(x) + s m (sum(x) - sum(x~)), with m = 2^(bits-1)
    the middle of the weights' range: that equals s (q - m) . x~ + (b + m s) sum(x), whose rounding
    error is s |q - m| dx / 2 per value instead of s q dx / 2: weights are centred, not all positive.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    arrays = QuantizedActivations(*_activation_arrays(x.shape[0], x.shape[1], bits, group_size))
    _QUANTIZERS[bits, group_size, x.shape[0] > 1](x, *arrays)
    return arrays
