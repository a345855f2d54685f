"""Backends: what runs the model's operations. model.py calls them through an `Ops` class, so the
model reads the same whatever runs it.

- numpy: `model.Ops`, the float32 reference (quantized weights are dequantized, then BLAS).
- numba: the CPU kernels of localmix.kernels on the packed weights; float matrices (routers, a
  float checkpoint's weights) still go through numpy.
"""

from __future__ import annotations

import numpy as np

from localmix import kernels
from localmix.errors import LocalmixError
from localmix.model import Ops

BACKENDS = ("numba", "numpy")


def is_packed(w) -> bool:
    return hasattr(w, "bits")


class NumbaOps(Ops):
    @staticmethod
    def rms_norm(x, weight, eps):
        return kernels.rms_norm(np.ascontiguousarray(x, np.float32), weight, np.float32(eps))

    @staticmethod
    def apply_rope(x, positions, inv_freq):
        return kernels.apply_rope(np.ascontiguousarray(x), np.asarray(positions, np.int64), inv_freq)

    attend = staticmethod(kernels.attend)

    @staticmethod
    def route_tokens(x, router, k):
        return kernels.route_tokens(np.ascontiguousarray(x, np.float32), router, k)

    @staticmethod
    def linears(x, ws):
        if all(is_packed(w) for w in ws):
            return kernels.matmul_many(x, ws)
        return Ops.linears(x, ws)

    @staticmethod
    def experts_ffn(x, experts, counts):
        if is_packed(experts[0].w1):
            return kernels.experts_ffn(x, experts, counts)
        return Ops.experts_ffn(x, experts, counts)


def backend_ops(name: str) -> type[Ops]:
    if name not in BACKENDS:
        raise LocalmixError(f"unknown backend {name!r}: use {' or '.join(BACKENDS)}")
    return NumbaOps if name == "numba" else Ops
