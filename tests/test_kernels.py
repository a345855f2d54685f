"""The Numba kernels against their numpy twins: odd shapes, rows that do not divide among the
threads or the blocks, token counts that do not fill a tile, both bit widths, every group size,
and both the AVX2 path and the plain one.

Tolerances: activations are quantized to int16 with one scale per weight group, so each value is
off by at most dx / 2 = max|x_group| / 65534, and the kernels' product by at most
sum s |q - m| dx / 2 (s the weight scale, q the stored value, m the middle of its range: see
quantize_activations): the tests hold the kernels to that bound plus float32 rounding. It comes
to about 1e-4 of the largest output on these matrices. The two kernel paths compute the same integer sums and differ only in
the order of float additions: 1e-5.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from localmix import kernels, model
from localmix.kernels import Job
from localmix.quant.affine import dequantize, quantize, unpack

SHAPES = [(1, 128), (7, 384), (33, 256), (130, 512), (1000, 256), (5, 1024)]  # 1024: eight units and more
PATHS = [pytest.param(True, id="avx2"), pytest.param(False, id="plain")]


class Packed(NamedTuple):
    words: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int


def packed_matrix(rng, shape, bits, group_size) -> Packed:
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[:, rng.integers(0, shape[1], 3)] *= 8  # outlier columns, as real checkpoints have
    return Packed(*quantize(w, bits, group_size), bits, group_size)


def activations(rng, tokens, width) -> np.ndarray:
    x = rng.standard_normal((tokens, width)).astype(np.float32)
    x[:, rng.integers(0, width, 2)] *= 30  # and massive activations in a few channels
    return x


def needs(vector: bool) -> None:
    if vector and not kernels.has_vector_kernels():
        pytest.skip("this CPU has no AVX2/FMA/F16C: only the plain kernels run here")


def assert_within_activation_rounding(ours, x, m):
    """|ours - W x| <= s |q - m| (dx / 2), with dx the int16 step of each activation's group."""
    w = dequantize(*m[:3], m.bits, m.group_size)
    reference = x @ w.T
    step = np.repeat(kernels.quantize_activations(x, m.bits, m.group_size).scales, m.group_size, axis=1)
    scale = np.repeat(m.scales.astype(np.float32), m.group_size, axis=1)
    centred = scale * np.abs(unpack(m.words, m.bits).astype(np.float32) - 2 ** (m.bits - 1))
    bound = (step / 2) @ centred.T + 2e-6 * (np.abs(x) @ np.abs(w).T) + 1e-6
    assert (np.abs(ours - reference) <= bound).all(), np.abs(ours - reference).max()
    return np.abs(ours - reference).max() / np.abs(reference).max()


def assert_close(ours, reference, rtol):
    np.testing.assert_allclose(ours, reference, rtol=0, atol=rtol * np.abs(reference).max() + 1e-7)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_activations_are_int16_in_kernel_order(bits, group_size):
    rng = np.random.default_rng(bits + group_size)
    x = activations(rng, 5, 512)
    q = kernels.quantize_activations(x, bits, group_size)
    per_lane = kernels.values_per_lane(bits)
    # back to natural order: kernel order is [pair of chunks][slot][chunk][lane], natural
    # [pair][chunk][lane][slot]
    natural = q.values.reshape(5, -1, per_lane, 2, 16).transpose(0, 1, 3, 4, 2).reshape(5, -1)[:, :512]
    scale_per_value = np.repeat(q.scales, group_size, axis=1)
    assert np.abs(natural * scale_per_value - x).max() <= 0.5001 * scale_per_value.max()
    np.testing.assert_allclose(q.scales, np.abs(x).reshape(5, -1, group_size).max(axis=2) / 32767, rtol=1e-6)
    np.testing.assert_allclose(q.sums[:, 0].T, x.reshape(5, -1, group_size).sum(axis=2), rtol=1e-5, atol=1e-4)
    rounded = (natural * scale_per_value).reshape(5, -1, group_size).sum(axis=2)
    float_rounding = 2 ** (bits - 1) * 1e-6 * np.abs(x).reshape(5, -1, group_size).sum(axis=2)  # of the sums
    assert (np.abs(q.sums[:, 1].T - 2 ** (bits - 1) * (q.sums[:, 0].T - rounded)) <= float_rounding).all()
    assert np.abs(natural).max() == 32767
    np.testing.assert_array_equal(q.sums_by_token, q.sums.transpose(2, 1, 0))  # the same, token-major


