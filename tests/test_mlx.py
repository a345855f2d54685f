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
    # every expert for every token: a prompt's rows sorted by expert on the stacked path (12 x 8 >= 64)
    "q4-g64-top8": ("4", 64, dict(num_local_experts=8, num_experts_per_tok=8)),
    "q3-g64-top2": ("3", 64, {}),  # experts at 3 bits (MLX's own 3-bit packing), the rest at 4
}


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    bits, group_size, overrides = CASES[request.param]
    hf = tmp_path_factory.mktemp("hf")
    make_hf_model(hf, dtype=torch.bfloat16, intermediate_size=256, hidden_size=128, **overrides)
    return convert(LocalSource(hf), tmp_path_factory.mktemp("models") / request.param, bits=bits,
                   group_size=group_size)


IDS = np.random.default_rng(3).integers(0, 32000, 12)


def slots(model_dir) -> int:
    """Expert slots for a budget: 4, or a token's experts where it has more."""
    return max(4, CASES[model_dir.name][2].get("num_experts_per_tok", 2))


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("backend, tolerance", [("mlx-f32", 1e-4), ("mlx", 1e-2)])
def test_logits_match_the_numpy_path(model_dir, backend, tolerance):
    reference = prompt_then_decode(localmix.load(model_dir, backend="numpy"), IDS)
    got = prompt_then_decode(localmix.load(model_dir, backend=backend), IDS)
    print(f"{model_dir.name} {backend}: {relative(got, reference):.1e}")
    assert relative(got, reference) < tolerance


@pytest.mark.parametrize("steering", [{}, dict(min_expert_weight=0.4)])
def test_seeded_generation_gives_the_numpy_tokens(model_dir, steering):
    """Also steered (light experts dropped): the choice comes to the host, the stack still runs the experts."""
    kw = dict(max_tokens=10, temperature=0.8, seed=7, **steering)
    expected = [r.token for r in localmix.load(model_dir, backend="numpy").stream("Once upon a time", **kw)]
    assert [r.token for r in localmix.load(model_dir, backend="mlx-f32").stream("Once upon a time", **kw)] == expected


def test_within_a_memory_budget(model_dir):
    resident = prompt_then_decode(localmix.load(model_dir, backend="mlx-f32"), IDS)
    model = localmix.load(model_dir, backend="mlx-f32", memory=budget(model_dir, slots(model_dir)))
    assert model.expert_cache.slots == slots(model_dir)
    # (resident experts are stacked and summed in the order of each token's choice, a budget's one
    # by one in index order: float32 sums of the same products in another order)
    assert relative(prompt_then_decode(model, IDS), resident) < 1e-5
    assert model.expert_cache.stats()["expert_misses"] > 0
    assert model.transformer.routing.routed.sum() > 0  # routing statistics on MLX too


def count_waits(monkeypatch) -> list:
    """Every time the host waits for MLX: the backend's waits all go through mx.eval (to_host too)."""
    import mlx.core as mx
    waits, evaluate = [], mx.eval
    monkeypatch.setattr(mx, "eval", lambda *arrays: (waits.append(len(arrays)), evaluate(*arrays))[1])
    return waits


def decode_waits(model, monkeypatch, tokens: int = 8) -> float:
    """Host waits per decoded token (the prompt's aside), greedy."""
    waits = count_waits(monkeypatch)
    counts = []
    for r in model.stream(list(IDS), max_tokens=tokens + 1, temperature=0, repeat_penalty=1.0):
        counts.append(len(waits))
    assert len(counts) == tokens + 1
    return (counts[-1] - counts[0]) / tokens


