"""The vector row product, emitted as LLVM IR through Numba's `@intrinsic` (x86 with AVX2).

The weights stay packed. A 32-byte chunk is read as 16 lanes of 16 bits; lane i holds values
i*vpl .. i*vpl+vpl-1 of the chunk (vpl = 16 / bits values per lane), so `(lane >> bits*j) & mask` is
value j of every lane at once. 3-bit weights come in 24-byte chunks, spread into the same 16 lanes
of 4 values by a byte shuffle and a shift (three_bit_lanes), then read as the others. The activations are stored in that order (value j of every lane side
by side, see localmix.kernels.activations), so the product of a chunk is vpl `pmaddwd`s on
registers, with no unpacking to bytes and no shuffles; in prompts `vpdpwssd` where the CPU has VNNI
(12% faster here). The float accumulators stay in registers for the whole row.

Per group, in float32: s dx (q . v) + b sum(x) + s m (sum(x) - sum(x~)): the weights centred on the
middle m of their range (see quantize_activations). One token (decoding) sums eight groups' dot
products across lanes together and converts their scales as one vector; a prompt multiplies tiles of
TILE tokens by TILE_ROWS rows per pass (localmix.kernels.products passes tiles over blocks of rows):
each chunk of weights is unpacked once for the tile's tokens, each activation vector loaded once for
its rows.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from localmix.kernels.features import (FORMATS, PREFETCH, TILE, TILE_ROWS, WIDE_TILE, WIDE_VECTORS,
                                       values_per_lane, vnni_instruction, wide_decode)


# Numba does not set up LLVM's assembly parser, which the inline vpdpwssd needs: whenever a kernel
# holding it is compiled, or linked from Numba's cache into another kernel being compiled.
llvm.initialize_native_asmparser()


# A unit is max(group, chunk) values: one group of 1, 2 or 4 chunks of 32 bytes, or one chunk of
# two groups (4 bits, group 32). Its integer dot product is an [8 x i32] vector per token.

_i16, _i32, _i64, _f32 = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
THREE_BIT_SHIFT = 4  # where a 3-bit lane's first value starts (see _RowEmitter.three_bit_lanes)


def _vector(t, n):
    return ir.VectorType(t, n)


def _llvm_function(module, name, ret, args):
    if name in module.globals:
        return module.globals[name]
    return ir.Function(module, ir.FunctionType(ret, args), name=name)


class _RowEmitter:
    """Builds the IR of one format's row products; `args` are the intrinsic's runtime operands."""

    def __init__(self, builder, bits, group_size, args, width=256):
        self.b, self.bits, self.width = builder, bits, width
        (self.w_addr, self.s_addr, self.b_addr, self.x_addr, self.dx_addr, self.sums_addr, self.x_stride,
         self.dx_stride, self.g_stride, self.out_addr, self.out_stride, self.units, self.w_row_stride,
         self.s_row_stride) = args
        # a chunk is one vector of weights: 32 bytes (256 bits) or 64 (512 bits)
        self.lanes = width // 32  # int32 (and float) lanes of a vector; twice as many int16 lanes
        self.i16s, self.i32s = _vector(_i16, 2 * self.lanes), _vector(_i32, self.lanes)
        self.f32s = _vector(_f32, self.lanes)
        self.per_lane = values_per_lane(bits)
        self.chunk_values = 2 * self.lanes * self.per_lane
        self.chunk_bytes = self.chunk_values * bits // 8
        unit_values = max(group_size, self.chunk_values)
        self.chunks_per_unit, self.groups_per_unit = unit_values // self.chunk_values, unit_values // group_size
        module = builder.module
        maddwd = "llvm.x86.avx512.pmaddw.d.512" if width == 512 else "llvm.x86.avx2.pmadd.wd"
        self.maddwd = _llvm_function(module, maddwd, self.i32s, [self.i16s, self.i16s])
        # As inline assembly: LLVM turns its own vpdpwssd intrinsic back into pmaddwd + paddd here.
        # 512 bits: EVEX, any of the 32 registers ("v").
        vnni = "vpdpwssd" if width == 512 else vnni_instruction()
        self.dpwssd = vnni and ir.InlineAsm(ir.FunctionType(self.i32s, [self.i32s, self.i16s, self.i16s]),
                                            f"{vnni} $3, $2, $0", "=v,0,v,v" if width == 512 else "=x,0,x,x")
        self.prefetch = _llvm_function(module, "llvm.prefetch.p0", ir.VoidType(),
                                       [ir.IntType(8).as_pointer(), _i32, _i32, _i32])
        self.reduce = _llvm_function(module, f"llvm.vector.reduce.fadd.v{self.lanes}f32", _f32, [_f32, self.f32s])

    def three_bit_lanes(self, addr):
        """A 3-bit chunk (24 bytes, or 48: 64 or 128 values, a little-endian stream of 3-bit values)
        as 16-bit lanes of 4 values each, lane i holding values 4i..4i+3 at bits 4, 7, 10, 13 (read
        with THREE_BIT_SHIFT added to the shifts): lane i's 12 bits start at bit 12i of the chunk, in
        bytes 3i/2 and the next. Each 128-bit quarter of lanes (8 lanes, 12 bytes) is one 16-byte
        load, within the chunk, and one in-lane byte shuffle (vpshufb); even lanes are then shifted
        left by 4 (odd ones start at bit 4 of their pair already), a multiplication by a constant."""
        b, byte16 = self.b, _vector(ir.IntType(8), 16)
        quarters = []
        for q in range(self.lanes // 4):
            skip = 4 * (q % 2)  # odd quarters load 4 bytes early: the last one ends at the chunk's end
            piece = self.load(addr, byte16, self.const(12 * q - skip))
            pairs = [skip + 3 * i // 2 + k for i in range(8) for k in (0, 1)]
            quarters.append(b.shuffle_vector(piece, piece, ir.Constant(_vector(_i32, 16), pairs)))
        while len(quarters) > 1:
            n = 2 * quarters[0].type.count
            quarters = [b.shuffle_vector(quarters[k], quarters[k + 1], ir.Constant(_vector(_i32, n), list(range(n))))
                        for k in range(0, len(quarters), 2)]
        lanes = b.bitcast(quarters[0], self.i16s)
        return b.shl(lanes, ir.Constant(self.i16s, [4 * (1 - i % 2) for i in range(2 * self.lanes)]))

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
        """One float per group of a unit as a vector of the int32 lanes' floats: the groups of a
        unit come in its lanes' order (with two groups per 32-byte chunk, lanes 0-3 hold the first:
        they come from its first 128 bits; a 64-byte chunk's second half is the next chunk)."""
        # each value broadcast to its lanes, then the pieces put side by side (vbroadcastss and
        # vinsert*: fewer instructions than inserting scalars and permuting)
        parts = [self.splat(value, self.lanes // len(values)) for value in values]
        while len(parts) > 1:
            width = 2 * parts[0].type.count
            side_by_side = ir.Constant(_vector(_i32, width), list(range(width)))
            parts = [self.b.shuffle_vector(parts[k], parts[k + 1], side_by_side) for k in range(0, len(parts), 2)]
        return parts[0]

    def row_addr(self, addr, r, stride):  # row r of a tile of rows
        return addr if r == 0 else self.b.add(addr, self.b.mul(self.const(r), stride))

    def unit_dots(self, u, tokens, rows=1):
        """[lanes x i32] partial dot products of unit u of each row with each token's activations
        (sums[r][t]): each weight chunk is unpacked once for all tokens, each activation vector
        loaded once for all rows."""
        b, sums = self.b, [[None] * tokens for _ in range(rows)]
        mask = ir.Constant(self.i16s, [(1 << self.bits) - 1] * (2 * self.lanes))
        for c in range(self.chunks_per_unit):
            chunk = b.add(b.mul(u, self.const(self.chunks_per_unit)), self.const(c))
            lanes = []
            for r in range(rows):
                w_chunk = self.at(self.row_addr(self.w_addr, r, self.w_row_stride), chunk, self.chunk_bytes)
                w = self.load(w_chunk, self.i16s) if self.bits != 3 else self.three_bit_lanes(w_chunk)
                ahead = b.add(w_chunk, self.const(PREFETCH))
                b.call(self.prefetch, [b.inttoptr(ahead, ir.IntType(8).as_pointer()), self.const(0, _i32),
                                       self.const(3, _i32), self.const(1, _i32)])
                start = THREE_BIT_SHIFT if self.bits == 3 else 0
                lanes.append([b.and_(b.lshr(w, ir.Constant(self.i16s, [start + self.bits * j] * (2 * self.lanes))), mask)
                              for j in range(self.per_lane)])
            # activations in 64-byte blocks of weights: value j of the block's 32 lanes side by side
            if self.width == 512:
                x_chunk = self.at(self.x_addr, chunk, 2 * self.chunk_values)
            else:  # a 32-byte chunk is half of a block
                x_chunk = b.add(self.at(self.x_addr, b.ashr(chunk, self.const(1)), 4 * self.chunk_values),
                                b.mul(b.and_(chunk, self.const(1)), self.const(32)))
            for t in range(tokens):
                x_t = b.add(x_chunk, b.mul(self.const(t), self.x_stride))
                for j in range(self.per_lane):
                    xj = self.load(x_t, self.i16s, self.const(64 * j))
                    for r in range(rows):
                        # vpdpwssd for tiles only: alone, its chained accumulation is slower than
                        # pmaddwd + paddd (one token streams 20 GB/s here with those, 17 with it)
                        if self.dpwssd and tokens > 1 and (sums[r][t] is not None or self.width == 512):
                            start = ir.Constant(self.i32s, [0] * self.lanes) if sums[r][t] is None else sums[r][t]
                            sums[r][t] = b.call(self.dpwssd, [start, lanes[r][j], xj])
                        else:
                            p = b.call(self.maddwd, [lanes[r][j], xj])
                            sums[r][t] = p if sums[r][t] is None else b.add(sums[r][t], p)
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

    def store(self, t, value, r=0):  # out[t, r]
        b = self.b
        at = b.add(b.add(self.out_addr, b.mul(self.const(t), self.out_stride)), self.const(4 * r))
        b.store(value, b.inttoptr(at, _f32.as_pointer()))

    def zeros(self, n):
        return ir.Constant(_vector(_f32, n), [0.0] * n)

    def tile(self, tokens, rows):
        """A tile of tokens times a tile of consecutive rows: the weights are unpacked once per
        unit for all the tokens, the activations loaded once for all the rows. The sums
        (token-minor) give the biases' part of all the tile's tokens as one vector."""
        b = self.b

        def body(u, carried):
            acc, bias_acc = carried[:rows * tokens], carried[rows * tokens:]
            sums = self.unit_dots(u, tokens, rows)
            groups = [b.add(b.mul(u, self.const(self.groups_per_unit)), self.const(k))
                      for k in range(self.groups_per_unit)]
            dx = [self.lanes_of([self.load(self.at(b.add(self.dx_addr, b.mul(self.const(t), self.dx_stride)), g, 4),
                                           _f32) for g in groups]) for t in range(tokens)]
            new_acc, new_bias = [], []
            for r in range(rows):
                scales = [self.halves(self.row_addr(self.s_addr, r, self.s_row_stride), g) for g in groups]
                biases = [self.halves(self.row_addr(self.b_addr, r, self.s_row_stride), g) for g in groups]
                scale = self.lanes_of(scales)
                for t in range(tokens):
                    new_acc.append(self.fma(b.sitofp(sums[r][t], self.f32s), b.fmul(scale, dx[t]),
                                            acc[r * tokens + t]))
                row_bias = bias_acc[r]
                for bias, scale_g, g in zip(biases, scales, groups):  # b sum(x) + s m (sum x - sum x~)
                    sums_g = b.add(self.sums_addr, b.mul(g, self.g_stride))
                    row_bias = self.fma(self.splat(bias, tokens), self.load(sums_g, _vector(_f32, tokens)), row_bias)
                    residual = self.load(sums_g, _vector(_f32, tokens), b.sdiv(self.g_stride, self.const(2)))
                    row_bias = self.fma(self.splat(scale_g, tokens), residual, row_bias)
                new_bias.append(row_bias)
            return new_acc + new_bias

        final = self.loop(self.units, [self.zeros(self.lanes)] * (rows * tokens) + [self.zeros(tokens)] * rows, body)
        for r in range(rows):
            for t in range(tokens):
                total = b.fadd(b.call(self.reduce, [self.const(-0.0, _f32), final[r * tokens + t]]),
                               b.extract_element(final[rows * tokens + r], self.const(t, _i32)))
                self.store(t, total, r)

    def single(self):
        """One token (decoding). Where a unit is one group and the groups come in eights, eight
        units' dot products are summed across lanes together (a transpose by shuffles), so that
        scales, biases and activation sums are read and converted eight at a time, as vectors;
        otherwise unit by unit. In 512 bits (one token's 4-bit products on one core +14% on a
        Zen 5, where 256-bit unpacking could not keep up with memory) always by eights of groups.
        The sums here are token-major: [sum x of every group, then m (sum x - sum x~) of every
        group]."""
        b = self.b
        groups_total = b.mul(self.units, self.const(self.groups_per_unit))
        residuals = b.add(self.sums_addr, b.mul(groups_total, self.const(4)))
        done = b.append_basic_block("single_done")
        result = []
        # 512 bits: a unit is one or two groups (callers see to it: wide_decode), its 256-bit halves
        # are two groups' [8 x i32] dot products or one's, and the groups come in eights
        units_per_eight = 8 // self.groups_per_unit
        reduce8 = _llvm_function(b.module, "llvm.vector.reduce.fadd.v8f32", _f32, [_f32, _vector(_f32, 8)])
        if self.groups_per_unit == 1 or self.width == 512:
            blocked = b.append_basic_block("by_eight")
            by_unit = b.append_basic_block("by_unit") if self.width == 256 else None
            if by_unit is None:
                b.branch(blocked)
            else:
                b.cbranch(b.icmp_signed("==", b.srem(groups_total, self.const(8)), self.const(0)), blocked, by_unit)
            b.position_at_end(blocked)

            def group_dots(u):
                dot = self.unit_dots(u, 1)[0][0]
                if self.width == 256:
                    return [dot]
                halves = [b.shuffle_vector(dot, dot, ir.Constant(_vector(_i32, 8), list(range(h, h + 8))))
                          for h in (0, 8)]
                return halves if self.groups_per_unit == 2 else [b.add(*halves)]

            def eight(i, carried):
                acc, bias_acc = carried
                dots = [d for k in range(units_per_eight)
                        for d in group_dots(b.add(b.mul(i, self.const(units_per_eight)), self.const(k)))]
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

            acc, bias_acc = self.loop(b.sdiv(groups_total, self.const(8)), [self.zeros(8), self.zeros(8)], eight)
            result.append((b.fadd(b.call(reduce8, [self.const(-0.0, _f32), acc]),
                                  b.call(reduce8, [self.const(-0.0, _f32), bias_acc])), b.block))
            b.branch(done)
            if by_unit is None:
                return self.finish(done, result)
            b.position_at_end(by_unit)

        def unit(u, carried):
            acc, bias_acc = carried
            dot = self.unit_dots(u, 1)[0][0]
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
        result.append((b.fadd(b.call(reduce8, [self.const(-0.0, _f32), acc]), bias_acc), b.block))
        b.branch(done)
        self.finish(done, result)

    def finish(self, done, result):
        b = self.b
        b.position_at_end(done)
        total = b.phi(_f32)
        for value, block in result:
            total.add_incoming(value, block)
        self.store(0, total)


@intrinsic
def row_products(typingctx, bits, group_size, tokens, rows, width, w_addr, s_addr, b_addr, x_addr, dx_addr,
                 sums_addr, x_stride, dx_stride, g_stride, out_addr, out_stride, units, w_row_stride, s_row_stride):
    """row_products(bits, group_size, tokens, rows, width, addresses and strides...): the dot
    products of `rows` consecutive packed weight rows (1, or the tile's rows in a full tile) with
    `tokens` (1 to TILE, or WIDE_TILE) consecutive quantized activation rows, stored as float32, in
    vectors of `width` bits (256; 512 where WIDE_VECTORS, for full tiles and wide_decode formats).
    One loop per format and tile shape is emitted, and a switch picks it: the format is a runtime
    value so that the kernels calling this have no per-format closures, which Numba's cache could
    not find again on the next start."""
    sig = types.void(*[types.int64] * 20)
    shapes = [(t, 1, 256) for t in range(1, TILE + 1)] + [(TILE, TILE_ROWS, 256)] * (TILE_ROWS > 1)
    if WIDE_VECTORS:
        shapes += [(1, 1, 512)] + [(tokens, rows, 512) for tokens in (TILE, WIDE_TILE) for rows in (1, 2)]

    def key(bits, group_size, tokens, rows, width):
        return (((bits * 256 + group_size) * 16 + tokens) * 16 + rows) * 2 + (width == 512)

    def codegen(context, builder, signature, args):
        k = args[0]
        for arg, size in zip(args[1:4], (256, 16, 16)):
            k = builder.add(builder.mul(k, ir.Constant(_i64, size)), arg)
        wide = builder.zext(builder.icmp_signed("==", args[4], ir.Constant(_i64, 512)), _i64)
        k = builder.add(builder.mul(k, ir.Constant(_i64, 2)), wide)
        done = builder.append_basic_block("formats_done")
        unsupported = builder.append_basic_block("unsupported")
        switch = builder.switch(k, unsupported)
        for bits, group_size in FORMATS:
            for tokens, rows, width in shapes:
                if (tokens, width) == (1, 512) and not wide_decode(bits, group_size):
                    continue
                block = builder.append_basic_block(f"q{bits}_g{group_size}_t{tokens}_r{rows}_w{width}")
                switch.add_case(ir.Constant(_i64, key(bits, group_size, tokens, rows, width)), block)
                builder.position_at_end(block)
                emitter = _RowEmitter(builder, bits, group_size, args[5:], width)
                emitter.single() if tokens == 1 else emitter.tile(tokens, rows)
                builder.branch(done)
        builder.position_at_end(unsupported)  # callers check the format first
        builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen
