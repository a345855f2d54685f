"""Affine group quantization in MLX's layout: the math, in plain numpy.

A matrix [rows, cols] is cut along its input dimension (cols) into groups of group_size values.
Each group stores a float16 scale and bias and one unsigned `bits`-bit integer q per value, and
stands for scale * q + bias. The integers are packed into little-endian uint32 words, the first
value in the lowest bits: exactly what mx.quantize returns, so mx.quantized_matmul reads our files
as they are, and so do our own kernels.
"""

from __future__ import annotations

import numpy as np

BITS = (2, 3, 4, 8)  # what localmix holds and its kernels run
GROUP_SIZES = (32, 64, 128)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] integers in [0, 2^bits) -> [rows, cols * bits / 32] uint32 words: a little-endian
    stream of bits-bit values (3 bits: 8 values in 3 bytes, a value may span two words)."""
    if 32 % bits:
        stream = ((q.astype(np.uint8)[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(q.shape[0], -1)
        return np.packbits(stream, axis=1, bitorder="little").view(np.uint32)
    per_word = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    return np.bitwise_or.reduce(q << shifts, axis=-1)


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack: [rows, words] uint32 -> [rows, words * 32 / bits] uint8."""
    if 32 % bits:
        stream = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1, bitorder="little")
        stream = stream.reshape(words.shape[0], -1, bits)
        return (stream << np.arange(bits, dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    q = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(words.shape[0], -1).astype(np.uint8)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Float32 [rows, cols] from packed words and float16 [rows, cols / group_size] scales, biases."""
    rows = words.shape[0]
    q = unpack(words, bits).reshape(rows, -1, group_size).astype(np.float32)
    w = q * scales.astype(np.float32)[..., None] + biases.astype(np.float32)[..., None]
    return w.reshape(rows, -1)


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    if w.ndim != 2 or w.shape[1] % group_size:
        raise ValueError(f"cannot quantize shape {w.shape} in groups of {group_size}")
    return w.astype(np.float32).reshape(-1, group_size)


def quantize_minmax(w: np.ndarray, bits: int, group_size: int = 64):
    """MLX's rule (mx.quantize): the scale spans the group's range, and the extreme value of
    larger magnitude is represented exactly. Kept as the baseline and for compatibility tests."""
    x = _groups(w, group_size)
    n_bins = np.float32((1 << bits) - 1)
    w_max, w_min = x.max(axis=1), x.min(axis=1)
    mask = np.abs(w_min) > np.abs(w_max)
    scales = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scales = np.where(mask, scales, -scales)
    edge = np.where(mask, w_min, w_max)
    q0 = np.round(edge / scales)
    scales = np.where(q0 != 0, edge / np.where(q0 != 0, q0, 1), scales).astype(np.float32)
    biases = np.where(q0 == 0, np.float32(0), edge).astype(np.float32)
    q = np.clip(np.round((x - biases[:, None]) / scales[:, None]), 0, n_bins)
    return _finish(w.shape, q, scales, biases, bits, group_size)


def quantize(w: np.ndarray, bits: int, group_size: int = 64, importance: np.ndarray | None = None,
             steps: int = 20, fast: bool = True):
    """Error-minimizing affine quantization.

    For each group, try a range of scales around the min/max one; for each, round the values to
    the grid, then refit scale and bias by weighted least squares to the rounded integers (as
    llama.cpp's k-quants do). Keep the fit of least weighted squared error, then round scale and
    bias to float16 and requantize against the rounded values, so the stored integers are the
    best ones for the scale and bias that will actually be used. `importance` ([cols], e.g. the
    mean squared activation of each input) weights the error; uniform without it. fast picks the
    Numba search (quant/search.py) over its numpy twin here.
    """
    x = _groups(w, group_size)
    weight = (np.ones((1, group_size), np.float32) if importance is None
              else importance.astype(np.float32).reshape(-1, group_size))  # [groups per row, group_size]
    if fast:
        from localmix.quant.search import search_scales_numba
        best_scale, best_bias = search_scales_numba(x, weight, bits, steps)
    else:
        best_scale, best_bias = search_scales(x, weight, bits, steps)
    n_bins = (1 << bits) - 1
    scale = best_scale.astype(np.float16).astype(np.float32)
    bias = best_bias.astype(np.float16).astype(np.float32)
    scale = np.where(scale == 0, np.float32(np.finfo(np.float16).tiny), scale)  # a constant group
    q = np.clip(np.round((x - bias[:, None]) / scale[:, None]), 0, n_bins)
    return _finish(w.shape, q, scale, bias, bits, group_size)


def search_scales(x: np.ndarray, weight: np.ndarray, bits: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The search of quantize(), for groups x [G, group_size] with error weights [W, group_size]
    (group g uses row g % W): each group's best float32 scale and bias."""
    weight = np.tile(weight, (x.shape[0] // weight.shape[0], 1))
    n_bins = (1 << bits) - 1
    x_min, x_max = x.min(axis=1), x.max(axis=1)
    span = np.maximum(x_max - x_min, np.float32(1e-12))

    def fit(q):
        """Weighted least squares scale, bias for x ≈ scale * q + bias; falls back to min/max."""
        sw, sq, sqq = weight.sum(1), (weight * q).sum(1), (weight * q * q).sum(1)
        sx, sqx = (weight * x).sum(1), (weight * q * x).sum(1)
        det = sw * sqq - sq * sq
        ok = det > 1e-12 * np.maximum(sw * sqq, 1e-30)
        safe = np.where(ok, det, 1)
        scale = np.where(ok, (sw * sqx - sq * sx) / safe, span / n_bins)
        bias = np.where(ok, (sqq * sx - sq * sqx) / safe, x_min)
        return scale.astype(np.float32), bias.astype(np.float32)

    def error(q, scale, bias):
        return (weight * (q * scale[:, None] + bias[:, None] - x) ** 2).sum(1)

    best_scale, best_bias = span / n_bins, x_min.copy()
    best_err = error(np.clip(np.round((x - x_min[:, None]) / best_scale[:, None]), 0, n_bins), best_scale, best_bias)
    for step in range(steps + 1):
        inv = (n_bins - 1.0 + 2.0 * step / steps) / span  # grids from slightly coarser to finer
        q = np.clip(np.round((x - x_min[:, None]) * inv[:, None]), 0, n_bins)
        scale, bias = fit(q)
        err = error(q, scale, bias)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_bias = np.where(better, bias, best_bias)
    return best_scale, best_bias


def _finish(shape, q, scales, biases, bits, group_size):
    rows = shape[0]
    words = pack(q.reshape(rows, -1).astype(np.uint8), bits)
    groups = shape[1] // group_size
    return (words, scales.astype(np.float16).reshape(rows, groups), biases.astype(np.float16).reshape(rows, groups))
