"""Products of activations with packed (MLX-layout) quantized matrices: a batch of matrices per call,
each over its own rows of the activations, on the vector kernel (localmix.kernels.llvm_rows: AVX2, with
or without VNNI) or the plain Numba loops (other CPUs, LOCALMIX_KERNELS=plain). All read the same
bytes and give the same integer sums, and the tests run all three; matmul_reference is the numpy
twin they are held to. Also dequantize, for embedding rows.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from localmix import kernels
from localmix.kernels.activations import QuantizedActivations, quantize_activations
from localmix.kernels.features import (BLOCK_BYTES, FORMATS, HALF_TO_FLOAT, TILE, TILE_ROWS, WIDE_TILE, WIDE_VECTORS,
                                       chunk_values, values_per_lane, wide_decode)
from localmix.kernels.llvm_rows import row_products
from localmix.quant.affine import dequantize as dequantize_reference


# A call multiplies one set of quantized activations by a batch of matrices into one output
# array: q, k and v side by side, or every routed expert's w1 and w3, each over its own rows. The
# threads start once per call and share the rows of all the matrices. Jobs travel to the vector
# kernel as a table of addresses, one row each:
W, S, B, W_STRIDE, S_STRIDE, UNITS, X_ROW, TOKENS, OUT_ROW, OUT_COL, ROWS, BLOCK = range(12)


class Job(NamedTuple):
    matrix: object  # a QuantizedMatrix (words, scales, biases, bits, group_size)
    x_row: int      # first activation row
    tokens: int     # activation rows
    out_row: int    # where the result goes in the output array
    out_col: int


def matrix_row(m) -> list[int]:
    """A matrix's part of its job's table row (addresses, strides, sizes); kept on the matrix,
    which never moves, so that decoding does not work it out again for every token."""
    cached = getattr(m, "addresses", None)
    if cached is None:
        rows, row_bytes = m.words.shape[0], m.words.strides[0]
        cached = [0] * 12
        cached[W], cached[S], cached[B] = (a.__array_interface__["data"][0] for a in (m.words, m.scales, m.biases))
        cached[W_STRIDE], cached[S_STRIDE] = row_bytes, m.scales.strides[0]
        cached[UNITS] = row_bytes * 8 // m.bits // max(m.group_size, chunk_values(m.bits))
        cached[ROWS], cached[BLOCK] = rows, max(1, BLOCK_BYTES // row_bytes)
        if not isinstance(m, tuple):
            m.addresses = cached
    return cached


@njit(cache=True, nogil=True, parallel=True)
def _vector_matmul(table, xv, xd, xs, xt, out, bits, group_size):
    # Blocks of about 16 KiB of weight rows, and in each, tiles of tokens over the block's rows:
    # the block stays in L1 while each tile's activations are read once per block, not per row.
    count = 0
    for j in range(table.shape[0]):
        count += (table[j, ROWS] + table[j, BLOCK] - 1) // table[j, BLOCK]
    blocks = np.empty((count, 3), np.int64)
    i = 0
    for j in range(table.shape[0]):
        for first in range(0, table[j, ROWS], table[j, BLOCK]):
            blocks[i, 0], blocks[i, 1], blocks[i, 2] = j, first, min(first + table[j, BLOCK], table[j, ROWS])
            i += 1
    x_stride, d_stride, s_stride, o_stride = xv.strides[0], xd.strides[0], xs.strides[0], out.strides[0]
    for i in prange(count):
        job = table[blocks[i, 0]]
        # rows of whole 64-byte chunks run in 512-bit vectors where the CPU can: full tiles, and one
        # token where a chunk is one or two groups and the groups come in eights
        wide_rows = WIDE_VECTORS and job[W_STRIDE] % 64 == 0
        groups = job[W_STRIDE] * 8 // bits // group_size
        wide_units = job[W_STRIDE] * 8 // bits // max(group_size, 2 * chunk_values(bits))
        t = 0
        while t < job[TOKENS]:
            # tiles of WIDE_TILE tokens in 512-bit vectors, of TILE in 256 bits, then what is left
            width = WIDE_TILE if wide_rows and job[TOKENS] - t >= WIDE_TILE else min(TILE, job[TOKENS] - t)
            row = job[X_ROW] + t
            x, d = xv.ctypes.data + row * x_stride, xd.ctypes.data + row * d_stride
            # a tile reads the token-minor sums, one token the token-major ones
            s = xs.ctypes.data + row * 4 if width > 1 else xt.ctypes.data + row * xt.strides[0]
            o = out.ctypes.data + (job[OUT_ROW] + t) * o_stride + 4 * job[OUT_COL]
            wide = width >= TILE or (width == 1 and wide_decode(bits, group_size) and groups % 8 == 0)
            vector = 512 if wide_rows and wide else 256
            units = wide_units if vector == 512 else job[UNITS]
            tile_rows = 1 if width < TILE else 2 if vector == 512 else TILE_ROWS
            n = blocks[i, 1]
            while n < blocks[i, 2]:
                rows = tile_rows if n + tile_rows <= blocks[i, 2] else 1
                args = (job[W] + n * job[W_STRIDE], job[S] + n * job[S_STRIDE], job[B] + n * job[S_STRIDE],
                        x, d, s, x_stride, d_stride, s_stride, o + 4 * n, o_stride, units, job[W_STRIDE],
                        job[S_STRIDE])
                row_products(bits, group_size, width, rows, vector, *args)
                n += rows
            t += width


def runs_vector(bits: int, group_size: int, cols: int) -> bool:
    """Whether the vector kernels take a matrix of this format and width: they work in units of
    max(group, 32 bytes), so 4-bit rows of 32 values more than a multiple of 64 (no real model has
    them) take the plain kernel, and so do 2-bit groups of 32."""
    return (bits, group_size) in FORMATS and cols % max(group_size, chunk_values(bits)) == 0


def _vector_runner(bits: int, group_size: int):
    def run(x: QuantizedActivations, jobs: list[Job], out: np.ndarray) -> None:
        table = np.array([matrix_row(job.matrix) for job in jobs], np.int64)
        table[:, X_ROW:OUT_COL + 1] = [job[1:] for job in jobs]
        _vector_matmul(table, x.values, x.scales, x.sums, x.sums_by_token, out, bits, group_size)

    return run


def _plain_matmul(bits: int, group_size: int):
    per_lane = values_per_lane(bits)
    mask = np.uint16((1 << bits) - 1)
    lanes_per_group = group_size // per_lane
    three = bits == 3

    @njit(cache=True, nogil=True, parallel=True)
    def matmul(xq, dx, xsum, packed, scales, biases, half, out):
        T, groups = xq.shape[0], scales.shape[1]
        for n in prange(packed.shape[0]):
            for t in range(T):
                total = np.float32(0.0)
                for g in range(groups):
                    dot = np.int32(0)
                    for i in range(g * lanes_per_group, (g + 1) * lanes_per_group):
                        chunk, lane = divmod(i, 16)
                        if three:  # lane i's 12 bits (4 values) start at bit 12 i of the row's stream
                            bit = 12 * i
                            pair = np.uint32(packed[n, bit // 8]) | (np.uint32(packed[n, bit // 8 + 1]) << 8)
                            word = np.uint16((pair >> (bit % 8)) & 0xFFF)
                        else:
                            word = packed[n, i]
                        for j in range(per_lane):
                            q = np.int32((word >> np.uint16(bits * j)) & mask)
                            at = (chunk // 2) * 32 * per_lane + j * 32 + (chunk % 2) * 16 + lane  # kernel order
                            dot += q * np.int32(xq[t, at])
                    scale = half[scales[n, g]]
                    total += scale * dx[t, g] * np.float32(dot) + half[biases[n, g]] * xsum[g, 0, t] + scale * xsum[g, 1, t]
                out[t, n] = total

    def run(x: QuantizedActivations, jobs: list[Job], out: np.ndarray) -> None:
        for m, x_row, tokens, out_row, out_col in jobs:
            rows = slice(x_row, x_row + tokens)
            packed = m.words.view(np.uint8 if bits == 3 else np.uint16)  # 3 bits: bytes (a lane spans two)
            matmul(x.values[rows], x.scales[rows], x.sums[:, :, rows], packed, m.scales.view(np.uint16),
                   m.biases.view(np.uint16), HALF_TO_FLOAT,
                   out[out_row:out_row + tokens, out_col:out_col + m.words.shape[0]])

    return run


_COMPILED: dict = {}


def matmul_batch(x: QuantizedActivations, jobs: list[Job], out: np.ndarray, vector: bool | None = None) -> None:
    """For every job, out[out_row:+tokens, out_col:+rows] = x[x_row:+tokens] @ matrix.T, in one
    parallel pass. The matrices share the bits and group size that x was quantized for."""
    m = jobs[0].matrix
    # has_vector_kernels looked up on the package, as when this was one module: whoever sets
    # kernels.has_vector_kernels (tests/test_store.py, to run a model on the plain kernels)
    # changes this choice as well as the backend's.
    vector = kernels.has_vector_kernels() if vector is None else vector
    vector = vector and runs_vector(m.bits, m.group_size, m.words.shape[1] * 32 // m.bits)
    key = (m.bits, m.group_size, vector)
    if any((j.matrix.bits, j.matrix.group_size) != key[:2] for j in jobs):
        raise ValueError("matmul_batch: the matrices differ in bits or group size")
    if key not in _COMPILED:
        _COMPILED[key] = (_vector_runner if key[2] else _plain_matmul)(*key[:2])
    _COMPILED[key](x, jobs, out)


def matmul(x: np.ndarray, matrix, vector: bool | None = None) -> np.ndarray:
    """x @ W.T for float activations x [T, K] and a quantized matrix W [N, K]."""
    return matmul_many(x, [matrix], vector)[0]


def matmul_many(x: np.ndarray, matrices: list, vector: bool | None = None) -> list[np.ndarray]:
    """[x @ W.T for W in matrices]: x is quantized once per format, and the products of a format run
    in one pass, side by side in one output array (the results are views of it)."""
    T = x.shape[0]
    out = np.empty((T, sum(m.words.shape[0] for m in matrices)), np.float32)
    cols = np.cumsum([0] + [m.words.shape[0] for m in matrices])
    run_jobs(x, [Job(m, 0, T, 0, int(col)) for m, col in zip(matrices, cols)], out, vector)
    return [out[:, a:b] for a, b in zip(cols[:-1], cols[1:])]


def run_jobs(x: np.ndarray, jobs: list[Job], out: np.ndarray, vector: bool | None = None) -> None:
    """matmul_batch for float activations: quantized once for each format among the matrices."""
    by_format: dict = {}
    for job in jobs:
        by_format.setdefault((job.matrix.bits, job.matrix.group_size), []).append(job)
    for (bits, group_size), batch in by_format.items():
        matmul_batch(quantize_activations(x, bits, group_size), batch, out, vector)


def matmul_reference(x, matrix) -> np.ndarray:
    m = matrix
    return np.asarray(x, dtype=np.float32) @ dequantize_reference(m.words, m.scales, m.biases, m.bits, m.group_size).T


# --- dequantize (embedding rows) -----------------------------------------------------------------

def _dequantize_kernel(bits: int):
    mask = np.uint32((1 << bits) - 1)

    @njit(cache=True, nogil=True, parallel=True)
    def dequantize(packed, scales, biases, half, group_size, out):
        # value k of a row: `bits` bits from bit k * bits of the row's little-endian stream (MLX's
        # packing: whole words for 2, 4 and 8 bits, 8 values in 3 bytes for 3)
        rows, groups = scales.shape
        for n in prange(rows):
            for g in range(groups):
                scale, bias = half[scales[n, g]], half[biases[n, g]]
                for k in range(g * group_size, (g + 1) * group_size):
                    bit = k * bits
                    pair = np.uint32(packed[n, bit // 8])
                    if bit % 8 + bits > 8:
                        pair |= np.uint32(packed[n, bit // 8 + 1]) << 8
                    out[n, k] = np.float32((pair >> np.uint32(bit % 8)) & mask) * scale + bias

    return dequantize


_DEQUANTIZE = {bits: _dequantize_kernel(bits) for bits in (2, 3, 4, 8)}


def dequantize(words, scales, biases, bits: int, group_size: int) -> np.ndarray:
    out = np.empty((words.shape[0], words.shape[1] * 32 // bits), np.float32)
    _DEQUANTIZE[bits](words.view(np.uint8), scales.view(np.uint16), biases.view(np.uint16), HALF_TO_FLOAT, group_size,
                      out)
    return out
