"""CPU kernels (Numba) on MLX-layout packed weights. Each has a plain numpy twin, which the tests
hold it to and which `backend="numpy"` runs instead.

How a quantized product works here (decode and prefill alike):
- The activations are quantized once per product to int16, one scale per weight group
  (`quantize_activations`). int16 and not llama.cpp's int8: on the mini model int8 activations
  alone move the logits by 6-8% of their range (KL 0.0013-0.0016 from the exact product, half of
  what 8-bit weights cost), int16 by 3.5e-5 (scripts/activation_precision.py), and the integer
  product is the same price per weight byte.
- The weights stay packed. A 32-byte chunk is read as 16 lanes of 16 bits; lane i holds values
  i*vpl .. i*vpl+vpl-1 of the chunk (vpl = 16 / bits values per lane), so `(lane >> bits*j) & mask`
  is value j of every lane at once. The activations are stored in that order (value j of every lane
  side by side), so the product of a chunk is vpl `pmaddwd`s on registers, with no unpacking to
  bytes and no shuffles.
- Per group, in float32: s dx (q . v) + b sum(x) + s m (sum(x) - sum(x~)): the weights centred on
  the middle m of their range (see quantize_activations).
- One token (decoding) sums eight groups' dot products across lanes together and converts their
  scales as one vector; a prompt multiplies tiles of TILE tokens per pass over a block of rows.

On x86 with AVX2 the chunk product is emitted as LLVM vector code through `@intrinsic`
(`vpmaddwd`, and in prompts `vpdpwssd` where the CPU has VNNI: 12% faster here), with float
accumulators that stay in registers for the whole row; elsewhere, or with LOCALMIX_KERNELS=plain,
the same integer math runs as plain Numba loops. LOCALMIX_KERNELS=avx2 leaves VNNI out. All read
the same bytes and give the same integer sums, and the tests run all three.

The kernels release the GIL (nogil), so an expert cache's background reads run beside them.

float16 scales arrive as their uint16 bits (Numba has no float16 arrays): the vector path converts
them in LLVM (`fpext half`), the plain path through a 65536-entry table.
"""

from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import numpy as np
import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from localmix.quant.affine import dequantize as dequantize_reference

# Numba does not set up LLVM's assembly parser, which the inline vpdpwssd needs: whenever a kernel
# holding it is compiled, or linked from Numba's cache into another kernel being compiled.
llvm.initialize_native_asmparser()

HALF_TO_FLOAT = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
# What the vector kernels run: the stored formats, and 2 bits for the expert cache's shadow copies
# (2-bit groups of 32 are a quarter of a 32-byte chunk, which the kernels do not split: plain path).
FORMATS = [(bits, group_size) for bits in (4, 8) for group_size in (32, 64, 128)] + [(2, 64), (2, 128)]
TILE = 4              # tokens multiplied per pass over a weight row in prefill: unpack once, use 4 times
PREFETCH = 8192       # bytes ahead of the row being read: with the hardware prefetcher alone a row
                      # streams at a third of the memory bandwidth here, 8 KiB ahead at 3/4 of it
BLOCK_BYTES = 16384   # weight rows per block in prefill: a block stays in L1 while tiles of tokens pass


@functools.cache
def cpu_features() -> dict:
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

