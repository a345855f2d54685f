"""exp in float32 that LLVM vectorizes: Cephes' expf (range reduction by ln 2 in two parts, a degree-6
polynomial, 2^n put into the exponent bits). np.exp in a Numba loop calls libm once per value; this
vectorizes (a 512-token prompt's SwiGLU: 0.15 s -> 0.02 s on the mini model) and is within 3 float32
ulps of np.exp (a relative 2.4e-7).
It is not fastmath: every kernel that calls it rounds alike, one row or many.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_LOG2E = np.float32(1.44269504088896341)
_LN2_HIGH, _LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = high + low
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                         4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_LOWEST, _HIGHEST = np.float32(-87.3), np.float32(88.3)  # n in [-126, 127]: 2^n is a normal float32


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bits are this int32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always")
def exp32(x):
    x = min(max(np.float32(x), _LOWEST), _HIGHEST)
    n = np.float32(np.rint(x * _LOG2E))
    r = x - n * _LN2_HIGH - n * _LN2_LOW
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    p = p * r * r + r + np.float32(1.0)
    return p * _float_from_bits(np.int32((np.int32(n) + 127) << 23))


def exp32_reference(x: np.ndarray) -> np.ndarray:
    """The numpy twin: float32 exp, clamped to the same range."""
    return np.exp(np.clip(np.asarray(x, np.float32), _LOWEST, _HIGHEST))


@njit(cache=True, nogil=True)
def exp32_array(x):
    """exp32 of each value of a float32 array (the tests' way in)."""
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = exp32(x[i])
    return out
