"""The Numba kernels against their numpy twins: odd shapes, rows that do not divide among the
threads, both bit widths, every group size, prompts and single tokens."""

import numpy as np
import pytest

from localmix import kernels
from localmix.quant.affine import dequantize, quantize

SHAPES = [(1, 128), (7, 384), (33, 256), (130, 512)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_their_twins(bits, group_size, shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + bits + group_size)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[:, rng.integers(0, shape[1], 3)] *= 8
    packed = quantize(w, bits, group_size)
    np.testing.assert_array_equal(kernels.dequantize(*packed, bits, group_size), dequantize(*packed, bits, group_size))
    x = rng.standard_normal(shape[1]).astype(np.float32)
    ours, reference = kernels.matvec(x, *packed, bits, group_size), kernels.matvec_reference(x, *packed, bits, group_size)
    assert ours.shape == (shape[0],)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-6 * np.abs(reference).max() + 1e-7)


def test_half_table_decodes_every_float16():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(kernels.HALF_TO_FLOAT[finite], expected[finite])
