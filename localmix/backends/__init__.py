"""Backends: what runs the model's operations. model.py calls them through an `Ops` instance, so
the model reads the same whatever runs it; each backend keeps what it prepares from the weights in
its own instance.

- numpy: `model.Ops`, the float32 reference (quantized weights are dequantized, then BLAS).
- numba: the CPU kernels of localmix.kernels on the packed weights (backends/numba.py).
- mlx, mlx-f32: layers on MLX (Metal on Apple Silicon; mlx[cpu] elsewhere), float16 or float32
  activations (backends/mlx.py).
- auto: mlx on Apple Silicon where MLX is installed, numba elsewhere.
"""

from __future__ import annotations

import importlib.util
import platform

from localmix.backends.numba import NumbaOps
from localmix.errors import LocalmixError
from localmix.model import Ops

BACKENDS = ("auto", "numba", "numpy", "mlx", "mlx-f32")

__all__ = ["BACKENDS", "NumbaOps", "apple_silicon", "backend_ops", "resolve_backend"]


def resolve_backend(name: str) -> str:
    """A backend's name, with "auto" made MLX on Apple Silicon where it is installed, else Numba."""
    if name not in BACKENDS:
        raise LocalmixError(f"unknown backend {name!r}: use {', '.join(BACKENDS)}")
    if name == "auto":
        return "mlx" if apple_silicon() and importlib.util.find_spec("mlx") else "numba"
    return name


def backend_ops(name: str) -> Ops:
    name = resolve_backend(name)
    if name.startswith("mlx"):
        try:
            from localmix.backends.mlx import MLXFloat32Ops, MLXOps
        except ImportError:
            raise LocalmixError("the mlx backend needs MLX: pip install 'localmix[mlx]' (on Linux: "
                                "pip install 'mlx[cpu]')") from None
        return MLXFloat32Ops() if name == "mlx-f32" else MLXOps()
    return NumbaOps() if name == "numba" else Ops()


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"
