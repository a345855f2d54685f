"""CPU kernels (Numba) on MLX-layout packed weights. Each has a plain numpy twin, which the tests
hold it to and which `backend="numpy"` runs instead.

How a quantized product works here (decode and prefill alike):
- The activations are quantized once per product to int16, one scale per weight group
  (`quantize_activations`). int16 and not llama.cpp's int8: int8 activations alone move the mini
  model's logits by 9% of their range (KL 0.0035 from the exact product, more than 8-bit weights
  cost), int16 by 5e-5, and the integer product is the same price per weight byte.
- The weights stay packed. A 32-byte chunk is read as 16 lanes of 16 bits; lane i holds values
  i*vpl .. i*vpl+vpl-1 of the chunk (vpl = 16 / bits values per lane), so `(lane >> bits*j) & mask`
  is value j of every lane at once. The activations are stored in that order (value j of every lane
  side by side), so the product of a chunk is vpl `pmaddwd`s on registers, with no unpacking to
  bytes and no shuffles.
- Per group: scale * dx * (integer dot) + bias * sum(x), in float32.

On x86 with AVX2 the chunk product is emitted as LLVM vector code through `@intrinsic`
(`vpmaddwd`, or `vpdpwssd` where the CPU has VNNI: 12% faster prompts here), with float
accumulators that stay in registers for the whole row; elsewhere, or with LOCALMIX_KERNELS=plain,
the same integer math runs as plain Numba loops. LOCALMIX_KERNELS=avx2 leaves VNNI out. All read
the same bytes and give the same integer sums, and the tests run all three.

float16 scales arrive as their uint16 bits (Numba has no float16 arrays): the vector path converts
them in LLVM (`fpext half`), the plain path through a 65536-entry table.
"""

from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from localmix.quant.affine import dequantize as dequantize_reference

HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
FORMATS = [(bits, group_size) for bits in (4, 8) for group_size in (32, 64, 128)]  # what the kernels run
TILE = 4              # tokens multiplied per pass over a weight row in prefill: unpack once, use 4 times
PREFETCH = 8192       # bytes ahead of the row being read: with the hardware prefetcher alone a row
                      # streams at a third of the memory bandwidth here, 8 KiB ahead at 3/4 of it
BLOCK_BYTES = 16384   # weight rows per block in prefill: a block stays in L1 while tiles of tokens pass


@functools.cache
def cpu_features() -> dict:
    import llvmlite.binding as llvm
    return dict(llvm.get_host_cpu_features())


@functools.cache
def has_vector_kernels() -> bool:
    """Whether this CPU runs the AVX2 kernels (and LOCALMIX_KERNELS=plain does not turn them off)."""
    if os.environ.get("LOCALMIX_KERNELS", "") == "plain":
        return False
    return all(cpu_features().get(f, False) for f in ("avx2", "fma", "f16c"))


def vnni_instruction() -> str | None:
    """vpdpwssd (multiply int16 pairs, add them and accumulate: one instruction for pmaddwd and
    paddd) in 256 bits, VEX-encoded (AVX-VNNI) or EVEX (AVX512-VNNI with VL); None without."""
    f = cpu_features()
    if os.environ.get("LOCALMIX_KERNELS", "") == "avx2":
        return None
    if f.get("avxvnni", False):
        return "{vex} vpdpwssd"
    if f.get("avx512vnni", False) and f.get("avx512vl", False):
        return "vpdpwssd"
    return None


def values_per_lane(bits: int) -> int:
    return 16 // bits


# --- activations -----------------------------------------------------------------------------

