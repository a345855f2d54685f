"""The MLX backend against the numpy reference on the same quantized models (mlx[cpu] on Linux).

Tolerances, as max |difference| over max |logit|: float32 activations 1e-4 (MLX and numpy sum
the same products in different orders: about 1e-6 measured); float16 activations 1e-2 (each
product rounded to float16, 10 bits of mantissa, over two layers: about 5e-3 measured).
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'mlx[cpu]' on Linux)")

import localmix  # noqa: E402
from localmix.quant.convert import LocalSource, convert  # noqa: E402

from conftest import make_hf_model  # noqa: E402
from test_cli import localmix_cli  # noqa: E402
from test_expert_cache import budget, prompt_then_decode  # noqa: E402

CASES = {  # name: (bits, group size, HF config overrides)
    "q4-g64-top2-gqa": ("4", 64, dict(num_key_value_heads=2)),
    "q8-g32-top1": ("8", 32, dict(num_experts_per_tok=1)),
    "q4-g128-top3-window": ("4", 128, dict(num_experts_per_tok=3, sliding_window=5, num_key_value_heads=1)),
    "mixed-g64-top2-mha": ("mixed", 64, dict(num_key_value_heads=4)),
}


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    bits, group_size, overrides = CASES[request.param]
    hf = tmp_path_factory.mktemp("hf")
    make_hf_model(hf, dtype=torch.bfloat16, intermediate_size=256, hidden_size=128, **overrides)
    return convert(LocalSource(hf), tmp_path_factory.mktemp("models") / request.param, bits=bits,
                   group_size=group_size)


IDS = np.random.default_rng(3).integers(0, 32000, 12)


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("backend, tolerance", [("mlx-f32", 1e-4), ("mlx", 1e-2)])
def test_logits_match_the_numpy_path(model_dir, backend, tolerance):
    reference = prompt_then_decode(localmix.load(model_dir, backend="numpy"), IDS)
    got = prompt_then_decode(localmix.load(model_dir, backend=backend), IDS)
    print(f"{model_dir.name} {backend}: {relative(got, reference):.1e}")
    assert relative(got, reference) < tolerance


def test_seeded_generation_gives_the_numpy_tokens(model_dir):
    kw = dict(max_tokens=10, temperature=0.8, seed=7)
    expected = [r.token for r in localmix.load(model_dir, backend="numpy").stream("Once upon a time", **kw)]
    assert [r.token for r in localmix.load(model_dir, backend="mlx-f32").stream("Once upon a time", **kw)] == expected


def test_within_a_memory_budget(model_dir):
    resident = prompt_then_decode(localmix.load(model_dir, backend="mlx-f32"), IDS)
    model = localmix.load(model_dir, backend="mlx-f32", memory=budget(model_dir, 4))
    assert model.expert_cache.slots == 4
    np.testing.assert_array_equal(prompt_then_decode(model, IDS), resident)
    assert model.expert_cache.stats()["expert_misses"] > 0
    assert model.transformer.routing.routed.sum() > 0  # routing statistics on MLX too


def test_auto_is_numba_off_apple_silicon(model_dir):
    assert localmix.load(model_dir).backend == "numba"


def test_bench_and_run_on_mlx(model_dir):
    if not model_dir.name.startswith("q4-g64"):
        pytest.skip("one model is enough for the command line")
    bench = localmix_cli("bench", model_dir, "--backend", "mlx", "-p", "8", "-n", "4", "--json")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout.strip().splitlines()[-1])["decode_tok_s"] > 0
    run = localmix_cli("run", model_dir, "Hi", "--backend", "mlx-f32", "-n", "4", "--temperature", "0",
                       "--repeat-penalty", "1")
    expected = localmix.load(model_dir, backend="numpy").chat("Hi", max_tokens=4, temperature=0, repeat_penalty=1.0)
    assert run.returncode == 0 and run.stdout == expected + "\n", run.stderr