def test_zero_activations_quantize_without_dividing_by_zero():
    q = kernels.quantize_activations(np.zeros((2, 128), np.float32), 4, 64)
    assert (q.values == 0).all() and (q.scales == 1).all() and (q.sums == 0).all()


@pytest.mark.parametrize("vector", PATHS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])  # 2, 3: small experts (2: the cache's shadow copies too)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_matches_its_twin(vector, bits, group_size, shape):
    needs(vector)
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + bits + group_size)
    m = packed_matrix(rng, shape, bits, group_size)
    for tokens in (1, 3, kernels.TILE, 2 * kernels.TILE + 1):
        x = activations(rng, tokens, shape[1])
        ours = kernels.matmul(x, m, vector=vector)
        assert ours.shape == (tokens, shape[0])
        assert_within_activation_rounding(ours, x, m)


def test_rows_that_are_not_whole_vector_units_still_multiply():
    """4-bit rows of 96 values: one and a half 32-byte chunks."""
    rng = np.random.default_rng(8)
    m = packed_matrix(rng, (9, 96), 4, 32)
    x = activations(rng, 3, 96)
    assert_within_activation_rounding(kernels.matmul(x, m), x, m)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_both_kernel_paths_give_the_same_sums(bits, group_size):
    needs(True)
    rng = np.random.default_rng(7)
    m = packed_matrix(rng, (77, 384), bits, group_size)
    x = activations(rng, 6, 384)
    assert_close(kernels.matmul(x, m, vector=True), kernels.matmul(x, m, vector=False), 1e-5)


@pytest.mark.parametrize("vector", PATHS)
def test_a_batch_writes_each_job_where_it_belongs_and_nowhere_else(vector):
    needs(vector)
    rng = np.random.default_rng(11)
    a, b, c = (packed_matrix(rng, (rows, 256), 4, 64) for rows in (40, 17, 64))
    x = activations(rng, 9, 256)
    out = np.full((12, 200), np.nan, np.float32)
    jobs = [Job(a, 0, 5, 0, 0), Job(b, 5, 4, 7, 3), Job(c, 2, 6, 1, 100)]
    kernels.matmul_batch(kernels.quantize_activations(x, 4, 64), jobs, out, vector)
    expected = np.full_like(out, np.nan)
    for m, x_row, tokens, out_row, out_col in jobs:
        expected[out_row:out_row + tokens, out_col:out_col + m.words.shape[0]] = 0
        assert_within_activation_rounding(out[out_row:out_row + tokens, out_col:out_col + m.words.shape[0]],
                                          x[x_row:x_row + tokens], m)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    with pytest.raises(ValueError, match="differ in bits"):
        kernels.matmul_batch(kernels.quantize_activations(x, 4, 64), [jobs[0], Job(packed_matrix(rng, (4, 256), 8, 64),
                                                                                     0, 1, 0, 0)], out, vector)


def test_matmul_many_groups_matrices_by_format():
    rng = np.random.default_rng(5)
    ms = [packed_matrix(rng, (24, 256), 4, 64), packed_matrix(rng, (8, 256), 8, 64), packed_matrix(rng, (8, 256), 4, 32)]
    x = activations(rng, 3, 256)
    for ours, m in zip(kernels.matmul_many(x, ms), ms):
        assert_within_activation_rounding(ours, x, m)


class Expert(NamedTuple):
    w1: Packed
    w2: Packed
    w3: Packed


@pytest.mark.parametrize("vector", PATHS)
def test_fused_experts_match_the_model_s_expert(vector):
    needs(vector)
    rng = np.random.default_rng(2)
    hidden, ffn = 128, 320
    experts = [Expert(packed_matrix(rng, (ffn, hidden), 4, 64), packed_matrix(rng, (hidden, ffn), 4, 64),
                      packed_matrix(rng, (ffn, hidden), 4, 64)) for _ in range(4)]
    counts = [3, 0, 1, 6]  # an expert with no tokens, and one that fills a tile and a half
    x = activations(rng, sum(counts), hidden)
    ours = kernels.experts_ffn(x, experts, counts, vector)
    dense = [model.Expert(*(dequantize(*m[:3], m.bits, m.group_size) for m in e)) for e in experts]
    reference = model.experts_ffn(x, dense, counts)
    assert_close(ours, reference, 1e-3)


