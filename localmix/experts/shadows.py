"""Shadow copies: every expert again at 2 bits, kept beside the slots, so that a decoded token whose
expert is not in a slot runs the copy at once instead of waiting for the disk (ExpertCache.token_experts).
"""

from __future__ import annotations

from localmix.errors import LocalmixError
from localmix.quant.affine import quantize
from localmix.store import QuantizedMatrix, expert_matrix

SHADOW_BITS = (2,)  # the copies' width: the smallest the vector kernels run (in groups of 64)
SHADOW_SEARCH_STEPS = 4  # of quantize()'s scale search: most of its gain at 2 bits (rel. error 0.347 vs 0.345 with 20
                         # on Gaussian weights, 0.395 with none), at a fifth of the time


def check_shadow_bits(bits: int) -> int:
    if bits and bits not in SHADOW_BITS:
        raise LocalmixError(f"shadow copies are {' or '.join(map(str, SHADOW_BITS))}-bit, not {bits} (0: none)")
    return bits


def shadow_matrix(m: QuantizedMatrix, bits: int) -> QuantizedMatrix:
    """A low-bit copy of a stored matrix: dequantized and quantized again at `bits`, in groups of
    64 (or the matrix's own where larger: the kernels run 2-bit groups of 64 and 128)."""
    from localmix.kernels import dequantize
    group_size = max(64, m.group_size)
    w = dequantize(m.words, m.scales, m.biases, m.bits, m.group_size)
    words, scales, biases = quantize(w, bits, group_size, steps=SHADOW_SEARCH_STEPS)
    return QuantizedMatrix(words, scales, biases, bits, group_size, f"{m.source} ({bits}-bit shadow)")


def shadow_bytes(manifest: dict, bits: int) -> int:
    """The memory that `bits`-bit shadow copies of all the experts take (see shadow_matrix)."""
    total = 0
    for name, t in manifest["tensors"].items():
        matrix = expert_matrix(name)
        if matrix and matrix[2].startswith("w"):  # (not an expert's bias: those stay float32)
            rows, cols = t["shape"]
            total += rows * cols * bits // 8 + rows * (cols // max(64, t["group_size"])) * 4
    return total
