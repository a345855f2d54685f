"""CPU kernels (Numba) on MLX-layout packed weights. Each has a plain numpy twin, which the tests
hold it to and which `backend="numpy"` runs instead.

- matvec: one token times a quantized matrix (decoding), without ever forming the float matrix.
  The token's values are first reordered to match the packing (a word holds values j*8 .. j*8+7
  of a group at 4 bits; the reordered vector puts value k of every word side by side), so the
  innermost loop runs over consecutive words with one shift: it vectorizes. Per group it adds
  scale * (q . x) + bias * sum(x).
- dequantize: the float matrix, for a prompt's matrix products (BLAS then does the product, and
  every weight is unpacked once per prompt, not once per token).
float16 scales arrive as their uint16 bits (Numba has no float16 arrays) and are decoded with a
65536-entry table.

These are the first, plain kernels (about 3 GB/s of 4-bit weights on 2 cores here); integer
dot products on int8 activations are the way to llama.cpp's speed.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from localmix.quant.affine import dequantize as dequantize_reference

HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _kernels(bits: int):
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)

    @njit(cache=True, parallel=True, fastmath=True)
    def matvec(x_reordered, group_sums, words, scales, biases, half, group_size, out):
        rows, groups = scales.shape
        words_per_group = group_size // per_word
        for n in prange(rows):
            total = np.float32(0.0)
            for g in range(groups):
                acc = np.float32(0.0)
                for k in range(per_word):
                    shift = np.uint32(bits * k)
                    x0 = (g * per_word + k) * words_per_group
                    w0 = g * words_per_group
                    for j in range(words_per_group):
                        acc += np.float32((words[n, w0 + j] >> shift) & mask) * x_reordered[x0 + j]
                total += half[scales[n, g]] * acc + half[biases[n, g]] * group_sums[g]
            out[n] = total

    @njit(cache=True, parallel=True, fastmath=True)
    def dequantize(words, scales, biases, half, group_size, out):
        rows, groups = scales.shape
        words_per_group = group_size // per_word
        for n in prange(rows):
            for g in range(groups):
                scale, bias = half[scales[n, g]], half[biases[n, g]]
                for j in range(words_per_group):
                    word = words[n, g * words_per_group + j]
                    for k in range(per_word):
                        out[n, g * group_size + j * per_word + k] = (
                            np.float32((word >> np.uint32(bits * k)) & mask) * scale + bias)

    return matvec, dequantize


_MATVEC_4, _DEQUANTIZE_4 = _kernels(4)
_MATVEC_8, _DEQUANTIZE_8 = _kernels(8)
_KERNELS = {4: (_MATVEC_4, _DEQUANTIZE_4), 8: (_MATVEC_8, _DEQUANTIZE_8)}


def matvec(x: np.ndarray, words, scales, biases, bits: int, group_size: int) -> np.ndarray:
    """W @ x for one token x [K] and a quantized W [N, K]."""
    per_word = 32 // bits
    x = np.asarray(x, dtype=np.float32)
    reordered = np.ascontiguousarray(x.reshape(-1, group_size // per_word, per_word).transpose(0, 2, 1)).reshape(-1)
    group_sums = x.reshape(-1, group_size).sum(axis=1, dtype=np.float32)
    out = np.empty(words.shape[0], np.float32)
    _KERNELS[bits][0](reordered, group_sums, words, scales.view(np.uint16), biases.view(np.uint16),
                      HALF_TO_FLOAT, group_size, out)
    return out


def dequantize(words, scales, biases, bits: int, group_size: int) -> np.ndarray:
    out = np.empty((words.shape[0], words.shape[1] * 32 // bits), np.float32)
    _KERNELS[bits][1](words, scales.view(np.uint16), biases.view(np.uint16), HALF_TO_FLOAT, group_size, out)
    return out


def matvec_reference(x, words, scales, biases, bits, group_size) -> np.ndarray:
    return dequantize_reference(words, scales, biases, bits, group_size) @ np.asarray(x, dtype=np.float32)
