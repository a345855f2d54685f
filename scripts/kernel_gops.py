"""The prompt products' arithmetic rate against the CPU's peak for the instruction they use.

    python scripts/kernel_gops.py [--bits 4,8] [--group-size 64] [--tokens 128] [--threads 2]

Times the kernels on the mini model's expert shapes (two experts' w1 and w3: 3584 x 1024, and
their w2: 1024 x 3584), --tokens prompt rows per expert (a 512-token prompt sends about 128 to each
of 8 experts at top-2), and prints GOPS (2 x multiply-adds per second, best of 5). The peak is
measured too, not taken from a data sheet: a loop of 12 independent vpdpwssd (VNNI) or pmaddwd +
paddd chains on registers only, in 256 and in 512 bits, on every thread: the most int16
multiply-adds the cores can do.
"""

from __future__ import annotations

import argparse
import time
import numpy as np
from llvmlite import ir
from numba import njit, prange, set_num_threads, types
from numba.extending import intrinsic

from localmix import kernels
from localmix.kernels import Job
from localmix.quant.affine import quantize
from localmix.store import QuantizedMatrix

CHAINS = 12


def peak_intrinsic(lanes: int, vnni: bool):
    """A function of n that runs n rounds of CHAINS independent int16 multiply-adds of `lanes`
    int16 values each (vpdpwssd, or pmaddwd then paddd) and returns a value made from them."""
    i16, i32 = ir.VectorType(ir.IntType(16), lanes), ir.VectorType(ir.IntType(32), lanes // 2)
    reg = "v" if lanes == 32 else "x"

    @intrinsic
    def rounds(typingctx, n):
        def codegen(context, builder, signature, args):
            if vnni:
                op = ir.InlineAsm(ir.FunctionType(i32, [i32, i16, i16]), "vpdpwssd $3, $2, $0", f"=v,0,{reg},{reg}")
            else:
                name = "llvm.x86.avx512.pmaddw.d.512" if lanes == 32 else "llvm.x86.avx2.pmadd.wd"
                module = builder.module
                op = module.globals.get(name) or ir.Function(module, ir.FunctionType(i32, [i16, i16]), name=name)
            a = ir.Constant(i16, [3] * lanes)
            entry = builder.block
            loop, done = builder.append_basic_block("loop"), builder.append_basic_block("done")
            builder.branch(loop)
            builder.position_at_end(loop)
            i = builder.phi(ir.IntType(64))
            i.add_incoming(ir.Constant(ir.IntType(64), 0), entry)
            accs = []
            for c in range(CHAINS):
                phi = builder.phi(i32)
                phi.add_incoming(ir.Constant(i32, [c] * (lanes // 2)), entry)
                accs.append(phi)
            # the multiplicand changes with the counter, so nothing is hoisted out of the loop
            b = builder.bitcast(builder.insert_element(ir.Constant(ir.VectorType(ir.IntType(64), lanes // 4), None),
                                                       i, ir.Constant(ir.IntType(32), 0)), i16)
            new = [builder.call(op, [acc, a, b]) if vnni else builder.add(acc, builder.call(op, [a, b]))
                   for acc in accs]
            nxt = builder.add(i, ir.Constant(ir.IntType(64), 1))
            i.add_incoming(nxt, builder.block)
            for phi, value in zip(accs, new):
                phi.add_incoming(value, builder.block)
            builder.cbranch(builder.icmp_signed("<", nxt, args[0]), loop, done)
            builder.position_at_end(done)
            total = new[0]
            for value in new[1:]:
                total = builder.add(total, value)
            return builder.zext(builder.extract_element(total, ir.Constant(ir.IntType(32), 0)), ir.IntType(64))

        return types.int64(types.int64), codegen

    @njit(parallel=True)
    def run(n, threads):
        out = np.zeros(threads, np.int64)
        for t in prange(threads):
            out[t] = rounds(n)
        return out

    return run


def peak_gops(lanes: int, vnni: bool, threads: int) -> float:
    run = peak_intrinsic(lanes, vnni)
    n = 2_000_000
    run(10, threads)
    best = min(timed(run, n, threads) for _ in range(5))
    return 2 * n * CHAINS * lanes * threads / best / 1e9  # lanes int16 products per instruction


def timed(f, *args) -> float:
    start = time.perf_counter()
    f(*args)
    return time.perf_counter() - start


def products_gops(bits: int, group_size: int, tokens: int) -> list[tuple[str, float]]:
    rng = np.random.default_rng(0)
    rates = []
    for name, shape, count in (("w1, w3", (3584, 1024), 4), ("w2", (1024, 3584), 2)):
        matrices = [QuantizedMatrix(*quantize((rng.standard_normal(shape) * 0.05).astype(np.float32), bits, group_size),
                                    bits, group_size, "random") for _ in range(count)]
        x = kernels.quantize_activations(rng.standard_normal((tokens * count, shape[1])).astype(np.float32),
                                         bits, group_size)
        out = np.empty((tokens * count, shape[0]), np.float32)
        jobs = [Job(m, i * tokens, tokens, i * tokens, 0) for i, m in enumerate(matrices)]
        kernels.matmul_batch(x, jobs, out)
        best = min(timed(kernels.matmul_batch, x, jobs, out) for _ in range(5))
        ops = 2 * shape[0] * shape[1] * tokens * count
        rates.append((f"{count} x {shape[0]} x {shape[1]} ({name})", ops / best / 1e9))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    a = parser.parse_args()
    set_num_threads(a.threads)
    vnni = kernels.vnni_instruction() is not None
    wide = kernels.cpu_features().get("avx512bw", False)
    instruction = "vpdpwssd" if vnni else "pmaddwd + paddd"
    print(f"kernels {kernels.kernel_name()}, {a.threads} threads, full tiles of "
          f"{kernels.WIDE_TILE if kernels.WIDE_VECTORS else kernels.TILE} tokens x "
          f"{2 if kernels.WIDE_VECTORS else kernels.TILE_ROWS} rows")
    peaks = {256: peak_gops(16, vnni, a.threads)}
    if wide:
        peaks[512] = peak_gops(32, vnni, a.threads)
    for width, gops in peaks.items():
        print(f"peak {instruction} {width}-bit: {gops:.0f} GOPS")
    width = 512 if kernels.WIDE_VECTORS else 256  # of the full tiles, which do nearly all the work
    for bits in map(int, a.bits.split(",")):
        for shape, gops in products_gops(bits, a.group_size, a.tokens):
            print(f"{bits}-bit group {a.group_size}, {a.tokens} tokens, {shape}: {gops:.0f} GOPS = "
                  f"{100 * gops / peaks[width]:.0f}% of the {width}-bit peak")


if __name__ == "__main__":
    main()