def test_a_resident_model_waits_once_per_decoded_token(model_dir, monkeypatch):
    """The routing stays on the device (stacked experts, mx.gather_qmm): one wait per token, for the
    logits; the routing statistics are read back when they are read, and they are the numpy path's."""
    model = localmix.load(model_dir, backend="mlx-f32")
    assert decode_waits(model, monkeypatch) <= 1
    reference = localmix.load(model_dir, backend="numpy")
    for m in (reference, model):
        m.transformer.routing.reset()
        prompt_then_decode(m, IDS)
    np.testing.assert_array_equal(model.transformer.routing.routed, reference.transformer.routing.routed)
    np.testing.assert_allclose(model.transformer.routing.weight, reference.transformer.routing.weight, rtol=1e-4)
    assert model.transformer.routing.reused.sum() == reference.transformer.routing.reused.sum()


def test_within_a_budget_at_most_one_wait_per_layer(model_dir, monkeypatch):
    model = localmix.load(model_dir, backend="mlx-f32", memory=budget(model_dir, slots(model_dir)))
    assert decode_waits(model, monkeypatch) <= model.config.num_hidden_layers + 1


def greedy_tokens(transformer, prompts, steps: int, together: bool) -> list[list[int]]:
    """Each prompt's greedy continuation: decoded one answer at a time, or all in one step each."""
    caches = [transformer.new_cache(64) for _ in prompts]
    tokens = [[int(np.argmax(transformer(p, c, last_only=True)))] for p, c in zip(prompts, caches)]
    for _ in range(steps):
        if together:
            logits = transformer.step([t[-1] for t in tokens], caches)
        else:
            logits = np.concatenate([transformer([t[-1]], c, last_only=True) for t, c in zip(tokens, caches)])
        for t, row in zip(tokens, logits):
            t.append(int(np.argmax(row)))
    return tokens


@pytest.mark.parametrize("within_a_budget", [False, True])
def test_answers_decoded_together_get_the_tokens_they_get_alone(model_dir, within_a_budget):
    model = localmix.load(model_dir, backend="mlx-f32",
                          memory=budget(model_dir, slots(model_dir)) if within_a_budget else None)
    assert model.transformer.ops.batched_decoding
    prompts = [IDS[:5], IDS[2:9], IDS[4:7]]
    alone = greedy_tokens(model.transformer, prompts, 6, together=False)
    assert greedy_tokens(model.transformer, prompts, 6, together=True) == alone
    assert greedy_tokens(localmix.load(model_dir, backend="numpy").transformer, prompts, 6, together=True) == alone


def test_the_server_decodes_answers_together_on_mlx(model_dir):
    """Eight chats at once through `serve`'s engine on MLX: each answer is the one the model gives
    alone, and the engine decoded several together (Transformer.step)."""
    if not model_dir.name.startswith("q4-g64-top2"):
        pytest.skip("one model is enough for the server")
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from conftest import running
    from localmix.server import create_app
    model = localmix.load(model_dir, backend="mlx-f32")
    prompts = [f"Tell me about the number {i}" for i in range(8)]
    greedy = dict(temperature=0, repeat_penalty=1.0)
    alone = [model.chat(p, max_tokens=6, **greedy) for p in prompts]
    app = create_app(model, "tiny")
    engine = app.state.server.catalog.fixed.engine
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def ask(prompt):
            return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=6, extra_body=greedy).choices[0].message.content
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, prompts)) == alone
    assert engine.widest >= 2


def test_the_kv_cache_option(model_dir):
    """--kv-cache f16 on float32 activations: float16 keys and values, half the bytes, the same tokens
    here; float16 activations keep float16 whatever is asked (their keys are float16 already)."""
    f16 = localmix.load(model_dir, backend="mlx-f32", kv_cache="f16")
    cache = f16.transformer.new_cache(8)
    assert cache.dtype == mx_float16() and cache._bytes(1) * 2 == localmix.load(
        model_dir, backend="mlx-f32").transformer.new_cache(8)._bytes(1)
    assert localmix.load(model_dir, backend="mlx", kv_cache="f32").transformer.new_cache(8).dtype == mx_float16()
    assert relative(prompt_then_decode(f16, IDS), prompt_then_decode(localmix.load(model_dir, backend="mlx-f32"),
                                                                      IDS)) < 1e-2


def mx_float16():
    import mlx.core as mx
    return mx.float16


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