def test_swiglu_matches_its_twin():
    gate_up = np.random.default_rng(0).standard_normal((5, 2 * 37)).astype(np.float32) * 10
    np.testing.assert_allclose(kernels.swiglu(gate_up), kernels.swiglu_reference(gate_up), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_routing_matches_the_model(k, renormalize):
    rng = np.random.default_rng(k)
    x, router = rng.standard_normal((9, 64)).astype(np.float32), rng.standard_normal((8, 64)).astype(np.float32)
    router[5] = router[2]  # a tie: the lower index goes first
    no_bias = np.zeros(len(router), np.float32)
    chosen, weights = kernels.route_tokens(x, router, k, renormalize, no_bias)
    expected_chosen, expected_weights = model.route_tokens(x, router, k, renormalize)
    assert np.allclose(weights.sum(axis=1), 1) == (renormalize or k == 8)
    np.testing.assert_array_equal(chosen, expected_chosen)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)
    bias = rng.standard_normal(len(router)).astype(np.float32)  # gpt-oss's router has one
    chosen, weights = kernels.route_tokens(x, router, k, renormalize, bias)
    expected_chosen, expected_weights = model.route_tokens(x, router, k, renormalize, bias)
    np.testing.assert_array_equal(chosen, expected_chosen)
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-5)


