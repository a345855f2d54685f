"""The quantization math: MLX's layout byte for byte, and the error-minimizing search."""

import numpy as np
import pytest

from localmix.quant.affine import dequantize, pack, quantize, quantize_minmax, unpack

try:
    import mlx.core as mx
except ImportError:  # pragma: no cover - CI installs mlx[cpu]
    mx = None
needs_mlx = pytest.mark.skipif(mx is None, reason="mlx is not installed (pip install 'mlx[cpu]')")

SHAPES = [(64, 128), (33, 256), (8, 384)]
CASES = [(bits, gs) for bits in (4, 8) for gs in (32, 64, 128)]


def weights(shape, seed=0):
    """Like real weights: rows of unequal range and a few outlier columns; fp16-representable."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * 0.02 * np.exp(0.3 * rng.standard_normal((shape[0], 1)))
    w[:, rng.integers(0, shape[1], max(1, shape[1] // 64))] *= 6
    return w.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_roundtrip_little_end_first(bits):
    q = np.random.default_rng(1).integers(0, 1 << bits, (5, 64)).astype(np.uint8)
    words = pack(q, bits)
    assert words.dtype == np.uint32 and words.shape == (5, 64 * bits // 32)
    np.testing.assert_array_equal(unpack(words, bits), q)
    per_word = 32 // bits
    assert words[0, 0] == sum(int(q[0, i]) << (bits * i) for i in range(per_word))


@needs_mlx
@pytest.mark.parametrize("bits, group_size", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_minmax_is_mx_quantize_byte_for_byte(bits, group_size, shape):
    w = weights(shape)
    words, scales, biases = (np.array(a) for a in mx.quantize(mx.array(w.astype(np.float16)), group_size=group_size,
                                                               bits=bits))
    ours = quantize_minmax(w, bits, group_size)
    np.testing.assert_array_equal(ours[1], scales)
    np.testing.assert_array_equal(ours[2], biases)
    np.testing.assert_array_equal(ours[0], words)


@needs_mlx
@pytest.mark.parametrize("bits, group_size", CASES)
def test_dequantize_and_quantized_matmul_read_our_files(bits, group_size):
    """MLX reads what we write: mx.dequantize and mx.quantized_matmul on our arrays."""
    w = weights((48, 256), seed=2)
    words, scales, biases = quantize(w, bits, group_size)
    ours = dequantize(words, scales, biases, bits, group_size)
    theirs = mx.dequantize(mx.array(words), mx.array(scales.astype(np.float32)), mx.array(biases.astype(np.float32)),
                           group_size=group_size, bits=bits)
    np.testing.assert_allclose(np.array(theirs), ours, rtol=0, atol=1e-6)
    x = np.random.default_rng(3).standard_normal((5, 256)).astype(np.float32)
    y = mx.quantized_matmul(mx.array(x), mx.array(words), mx.array(scales.astype(np.float32)),
                            mx.array(biases.astype(np.float32)), transpose=True, group_size=group_size, bits=bits)
    np.testing.assert_allclose(np.array(y), x @ ours.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, group_size", CASES)
def test_search_beats_minmax(bits, group_size):
    w = weights((128, 512), seed=4)
    err = {}
    for name, fn in (("minmax", quantize_minmax), ("search", quantize)):
        words, scales, biases = fn(w, bits, group_size)
        assert scales.dtype == np.float16 and biases.dtype == np.float16
        err[name] = ((dequantize(words, scales, biases, bits, group_size) - w) ** 2).mean()
    assert err["search"] < 0.9 * err["minmax"], err


def test_importance_weights_the_error():
    w = weights((64, 128), seed=5)
    importance = np.ones(128, np.float32)
    importance[:16] = 100.0  # these inputs matter most
    plain = dequantize(*quantize(w, 4, 64), 4, 64)
    weighted = dequantize(*quantize(w, 4, 64, importance=importance), 4, 64)
    assert ((weighted - w)[:, :16] ** 2).mean() < ((plain - w)[:, :16] ** 2).mean()


def test_constant_and_zero_groups():
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.5
    w[2, :] = -3.0
    for fn in (quantize, quantize_minmax):
        out = dequantize(*fn(w, 4, 64), 4, 64)
        np.testing.assert_allclose(out, w, atol=1e-3)


def test_bad_shapes():
    with pytest.raises(ValueError, match="groups of 64"):
        quantize(np.zeros((4, 96), np.float32), 4, 64)


@pytest.mark.parametrize("bits, group_size", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_numba_search_matches_its_numpy_twin(bits, group_size, weighted):
    """The same algorithm in float32 with another summation order: the same scales for nearly all
    groups, and the same error overall (a near-tie may go the other way in a rare group)."""
    w = weights((96, 384), seed=6)
    importance = np.random.default_rng(7).uniform(0.1, 10, 384).astype(np.float32) if weighted else None
    fast = quantize(w, bits, group_size, importance=importance, fast=True)
    reference = quantize(w, bits, group_size, importance=importance, fast=False)
    assert (fast[1] == reference[1]).mean() > 0.99 and (fast[2] == reference[2]).mean() > 0.99
    errors = [((dequantize(*q, bits, group_size) - w) ** 2).mean() for q in (fast, reference)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-3)