@njit(inline="always", fastmath=True)
def _quantize_token(x, t, bits, group_size, xq, dx, sums, sums_by_token):
    K = x.shape[1]
    per_lane = 16 // bits
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
    # value (lane, slot) of a chunk goes to slot * 16 + lane: every lane's value j side by side
    for chunk in range(xq.shape[1] // per_chunk):
        base = chunk * per_chunk
        for slot in range(per_lane):
            for lane in range(16):
                k = base + lane * per_lane + slot
                xq[t, base + slot * 16 + lane] = values[k] if k < K else 0


@njit(cache=True, nogil=True, fastmath=True)
def _quantize_serial(x, bits, group_size, xq, dx, sums, sums_by_token):
    """One token (or the few rows of a decoded token's experts): starting threads costs more."""
    for t in range(x.shape[0]):
        _quantize_token(x, t, bits, group_size, xq, dx, sums, sums_by_token)


def _quantizer(bits: int, group_size: int, parallel: bool):
    # The format as constants: prompts quantize three times faster than with runtime values. The
    # one-row and the many-row variants compile the same body, so a row comes out the same from
    # both: an expert cache that splits a prompt's experts into batches changes no logit.
    @njit(cache=True, nogil=True, fastmath=True, parallel=parallel)
    def quantize(x, xq, dx, sums, sums_by_token):
        for t in prange(x.shape[0]):
            _quantize_token(x, t, bits, group_size, xq, dx, sums, sums_by_token)

    return quantize


_QUANTIZERS = {(bits, group_size, parallel): _quantizer(bits, group_size, parallel)
               for bits in (2, 4, 8) for group_size in (32, 64, 128) for parallel in (False, True)}


@njit(cache=True, nogil=True)
def _activation_arrays(T, K, bits, group_size):
    """The arrays of QuantizedActivations for T rows of K values: values in whole 32-byte chunks
    of weights, zero-padded."""
    per_chunk = 256 // bits
    return (np.empty((T, (K + per_chunk - 1) // per_chunk * per_chunk), np.int16),
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
    values: np.ndarray         # int16 [T, K rounded up to 32 bytes of weights], in kernel order
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


# --- the vector row product (LLVM IR) --------------------------------------------------------
# A unit is max(group, chunk) values: one group of 1, 2 or 4 chunks of 32 bytes, or one chunk of
# two groups (4 bits, group 32). Its integer dot product is an [8 x i32] vector per token.

_i16, _i32, _i64, _f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _vector(t, n):
    return ir.VectorType(t, n)


def _llvm_function(module, name, ret, args):
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name=name)


class _RowEmitter:
    """Builds the IR of one format's row products; `args` are the intrinsic's runtime operands."""

    def __init__(self, builder, bits, group_size, args):
        self.b, self.bits = builder, bits
        (self.w_addr, self.s_addr, self.b_addr, self.x_addr, self.dx_addr, self.sums_addr, self.x_stride,
         self.dx_stride, self.g_stride, self.out_addr, self.out_stride, self.units) = args
        self.per_lane = values_per_lane(bits)
        self.chunk_values = 16 * self.per_lane
        unit_values = max(group_size, self.chunk_values)
        self.chunks_per_unit, self.groups_per_unit = unit_values // self.chunk_values, unit_values // group_size
        module = builder.module
        self.maddwd = _llvm_function(module, "llvm.x86.avx2.pmadd.wd", _vector(_i32, 8),
                                     [_vector(_i16, 16), _vector(_i16, 16)])
        # As inline assembly: LLVM turns its own vpdpwssd intrinsic back into pmaddwd + paddd here.
        vnni = vnni_instruction()
        self.dpwssd = vnni and ir.InlineAsm(
            ir.FunctionType(_vector(_i32, 8), [_vector(_i32, 8), _vector(_i16, 16), _vector(_i16, 16)]),
            f"{vnni} $3, $2, $0", "=x,0,x,x")
        self.prefetch = _llvm_function(module, "llvm.prefetch.p0", ir.VoidType(),
                                       [ir.IntType(8).as_pointer(), _i32, _i32, _i32])
        self.reduce = _llvm_function(module, "llvm.vector.reduce.fadd.v8f32", _f32, [_f32, _vector(_f32, 8)])

    def const(self, v, ty=_i64):
        return ir.Constant(ty, v)

    def fma(self, a, b, c):
        ty = a.type
        name = f"llvm.fma.v{ty.count}f32" if isinstance(ty, ir.VectorType) else "llvm.fma.f32"
        return self.b.call(_llvm_function(self.b.module, name, ty, [ty] * 3), [a, b, c])

    def load(self, addr, ty, offset=None):
        if offset is not None:
            addr = self.b.add(addr, offset)
        return self.b.load(self.b.inttoptr(addr, ty.as_pointer()), align=1)

    def at(self, addr, index, size):  # addr + index * size
        return self.b.add(addr, self.b.mul(index, self.const(size)))

    def halves(self, addr, index, n=1):  # n fp16 values at addr[index] as float32
        ty = _i16 if n == 1 else _vector(_i16, n)
        half = ir.HalfType() if n == 1 else _vector(ir.HalfType(), n)
        bits = self.load(self.at(addr, index, 2), ty)
        return self.b.fpext(self.b.bitcast(bits, half), _f32 if n == 1 else _vector(_f32, n))

    def splat(self, value, n=8):
        one = self.b.insert_element(ir.Constant(_vector(_f32, 1), None), value, self.const(0, _i32))
        return self.b.shuffle_vector(one, one, ir.Constant(_vector(_i32, n), [0] * n))

    def lanes_of(self, values):
        """One float per group of a unit as the 8 lanes' vector: lanes 0-3 come from a chunk's
        first 128 bits, so with two groups per chunk they belong to the first group."""
        if len(values) == 1:
            return self.splat(values[0])
        pair = self.b.insert_element(self.splat(values[0], 2), values[1], self.const(1, _i32))
        return self.b.shuffle_vector(pair, pair, ir.Constant(_vector(_i32, 8), [0, 0, 0, 0, 1, 1, 1, 1]))

    def unit_dots(self, u, tokens):
        """[8 x i32] partial dot products of unit u with each token's activations."""
        b, sums = self.b, [None] * tokens
        mask = ir.Constant(_vector(_i16, 16), [(1 << self.bits) - 1] * 16)
        for c in range(self.chunks_per_unit):
            chunk = b.add(b.mul(u, self.const(self.chunks_per_unit)), self.const(c))
            w = self.load(self.at(self.w_addr, chunk, 32), _vector(_i16, 16))
            ahead = b.add(self.at(self.w_addr, chunk, 32), self.const(PREFETCH))
            b.call(self.prefetch, [b.inttoptr(ahead, ir.IntType(8).as_pointer()), self.const(0, _i32),
                                   self.const(3, _i32), self.const(1, _i32)])
            lanes = [b.and_(b.lshr(w, ir.Constant(_vector(_i16, 16), [self.bits * j] * 16)), mask)
                     for j in range(self.per_lane)]
            x_chunk = self.at(self.x_addr, chunk, 2 * self.chunk_values)
            for t in range(tokens):
                x_t = b.add(x_chunk, b.mul(self.const(t), self.x_stride))
                for j in range(self.per_lane):
                    xj = self.load(x_t, _vector(_i16, 16), self.const(32 * j))
                    # vpdpwssd for tiles only: alone, its chained accumulation is slower than
                    # pmaddwd + paddd (one token streams 20 GB/s here with those, 17 with it)
                    if self.dpwssd and tokens > 1 and sums[t] is not None:
                        sums[t] = b.call(self.dpwssd, [sums[t], lanes[j], xj])
                    else:
                        p = b.call(self.maddwd, [lanes[j], xj])
                        sums[t] = p if sums[t] is None else b.add(sums[t], p)
        return sums

    def loop(self, count, carried, body):
        """for i in range(count): carried = body(i, carried); returns the final values."""
        b = self.b
        entry = b.block
        head, done = b.append_basic_block("loop"), b.append_basic_block("loop_done")
        b.branch(head)
        b.position_at_end(head)
        i = b.phi(_i64)
        i.add_incoming(self.const(0), entry)
        phis = []
        for value in carried:
            phi = b.phi(value.type)
            phi.add_incoming(value, entry)
            phis.append(phi)
        new = body(i, phis)
        i_next = b.add(i, self.const(1))
        i.add_incoming(i_next, b.block)
        for phi, value in zip(phis, new):
            phi.add_incoming(value, b.block)
        b.cbranch(b.icmp_signed("<", i_next, count), head, done)
        b.position_at_end(done)
        return new

    def store(self, t, value):
        b = self.b
        b.store(value, b.inttoptr(b.add(self.out_addr, b.mul(self.const(t), self.out_stride)), _f32.as_pointer()))

    def zeros(self, n):
        return ir.Constant(_vector(_f32, n), [0.0] * n)

    def tile(self, tokens):
        """A tile of tokens: the weights are unpacked once per unit for all of them. The sums
        (token-minor) give the biases' part of all the tile's tokens as one vector."""
        b = self.b

        def body(u, carried):
            acc, bias_acc = carried[:tokens], carried[tokens]
            sums = self.unit_dots(u, tokens)
            groups = [b.add(b.mul(u, self.const(self.groups_per_unit)), self.const(k))
                      for k in range(self.groups_per_unit)]
            scales = [self.halves(self.s_addr, g) for g in groups]
            biases = [self.halves(self.b_addr, g) for g in groups]
            scale = self.lanes_of(scales)
            new_acc = []
            for t in range(tokens):
                dx_t = b.add(self.dx_addr, b.mul(self.const(t), self.dx_stride))
                dx = self.lanes_of([self.load(self.at(dx_t, g, 4), _f32) for g in groups])
                new_acc.append(self.fma(b.sitofp(sums[t], _vector(_f32, 8)), b.fmul(scale, dx), acc[t]))
            for bias, scale_g, g in zip(biases, scales, groups):  # b sum(x) + s m (sum x - sum x~)
                sums_g = b.add(self.sums_addr, b.mul(g, self.g_stride))
                bias_acc = self.fma(self.splat(bias, tokens), self.load(sums_g, _vector(_f32, tokens)), bias_acc)
                residual = self.load(sums_g, _vector(_f32, tokens), b.sdiv(self.g_stride, self.const(2)))
                bias_acc = self.fma(self.splat(scale_g, tokens), residual, bias_acc)
            return new_acc + [bias_acc]

        final = self.loop(self.units, [self.zeros(8)] * tokens + [self.zeros(tokens)], body)
        for t in range(tokens):
            total = b.fadd(b.call(self.reduce, [self.const(-0.0, _f32), final[t]]),
                           b.extract_element(final[tokens], self.const(t, _i32)))
            self.store(t, total)

    def single(self):
        """One token (decoding). Where a unit is one group and the groups come in eights, eight
        units' dot products are summed across lanes together (a transpose by shuffles), so that
        scales, biases and activation sums are read and converted eight at a time, as vectors;
        otherwise unit by unit. The sums here are token-major: [sum x of every group, then m
        (sum x - sum x~) of every group]."""
        b = self.b
        groups_total = b.mul(self.units, self.const(self.groups_per_unit))
        residuals = b.add(self.sums_addr, b.mul(groups_total, self.const(4)))
        done = b.append_basic_block("single_done")
        result = []
        if self.groups_per_unit == 1:
            blocked, by_unit = b.append_basic_block("by_eight"), b.append_basic_block("by_unit")
            eights = b.icmp_signed("==", b.srem(self.units, self.const(8)), self.const(0))
            b.cbranch(eights, blocked, by_unit)
            b.position_at_end(blocked)

            def eight(i, carried):
                acc, bias_acc = carried
                dots = [self.unit_dots(b.add(b.mul(i, self.const(8)), self.const(k)), 1)[0] for k in range(8)]
                for pattern in ([0, 8, 2, 10, 4, 12, 6, 14], [0, 1, 8, 9, 4, 5, 12, 13], [0, 1, 2, 3, 8, 9, 10, 11]):
                    other = [p + (1 if pattern[1] == 8 else 2 if pattern[2] == 8 else 4) for p in pattern]
                    dots = [b.add(b.shuffle_vector(dots[k], dots[k + 1], ir.Constant(_vector(_i32, 8), pattern)),
                                  b.shuffle_vector(dots[k], dots[k + 1], ir.Constant(_vector(_i32, 8), other)))
                            for k in range(0, len(dots), 2)]
                first = b.mul(i, self.const(8))
                scales = self.halves(self.s_addr, first, 8)
                dx = self.load(self.at(self.dx_addr, first, 4), _vector(_f32, 8))
                acc = self.fma(b.sitofp(dots[0], _vector(_f32, 8)), b.fmul(scales, dx), acc)
                bias_acc = self.fma(self.halves(self.b_addr, first, 8),
                                    self.load(self.at(self.sums_addr, first, 4), _vector(_f32, 8)), bias_acc)
                bias_acc = self.fma(scales, self.load(self.at(residuals, first, 4), _vector(_f32, 8)), bias_acc)
                return [acc, bias_acc]

            acc, bias_acc = self.loop(b.sdiv(self.units, self.const(8)), [self.zeros(8), self.zeros(8)], eight)
            result.append((b.fadd(b.call(self.reduce, [self.const(-0.0, _f32), acc]),
                                  b.call(self.reduce, [self.const(-0.0, _f32), bias_acc])), b.block))
            b.branch(done)
            b.position_at_end(by_unit)

        def unit(u, carried):
            acc, bias_acc = carried
            dot = self.unit_dots(u, 1)[0]
            groups = [b.add(b.mul(u, self.const(self.groups_per_unit)), self.const(k))
                      for k in range(self.groups_per_unit)]
            scales = [self.halves(self.s_addr, g) for g in groups]
            factors = [b.fmul(s, self.load(self.at(self.dx_addr, g, 4), _f32)) for s, g in zip(scales, groups)]
            acc = self.fma(b.sitofp(dot, _vector(_f32, 8)), self.lanes_of(factors), acc)
            for scale, g in zip(scales, groups):
                bias_acc = self.fma(self.halves(self.b_addr, g), self.load(self.at(self.sums_addr, g, 4), _f32), bias_acc)
                bias_acc = self.fma(scale, self.load(self.at(residuals, g, 4), _f32), bias_acc)
            return [acc, bias_acc]

        acc, bias_acc = self.loop(self.units, [self.zeros(8), self.const(0.0, _f32)], unit)
        result.append((b.fadd(b.call(self.reduce, [self.const(-0.0, _f32), acc]), bias_acc), b.block))
        b.branch(done)
        b.position_at_end(done)
        total = b.phi(_f32)
        for value, block in result:
            total.add_incoming(value, block)
        self.store(0, total)


@intrinsic
def row_products(typingctx, bits, group_size, tokens, w_addr, s_addr, b_addr, x_addr, dx_addr, sums_addr,
                 x_stride, dx_stride, g_stride, out_addr, out_stride, units):
    """row_products(bits, group_size, tokens, addresses and strides...): `tokens` (1 or TILE) dot
    products of one packed weight row with consecutive quantized activation rows, stored as
    float32. One loop per format and token count is emitted, and a switch on the three picks it:
    the format is a runtime value so that the kernels calling this have no per-format closures,
    which Numba's cache could not find again on the next start."""
    sig = types.void(*[types.int64] * 15)

    def codegen(context, builder, signature, args):
        key = builder.add(builder.add(builder.mul(args[0], ir.Constant(_i64, 4096)),
                                      builder.mul(args[1], ir.Constant(_i64, 16))), args[2])
        done = builder.append_basic_block("formats_done")
        unsupported = builder.append_basic_block("unsupported")
        switch = builder.switch(key, unsupported)
        for bits, group_size in FORMATS:
            for tokens in range(1, TILE + 1):
                block = builder.append_basic_block(f"q{bits}_g{group_size}_t{tokens}")
                switch.add_case(ir.Constant(_i64, bits * 4096 + group_size * 16 + tokens), block)
                builder.position_at_end(block)
                emitter = _RowEmitter(builder, bits, group_size, args[3:])
                emitter.single() if tokens == 1 else emitter.tile(tokens)
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


def matrix_row(m) -> list[int]:
    """A matrix's part of its job's table row (addresses, strides, sizes); kept on the matrix,
    which never moves, so that decoding does not work it out again for every token."""
    cached = getattr(m, "addresses", None)
    if cached is None:
        rows, row_bytes = m.words.shape[0], m.words.strides[0]
        cached = [0] * 12
        cached[W], cached[S], cached[B] = (a.__array_interface__["data"][0] for a in (m.words, m.scales, m.biases))
        cached[W_STRIDE], cached[S_STRIDE] = row_bytes, m.scales.strides[0]
        cached[UNITS] = row_bytes * 8 // m.bits // max(m.group_size, 256 // m.bits)
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
        t = 0
        while t < job[TOKENS]:
            width = min(TILE, job[TOKENS] - t)
            row = job[X_ROW] + t
            x, d = xv.ctypes.data + row * x_stride, xd.ctypes.data + row * d_stride
            # a tile reads the token-minor sums, one token the token-major ones
            s = xs.ctypes.data + row * 4 if width > 1 else xt.ctypes.data + row * xt.strides[0]
            o = out.ctypes.data + (job[OUT_ROW] + t) * o_stride + 4 * job[OUT_COL]
            for n in range(blocks[i, 1], blocks[i, 2]):
                args = (job[W] + n * job[W_STRIDE], job[S] + n * job[S_STRIDE], job[B] + n * job[S_STRIDE],
                        x, d, s, x_stride, d_stride, s_stride, o + 4 * n, o_stride, job[UNITS])
                row_products(bits, group_size, width, *args)
            t += width


def runs_vector(bits: int, group_size: int, cols: int) -> bool:
    """Whether the vector kernels take a matrix of this format and width: they work in units of
    max(group, 32 bytes), so 4-bit rows of 32 values more than a multiple of 64 (no real model has
    them) take the plain kernel, and so do 2-bit groups of 32."""
    return (bits, group_size) in FORMATS and cols % max(group_size, 256 // bits) == 0


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

    @njit(cache=True, nogil=True, parallel=True)
    def matmul(xq, dx, xsum, lanes, scales, biases, half, out):
        T, groups = xq.shape[0], scales.shape[1]
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
    vector = has_vector_kernels() if vector is None else vector
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


# --- the experts ---------------------------------------------------------------------------------

def _swiglu(gate_up):
    T, N = gate_up.shape[0], gate_up.shape[1] // 2
    out = np.empty((T, N), np.float32)
    for t in prange(T):
        for n in range(N):
            g = gate_up[t, n]
            out[t, n] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[t, N + n]
    return out


# Not fastmath: the one-row and many-row variants must round alike (see _quantizer).
_swiglu_serial = njit(cache=True, nogil=True)(_swiglu)
_swiglu_parallel = njit(cache=True, nogil=True, parallel=True)(_swiglu)


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


# --- routing --------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
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


# --- a decoded token's layer in three calls -----------------------------------------------------
# One token's layer is about 60 small operations; run from Python one by one, the time between
# them was a third of the token's. Here they run in three compiled calls: between them, numpy
# writes the KV cache (converting to float16 where asked) and the chosen experts are looked up
# (from an expert cache, when the model runs within a memory budget). The math is the model's,
# step by step. Several sequences decoded together (a server's answers) take the same calls with
# a row each, except attention, which is each sequence's own (attend, then attention_out).

@njit(cache=True, nogil=True)
def _products(x, table, bits, group_size, rows, width):
    """x (float) times the table's matrices, into [rows, width]."""
    xq, dx, sums, sums_by_token = _quantized(x, bits, group_size)
    out = np.empty((rows, width), np.float32)
    _vector_matmul(table, xq, dx, sums, sums_by_token, out, bits, group_size)
    return out


@njit(cache=True, nogil=True)
def _with_tokens(table, tokens):
    """A copy of a job table whose jobs take `tokens` activation rows (the plan's take one)."""
    table = table.copy()
    table[:, TOKENS] = tokens
    return table


@njit(cache=True, nogil=True)
def decode_qkv(x, norm, eps, qkv, bits, group_size, heads, kv_heads, dim, positions, inv_freq):
    """RMSNorm, q k v, RoPE: the attention's inputs for one token, or for one token of each of
    several sequences decoded together (a row each)."""
    T = x.shape[0]
    out = _products(rms_norm(x, norm, eps), _with_tokens(qkv, T), bits, group_size, T, (heads + 2 * kv_heads) * dim)
    q = apply_rope(out[:, :heads * dim].copy().reshape(T, heads, dim), positions, inv_freq)
    k = apply_rope(out[:, heads * dim:(heads + kv_heads) * dim].copy().reshape(T, kv_heads, dim), positions, inv_freq)
    return q, k, out[:, (heads + kv_heads) * dim:].copy().reshape(T, kv_heads, dim)


@njit(cache=True, nogil=True)
def decode_attention(x, q, keys, values, positions, window, half, o, o_bits, o_group, norm, eps, router, k):
    """Attention over the cache and the rest of attention_out, for one token."""
    heads, dim = q.shape[1], q.shape[2]
    attended = np.empty((1, heads * dim), np.float32)
    _attend(q, keys, values, positions, window, half, attended)
    return attention_out(x, attended, o, o_bits, o_group, norm, eps, router, k)


@njit(cache=True, nogil=True)
def attention_out(x, attended, o, o_bits, o_group, norm, eps, router, k):
    """The attention's output projection added to x, then the experts' norm and routing, for each
    row: returns x, the normed h, and the chosen experts [T, k] (each row in index order, as the
    model sums them) with their weights [T, k]."""
    T = x.shape[0]
    x = x + _products(attended, _with_tokens(o, T), o_bits, o_group, T, x.shape[1])
    h = rms_norm(x, norm, eps)
    chosen, weights = route_tokens(h, router, k)
    for t in range(T):
        order = np.argsort(chosen[t])
        chosen[t], weights[t] = chosen[t][order], weights[t][order]
    return x, h, chosen, weights


@njit(cache=True, nogil=True)
def decode_experts(x, h, chosen, weights, experts, up, up_bits, up_group, down, down_bits, down_group):
    """x + the SwiGLU of each row of h by these experts (ids, in index order) where chosen, times
    its weight. up: the table rows of the experts' w1 then their w3, down: of their w2. Each
    expert's rows go through its weights together: one read of them for all the sequences decoded
    together that chose it."""
    n = experts.size
    pairs = 0
    for j in range(n):
        pairs += np.count_nonzero(chosen == experts[j])
    rows, scale = np.empty(pairs, np.int64), np.empty(pairs, np.float32)
    hs = np.empty((pairs, h.shape[1]), np.float32)
    p = 0
    for j in range(n):  # (row, expert) pairs grouped by expert
        up[j, X_ROW] = up[n + j, X_ROW] = down[j, X_ROW] = p
        up[j, OUT_ROW] = up[n + j, OUT_ROW] = down[j, OUT_ROW] = p
        for t in range(chosen.shape[0]):
            for slot in range(chosen.shape[1]):
                if chosen[t, slot] == experts[j]:
                    rows[p], scale[p] = t, weights[t, slot]
                    hs[p] = h[t]
                    p += 1
        up[j, TOKENS] = up[n + j, TOKENS] = down[j, TOKENS] = p - up[j, X_ROW]
        up[n + j, OUT_COL] = up[0, ROWS]
    gate_up = _products(hs, up, up_bits, up_group, pairs, 2 * up[0, ROWS])
    y = _products(_swiglu_serial(gate_up), down, down_bits, down_group, pairs, x.shape[1])
    mixed = np.zeros_like(x)
    for p in range(pairs):  # a row's experts in index order
        mixed[rows[p]] += y[p] * scale[p]
    return x + mixed


# --- dequantize (embedding rows) -----------------------------------------------------------------

def _dequantize_kernel(bits: int):
    per_word = 32 // bits
    mask = np.uint32((1 << bits) - 1)

    @njit(cache=True, nogil=True, parallel=True)
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


_DEQUANTIZE = {bits: _dequantize_kernel(bits) for bits in (2, 4, 8)}


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