def test_rms_norm_and_rope_match_the_model():
    rng = np.random.default_rng(4)
    x, weight = rng.standard_normal((6, 96)).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    np.testing.assert_allclose(kernels.rms_norm(x, weight, np.float32(1e-5)), model.rms_norm(x, weight, 1e-5),
                               rtol=1e-5, atol=1e-6)
    from localmix.config import ModelArgs
    args = ModelArgs.from_hf_config({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                                     "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 10,
                                     "rope_theta": 1e6})
    inv_freq = model.rope_inverse_frequencies(args)
    q = rng.standard_normal((5, 2, 32)).astype(np.float32)
    positions = np.arange(1000, 1005)
    expected = model.apply_rope(q, positions, inv_freq)
    np.testing.assert_allclose(kernels.apply_rope(q.copy(), positions, inv_freq), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_matches_the_model(heads, kv_heads, window, dtype):
    rng = np.random.default_rng(heads + kv_heads)
    dim, length = 32, 150  # more than two blocks of keys
    keys = rng.standard_normal((length, kv_heads, dim)).astype(dtype)
    values = rng.standard_normal((length, kv_heads, dim)).astype(dtype)
    # decoding; a prompt's tokens after cached ones; more than two blocks of query tokens
    for tokens in (1, 4, 40):
        positions = np.arange(length - tokens, length)
        q = rng.standard_normal((tokens, heads, dim)).astype(np.float32)
        ours = kernels.attend(q, keys, values, positions, window)
        reference = model.attend(q, keys.astype(np.float32), values.astype(np.float32), positions, window)
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_kernel_matches_its_twin(bits):
    m = packed_matrix(np.random.default_rng(bits), (33, 256), bits, 64)
    np.testing.assert_array_equal(kernels.dequantize(*m[:3], bits, 64), dequantize(*m[:3], bits, 64))


def test_exp32_is_within_three_ulps_of_numpy_s_exp():
    from localmix.kernels.exp import exp32_array, exp32_reference
    x = np.concatenate([np.linspace(-100, 100, 400_001), [0.0, -0.0, 1e-30, -1e-30]]).astype(np.float32)
    ours, reference = exp32_array(x), exp32_reference(x)
    assert np.isfinite(ours).all() and (ours > 0).all()
    ulps = np.abs(ours.view(np.int32).astype(np.int64) - reference.view(np.int32).astype(np.int64))
    assert ulps.max() <= 3, x[np.argmax(ulps)]


def test_half_table_decodes_every_float16():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(kernels.HALF_TO_FLOAT[finite], expected[finite])


def test_the_avx2_path_without_vnni(tmp_path):
    """CPUs with AVX2 but no VNNI run pmaddwd + paddd, and with 16 vector registers a tile of one
    row: compiled here for Haswell in a separate process, with its own Numba cache (the kernels
    compiled for this CPU are cached with VNNI)."""
    needs(True)
    script = tmp_path / "check.py"
    script.write_text(
        "import numpy as np\n"
        "from localmix import kernels\n"
        "from test_kernels import packed_matrix, activations, assert_within_activation_rounding\n"
        "assert kernels.vnni_instruction() is None and kernels.TILE_ROWS == 1 and not kernels.WIDE_VECTORS\n"
        "rng = np.random.default_rng(0)\n"
        "for bits, group_size in kernels.FORMATS:\n"
        "    m = packed_matrix(rng, (37, 256), bits, group_size)\n"
        "    x = activations(rng, kernels.TILE + 1, 256)\n"
        "    assert_within_activation_rounding(kernels.matmul(x, m, vector=True), x, m)\n"
        "print('ok')\n")
    env = {**os.environ, "LOCALMIX_KERNELS": "avx2", "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "NUMBA_CPU_NAME": "haswell", "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("NUMBA_CPU_FEATURES", None)
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_256_bit_setting_keeps_to_256_bits(tmp_path):
    """LOCALMIX_KERNELS=avx2-vnni: no 512-bit vectors even where the CPU has them, VNNI where it has
    it; the products still match their twin (in a process of its own, with its own Numba cache)."""
    needs(True)
    script = (
        "import numpy as np\n"
        "from localmix import kernels\n"
        "from test_kernels import packed_matrix, activations, assert_within_activation_rounding\n"
        "assert not kernels.WIDE_VECTORS and kernels.kernel_name() in ('avx2-vnni', 'avx2')\n"
        "rng = np.random.default_rng(0)\n"
        "m = packed_matrix(rng, (37, 1024), 4, 64)\n"
        "for tokens in (1, 9):\n"
        "    x = activations(rng, tokens, 1024)\n"
        "    assert_within_activation_rounding(kernels.matmul(x, m, vector=True), x, m)\n"
        "print('ok')\n")
    env = {**os.environ, "LOCALMIX_KERNELS": "avx2-vnni", "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
           "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="x86-64 Linux machine code")
def test_an_instruction_that_faults_is_found_in_a_child_process():
    """amx_usable tries AMX's tiles in a forked child: a listed instruction that faults there (as
    ud2 always does) reports False, and this process lives on."""
    from localmix.kernels.features import runs_in_child
    assert runs_in_child(b"\xc3") is True            # ret
    assert runs_in_child(b"\x0f\x0b\xc3") is False   # ud2: SIGILL in the child
    assert isinstance(kernels.amx_usable(), bool)


def test_each_kernels_setting_compiles_into_a_cache_folder_of_its_own(tmp_path):
    """LOCALMIX_KERNELS changes what the kernels compile to (avx2: no vpdpwssd), and Numba's cache
    knows only the source and the CPU: a cached default build must not answer for LOCALMIX_KERNELS=avx2."""
    def folder(setting):
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "LOCALMIX_KERNELS")}
        env.update(LOCALMIX_HOME=str(tmp_path), **({"LOCALMIX_KERNELS": setting} if setting else {}))
        return subprocess.run([sys.executable, "-c", "import localmix, os; print(os.environ['NUMBA_CACHE_DIR'])"],
                              env=env, capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    folders = [folder(None), folder("avx2"), folder("plain"), folder(None)]
    assert folders[0] == folders[3] and len(set(folders)) == 3
    assert all(f.startswith(str(tmp_path)) for f in folders)


def test_serial_and_parallel_variants_are_cached_apart(tmp_path):
    """SwiGLU's and the quantizer's one-row and many-row variants have the same code; Numba's cache,
    which keys a function by its code and closure values and not by its options, must not hand the
    variant compiled first (here the one-row one) to the other: each compiles its own, in a fresh cache."""
    script = (
        "import numpy as np\n"
        "from localmix.kernels import activations, experts\n"
        "experts.swiglu(np.ones((1, 4), np.float32)); experts.swiglu(np.ones((3, 4), np.float32))\n"
        "activations.quantize_activations(np.ones((1, 64), np.float32), 4, 64)\n"
        "activations.quantize_activations(np.ones((3, 64), np.float32), 4, 64)\n"
        "many = [experts._swiglu_parallel, activations._QUANTIZERS[4, 64, True]]\n"
        "print(*[sum(f.stats.cache_misses.values()) for f in many])\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "1"], result.stdout