def _activation_quantizer(bits: int, group_size: int, parallel: bool):
    per_lane = values_per_lane(bits)
    per_chunk = 16 * per_lane
    middle = np.float32(1 << (bits - 1))
    groups_per_unit = max(1, per_chunk // group_size)

    @njit(cache=True, parallel=parallel, fastmath=True)
    def quantize(x, xq, dx, sums, lane_scales):
        T, K = x.shape
        for t in prange(T):
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
                sums[g, 0, t] = total
                sums[g, 1, t] = middle * (total - d * np.float32(rounded))
            # value (lane, slot) of a chunk goes to slot * 16 + lane: every lane's value j side by side
            for chunk in range(K // per_chunk):
                base = chunk * per_chunk
                for slot in range(per_lane):
                    for lane in range(16):
                        xq[t, base + slot * 16 + lane] = values[base + lane * per_lane + slot]
            # the vector kernel's lane scales: per unit (one group, or one chunk of two groups),
            # lanes 0-3 come from the first 128 bits of a chunk, lanes 4-7 from the rest
            for u in range(lane_scales.shape[1]):
                for lane in range(8):
                    lane_scales[t, u, lane] = dx[t, u * groups_per_unit + (lane // 4 if groups_per_unit == 2 else 0)]

    return quantize


# One token goes through the serial version: starting the threads costs more than its work.
_QUANTIZE_ACTIVATIONS = {(bits, group_size, parallel): _activation_quantizer(bits, group_size, parallel)
                         for bits, group_size in FORMATS for parallel in (False, True)}


class QuantizedActivations(NamedTuple):
    values: np.ndarray       # int16 [T, K], in kernel order
    scales: np.ndarray       # float32 [T, groups]: x ~= scale * value within a group
    sums: np.ndarray         # float32 [groups, 2, T]: the sum of x, and m (sum x - sum x~), see below;
                             # token-minor, so that a tile of tokens loads them as one vector
    lane_scales: np.ndarray  # float32 [T, units, 8]: each vector lane's scale, for the AVX2 kernel


def quantize_activations(x: np.ndarray, bits: int, group_size: int) -> QuantizedActivations:
    """x [T, K] as int16 values v with one scale dx per weight group: x~ = dx v.

    A group's product is then s dx (q . v) + b sum(x) + s m (sum(x) - sum(x~)), with m = 2^(bits-1)
    the middle of the weights' range: that equals s (q - m) . x~ + (b + m s) sum(x), whose rounding
    error is s |q - m| dx / 2 per value instead of s q dx / 2: weights are centred, not all positive.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    T, K = x.shape
    xq = np.empty((T, K), np.int16)
    dx = np.empty((T, K // group_size), np.float32)
    xsum = np.empty((K // group_size, 2, T), np.float32)
    lane_scales = np.empty((T, K // max(group_size, 256 // bits), 8), np.float32)
    _QUANTIZE_ACTIVATIONS[bits, group_size, T > 1](x, xq, dx, xsum, lane_scales)
    return QuantizedActivations(xq, dx, xsum, lane_scales)


# --- the vector row product (LLVM IR) --------------------------------------------------------

_i16, _i32, _i64, _f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(t, n):
    return ir.VectorType(t, n)


def _llvm_function(module, name, ret, args):
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name=name)


def _emit_row_products(builder, bits, group_size, tokens, args):
    """LLVM IR for `tokens` dot products of one packed weight row with consecutive quantized
    activation rows, stored as float32. One loop iteration covers a unit of max(group, chunk)
    values: one group of 1, 2 or 4 chunks, or one chunk of 2 groups (4 bits, group 32); the fp16
    scales are converted and multiplied once per group."""
    w_addr, s_addr, b_addr, x_addr, dx_addr, xsum_addr, x_stride, dx_stride, g_stride, out_addr, out_stride, units = args
    per_lane = values_per_lane(bits)
    chunk_values = 16 * per_lane
    unit_values = max(group_size, chunk_values)
    chunks_per_unit, groups_per_unit = unit_values // chunk_values, unit_values // group_size
    mask = (1 << bits) - 1
    maddwd = _llvm_function(builder.module, "llvm.x86.avx2.pmadd.wd", _vector(_i32, 8),
                            [_vector(_i16, 16), _vector(_i16, 16)])
    # As inline assembly: LLVM turns its own vpdpwssd intrinsic back into pmaddwd + paddd here.
    vnni = vnni_instruction()
    if vnni:
        import llvmlite.binding as llvm
        llvm.initialize_native_asmparser()  # Numba does not, and inline assembly needs it
    dpwssd = vnni and ir.InlineAsm(ir.FunctionType(_vector(_i32, 8), [_vector(_i32, 8), _vector(_i16, 16), _vector(_i16, 16)]),
                                   f"{vnni} $3, $2, $0", "=x,0,x,x")
    fma8 = _llvm_function(builder.module, "llvm.fma.v8f32", _vector(_f32, 8), [_vector(_f32, 8)] * 3)
    fma_t = _llvm_function(builder.module, f"llvm.fma.v{tokens}f32", _vector(_f32, tokens), [_vector(_f32, tokens)] * 3)
    prefetch = _llvm_function(builder.module, "llvm.prefetch.p0", ir.VoidType(),
                              [ir.IntType(8).as_pointer(), _i32, _i32, _i32])
    reduce = _llvm_function(builder.module, "llvm.vector.reduce.fadd.v8f32", _f32, [_f32, _vector(_f32, 8)])

    def const(v):
        return ir.Constant(_i64, v)

    def load(addr, ty, offset=None):
        if offset is not None:
            addr = builder.add(addr, offset)
        return builder.load(builder.inttoptr(addr, ty.as_pointer()), align=1)

    def half(addr, index):  # fp16 bits at addr[index] as float32
        return builder.fpext(builder.bitcast(load(addr, _i16, builder.mul(index, const(2))), ir.HalfType()), _f32)

    def splat(value, n=8):
        one = builder.insert_element(ir.Constant(_vector(_f32, 1), None), value, ir.Constant(_i32, 0))
        return builder.shuffle_vector(one, one, ir.Constant(_vector(_i32, n), [0] * n))

    entry = builder.block
    loop, done = builder.append_basic_block("units"), builder.append_basic_block("done")
    builder.branch(loop)
    builder.position_at_end(loop)
    u = builder.phi(_i64)
    u.add_incoming(const(0), entry)
    acc = [builder.phi(_vector(_f32, 8)) for _ in range(tokens)]
    bias_acc = [builder.phi(_vector(_f32, tokens))]  # the biases' part, one lane per token
    for a in acc:
        a.add_incoming(ir.Constant(_vector(_f32, 8), [0.0] * 8), entry)
    for a in bias_acc:
        a.add_incoming(ir.Constant(_vector(_f32, tokens), [0.0] * tokens), entry)

    sums = [None] * tokens  # integer dot of the unit, [8 x i32] per token
    for c in range(chunks_per_unit):
        chunk = builder.add(builder.mul(u, const(chunks_per_unit)), const(c))
        w = load(w_addr, _vector(_i16, 16), builder.mul(chunk, const(32)))
        if PREFETCH:
            ahead = builder.add(w_addr, builder.add(builder.mul(chunk, const(32)), const(PREFETCH)))
            builder.call(prefetch, [builder.inttoptr(ahead, ir.IntType(8).as_pointer()), ir.Constant(_i32, 0),
                                    ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
        lanes = [builder.and_(builder.lshr(w, ir.Constant(_vector(_i16, 16), [bits * j] * 16)),
                              ir.Constant(_vector(_i16, 16), [mask] * 16)) for j in range(per_lane)]
        x_chunk = builder.add(x_addr, builder.mul(chunk, const(2 * chunk_values)))
        for t in range(tokens):
            x_t = builder.add(x_chunk, builder.mul(const(t), x_stride))
            for j in range(per_lane):
                xj = load(x_t, _vector(_i16, 16), const(32 * j))
                if vnni and sums[t] is not None:
                    sums[t] = builder.call(dpwssd, [sums[t], lanes[j], xj])
                else:
                    p = builder.call(maddwd, [lanes[j], xj])
                    sums[t] = p if sums[t] is None else builder.add(sums[t], p)

    groups = [builder.add(builder.mul(u, const(groups_per_unit)), const(k)) for k in range(groups_per_unit)]
    biases = [half(b_addr, g) for g in groups]
    scales = [half(s_addr, g) for g in groups]
    if groups_per_unit == 1:
        scale = splat(scales[0])
    else:  # lanes 0-3 come from the chunk's first 128 bits: the first group
        pair = builder.insert_element(splat(scales[0], 2), scales[1], ir.Constant(_i32, 1))
        scale = builder.shuffle_vector(pair, pair, ir.Constant(_vector(_i32, 8), [0, 0, 0, 0, 1, 1, 1, 1]))
    new_acc = []
    for t in range(tokens):
        # dx_lanes holds each lane's activation scale for the unit, ready as a vector
        dx = load(builder.add(dx_addr, builder.mul(const(t), dx_stride)), _vector(_f32, 8), builder.mul(u, const(32)))
        factor = builder.fmul(scale, dx)
        new_acc.append(builder.call(fma8, [builder.sitofp(sums[t], _vector(_f32, 8)), factor, acc[t]]))
    # b sum(x) + s m (sum x - sum x~) for all the tile's tokens at once: the sums are token-minor
    b = bias_acc[0]
    for bias, scale_g, g in zip(biases, scales, groups):
        sums_g = builder.add(xsum_addr, builder.mul(g, g_stride))
        b = builder.call(fma_t, [splat(bias, tokens), load(sums_g, _vector(_f32, tokens)), b])
        resid = load(sums_g, _vector(_f32, tokens), builder.sdiv(g_stride, const(2)))
        b = builder.call(fma_t, [splat(scale_g, tokens), resid, b])
    new_bias = [b]

    u_next = builder.add(u, const(1))
    u.add_incoming(u_next, builder.block)
    for phi, value in zip(acc + bias_acc, new_acc + new_bias):
        phi.add_incoming(value, builder.block)
    builder.cbranch(builder.icmp_signed("<", u_next, units), loop, done)

    builder.position_at_end(done)
    for t in range(tokens):
        bias_part = builder.extract_element(new_bias[0], ir.Constant(_i32, t))
        total = builder.fadd(builder.call(reduce, [ir.Constant(_f32, -0.0), new_acc[t]]), bias_part)
        out = builder.inttoptr(builder.add(out_addr, builder.mul(const(t), out_stride)), _f32.as_pointer())
        builder.store(total, out)


@intrinsic
def row_products(typingctx, bits, group_size, tokens, w_addr, s_addr, b_addr, x_addr, dx_addr, xsum_addr,
                 x_stride, dx_stride, g_stride, out_addr, out_stride, units):
    """row_products(bits, group_size, tokens, addresses and strides...): one loop per format and
    token count (1 or TILE) is emitted, and a switch on the three picks it. The format is a
    runtime value so that the kernels calling this have no per-format closures, which Numba's
    cache could not find again on the next start."""
    sig = types.void(*[types.int64] * 15)

    def codegen(context, builder, signature, args):
        key = builder.add(builder.add(builder.mul(args[0], ir.Constant(_i64, 4096)),
                                      builder.mul(args[1], ir.Constant(_i64, 16))), args[2])
        done = builder.append_basic_block("formats_done")
        unsupported = builder.append_basic_block("unsupported")
        switch = builder.switch(key, unsupported)
        for bits, group_size in FORMATS:
            for tokens in (1, TILE):
                block = builder.append_basic_block(f"q{bits}_g{group_size}_t{tokens}")
                switch.add_case(ir.Constant(_i64, bits * 4096 + group_size * 16 + tokens), block)
                builder.position_at_end(block)
                _emit_row_products(builder, bits, group_size, tokens, args[3:])
                builder.branch(done)
        builder.position_at_end(unsupported)  # callers check the format first
        builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


# --- matrix products --------------------------------------------------------------------------
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


def matrix_addresses(m) -> tuple[int, int, int]:
    """Where a matrix's words, scales and biases start; kept on the matrix, which never moves."""
    cached = getattr(m, "addresses", None)
    if cached is None:
        cached = tuple(a.__array_interface__["data"][0] for a in (m.words, m.scales, m.biases))
        if not isinstance(m, tuple):
            m.addresses = cached
    return cached


@njit(cache=True, parallel=True)
def _vector_matmul(table, xv, xl, xs, out, bits, group_size):
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
    x_stride, l_stride, s_stride, o_stride = xv.strides[0], xl.strides[0], xs.strides[0], out.strides[0]
    for i in prange(count):
        job = table[blocks[i, 0]]
        t = 0
        while t < job[TOKENS]:
            width = TILE if t + TILE <= job[TOKENS] else 1
            row = job[X_ROW] + t
            x, l, s = xv.ctypes.data + row * x_stride, xl.ctypes.data + row * l_stride, xs.ctypes.data + row * 4
            o = out.ctypes.data + (job[OUT_ROW] + t) * o_stride + 4 * job[OUT_COL]
            for n in range(blocks[i, 1], blocks[i, 2]):
                args = (job[W] + n * job[W_STRIDE], job[S] + n * job[S_STRIDE], job[B] + n * job[S_STRIDE],
                        x, l, s, x_stride, l_stride, s_stride, o + 4 * n, o_stride, job[UNITS])
                row_products(bits, group_size, width, *args)
            t += width


def _vector_runner(bits: int, group_size: int):
    unit_values = max(group_size, 256 // bits)

    def run(x: QuantizedActivations, jobs: list[Job], out: np.ndarray) -> None:
        table = np.empty((len(jobs), 12), np.int64)
        for j, (m, x_row, tokens, out_row, out_col) in enumerate(jobs):
            rows, row_bytes = m.words.shape[0], m.words.strides[0]
            table[j] = (*matrix_addresses(m), row_bytes, m.scales.strides[0], row_bytes * 8 // bits // unit_values,
                        x_row, tokens, out_row, out_col, rows, max(1, BLOCK_BYTES // row_bytes))
        _vector_matmul(table, x.values, x.lane_scales, x.sums, out, bits, group_size)

    return run


def _plain_matmul(bits: int, group_size: int):
    per_lane = values_per_lane(bits)
    mask = np.uint16((1 << bits) - 1)
    lanes_per_group = group_size // per_lane

    @njit(cache=True, parallel=True)
    def matmul(xq, dx, xsum, lanes, scales, biases, half, out):
        T, K = xq.shape
        groups = K // group_size
        for n in prange(lanes.shape[0]):
            for t in range(T):
                total = np.float32(0.0)
                for g in range(groups):
                    dot = np.int32(0)
                    for i in range(g * lanes_per_group, (g + 1) * lanes_per_group):
                        chunk, lane = divmod(i, 16)
                        word = lanes[n, i]
                        for j in range(per_lane):
                            q = np.int32((word >> np.uint16(bits * j)) & mask)
                            dot += q * np.int32(xq[t, chunk * 16 * per_lane + j * 16 + lane])
                    scale = half[scales[n, g]]
                    total += scale * dx[t, g] * np.float32(dot) + half[biases[n, g]] * xsum[g, 0, t] + scale * xsum[g, 1, t]
                out[t, n] = total

    def run(x: QuantizedActivations, jobs: list[Job], out: np.ndarray) -> None:
        for m, x_row, tokens, out_row, out_col in jobs:
            rows = slice(x_row, x_row + tokens)
            matmul(x.values[rows], x.scales[rows], x.sums[:, :, rows], m.words.view(np.uint16), m.scales.view(np.uint16),
                   m.biases.view(np.uint16), HALF_TO_FLOAT,
                   out[out_row:out_row + tokens, out_col:out_col + m.words.shape[0]])

    return run


_COMPILED: dict = {}


def matmul_batch(x: QuantizedActivations, jobs: list[Job], out: np.ndarray, vector: bool | None = None) -> None:
    """For every job, out[out_row:+tokens, out_col:+rows] = x[x_row:+tokens] @ matrix.T, in one
    parallel pass. The matrices share the bits and group size that x was quantized for."""
    m = jobs[0].matrix
    key = (m.bits, m.group_size, has_vector_kernels() if vector is None else vector)
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


# --- the experts ---------------------------------------------------------------------------------

def _swiglu(gate_up):
    T, N = gate_up.shape[0], gate_up.shape[1] // 2
    out = np.empty((T, N), np.float32)
    for t in prange(T):
        for n in range(N):
            g = gate_up[t, n]
            out[t, n] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, N + n]
    return out


_SWIGLU = {parallel: njit(cache=True, fastmath=True, parallel=parallel)(_swiglu) for parallel in (False, True)}


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """silu(gate) * up for [T, 2 * ffn] holding gate then up."""
    return _SWIGLU[gate_up.shape[0] > 1](gate_up)


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


# --- routing --------------------------------------------------------------------------------

@njit(cache=True)
def route_tokens(x, router, k):
    """The model's route_tokens in one call: softmax over the router's logits, the k largest (the
    lower index first on ties, as a stable sort puts them), renormalized."""
    T, E = x.shape[0], router.shape[0]
    chosen = np.empty((T, k), np.int64)
    weights = np.empty((T, k), np.float32)
    probs = np.empty(E, np.float32)
    for t in range(T):
        for e in range(E):
            total = np.float32(0.0)
            for d in range(x.shape[1]):
                total += x[t, d] * router[e, d]
            probs[e] = total
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
        weights[t] /= weights[t].sum()
    return chosen, weights


# --- norm, rotary embedding, attention -------------------------------------------------------
# Their numpy twins are the reference functions of localmix.model.

@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True, parallel=True, fastmath=True)
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
    if keys.dtype == np.float16:
        keys, values = keys.view(np.uint16), values.view(np.uint16)
    _attend(q, keys, values, np.asarray(positions, np.int64), sliding_window or 0, HALF_TO_FLOAT, out)
    return out


# --- dequantize (embedding rows) -----------------------------------------------------------------

def _dequantize_kernel(bits: int):
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)

    @njit(cache=True, parallel=True)
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

    return dequantize


_DEQUANTIZE = {4: _dequantize_kernel(4), 8: _dequantize_kernel(8)}


def dequantize(words, scales, biases, bits: int, group_size: int) -> np.ndarray:
    out = np.empty((words.shape[0], words.shape[1] * 32 // bits), np.float32)
    _DEQUANTIZE[bits](words, scales.view(np.uint16), biases.view(np.uint16), HALF_TO_FLOAT, group_size, out)
    return out


class _Packed(NamedTuple):
    words: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int


def warm_up(shapes, vector: bool | None = None) -> float:
    """Compile (or load from Numba's cache) the kernels for these (bits, group_size) pairs; returns
    the seconds it took, so a first start can say why it is slow."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    for bits, group_size in sorted(set(shapes)):
        n = max(group_size, 256 // bits) * 2
        words = rng.integers(0, 2**32, (4, n * bits // 32), dtype=np.uint32)
        scales = np.ones((4, n // group_size), np.float16)
        for tokens in (1, TILE + 1):  # decoding and prompts run different variants
            matmul(np.ones((tokens, n), np.float32), _Packed(words, scales, scales, bits, group_size), vector)
    one = np.ones((1, 1), np.float32)
    swiglu(np.ones((1, 2), np.float32))
    swiglu(np.ones((2, 2), np.float32))
    rms_norm(one, one[0], np.float32(1e-5))
    route_tokens(np.ones((1, 2), np.float32), np.ones((2, 2), np.float32), 1)
    apply_rope(np.ones((1, 1, 2), np.float32), np.zeros(1, np.int64), one[0])
    for dtype in (np.float32, np.float16):
        cache = np.ones((1, 1, 2), dtype)  # [length, kv_heads, dim]
        attend(np.ones((1, 1, 2), np.float32), cache, cache, np.zeros(1, np.int64), None)
    return time.perf_counter() - start
