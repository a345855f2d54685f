"""Routing seen and steered: statistics, the trace, adaptive top-k and cache-aware fallback."""

import json
import shutil

import numpy as np
import pytest
import torch

import localmix
from localmix import routing
from localmix.experts import CachedExperts
from localmix.model import Ops
from localmix.quant.convert import LocalSource, convert

from conftest import make_hf_model
from test_cli import assert_one_line_error, localmix_cli
from test_expert_cache import budget, prompt_then_decode


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    hf = tmp_path_factory.mktemp("hf")
    make_hf_model(hf, dtype=torch.bfloat16, intermediate_size=128, num_local_experts=8, num_hidden_layers=3)
    return convert(LocalSource(hf), tmp_path_factory.mktemp("models") / "tiny-q4", bits="4")


IDS = np.random.default_rng(2).integers(0, 32000, 20)


def traced(model, ids=IDS):
    """Prompt (6 tokens) then one token at a time, recording every token's routing (the model's
    routing as loaded, with a trace: an argument of each call)."""
    records, t = [], model.transformer
    options, cache = model.routing_options(trace=records.extend), t.new_cache(len(ids))
    logits = np.concatenate([t(ids[:6], cache, options=options)] +
                            [t(ids[i:i + 1], cache, options=options) for i in range(6, len(ids))])
    return logits, records


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_statistics_agree_with_the_trace(q4, backend):
    model = localmix.load(q4, backend=backend)
    before = model.transformer.routing.snapshot()
    _, records = traced(model)
    stats = model.transformer.routing.since(before)
    assert [r["position"] for r in records] == list(range(len(IDS))) and [r["token"] for r in records] == list(IDS)
    layers, experts = stats["routed"].shape
    for layer in range(layers):
        chosen = [r["layers"][layer]["experts"] for r in records]
        weights = [r["layers"][layer]["weights"] for r in records]
        assert all(len(c) == 2 and c == sorted(c) for c in chosen) and np.allclose([sum(w) for w in weights], 1)
        assert list(stats["routed"][layer]) == [sum(e in c for c in chosen) for e in range(experts)]
        expected_weight = [sum(w for c, ws in zip(chosen, weights) for x, w in zip(c, ws) if x == e)
                           for e in range(experts)]
        np.testing.assert_allclose(stats["weight"][layer], expected_weight, atol=1e-5)
        assert stats["reused"][layer] == sum(len(set(a) & set(b)) for a, b in zip(chosen, chosen[1:]))
        assert stats["followed"][layer] == 2 * (len(IDS) - 1) and stats["tokens"][layer] == len(IDS)
    summary = routing.summary(stats)
    assert np.allclose(summary["experts_per_token"], 2) and (summary["max_over_mean"] >= 1).all()
    assert ((0 < summary["entropy"]) & (summary["entropy"] <= 1)).all()


def test_the_two_backends_route_alike(q4):
    counts = []
    for backend in ("numba", "numpy"):
        model = localmix.load(q4, backend=backend)
        traced(model)
        counts.append(model.transformer.routing.routed)
    np.testing.assert_array_equal(*counts)


def test_imbalance_measures():
    m = routing.imbalance(np.array([[5, 5, 5, 5], [20, 0, 0, 0]]))
    np.testing.assert_allclose(m["max_over_mean"], [1, 4])
    np.testing.assert_allclose(m["cv"], [0, np.sqrt(3)])
    np.testing.assert_allclose(m["entropy"], [1, 0], atol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_a_min_weight_above_one_half_is_top_1_routing(q4, backend):
    """The second of two renormalized weights is at most 1/2: a threshold above it always drops it."""
    top1 = prompt_then_decode(localmix.load(q4, backend=backend, experts_per_token=1), IDS)
    adaptive = localmix.load(q4, backend=backend, min_expert_weight=0.51)
    np.testing.assert_allclose(prompt_then_decode(adaptive, IDS), top1, rtol=0, atol=1e-5 * np.abs(top1).max())
    assert np.allclose(routing.summary(adaptive.transformer.routing.snapshot())["experts_per_token"], 1)


def test_adaptive_routing_drops_only_light_experts(q4):
    exact, records = traced(localmix.load(q4))
    # A threshold between the lighter weights of the tokens: it drops about half of them.
    threshold = float(np.median([min(layer["weights"]) for r in records for layer in r["layers"]]))
    model = localmix.load(q4, min_expert_weight=threshold)
    adaptive, steered = traced(model)
    for r in steered:  # two experts both at least as heavy as the threshold, or one alone
        for layer in r["layers"]:
            assert (len(layer["experts"]) == 2 and min(layer["weights"]) >= threshold - 1e-6) or \
                (len(layer["experts"]) == 1 and layer["weights"] == [1.0])
    first, steered_first = records[0]["layers"][0], steered[0]["layers"][0]  # nothing before it changed
    assert steered_first["experts"] == [e for e, w in zip(first["experts"], first["weights"])
                                        if w >= threshold or w == max(first["weights"])]
    per_token = routing.summary(model.transformer.routing.snapshot())["experts_per_token"]
    assert ((1 < per_token) & (per_token < 2)).all()  # some tokens used one expert, some two
    assert not np.array_equal(adaptive, exact)


def test_per_call_routing_settings(q4):
    model = localmix.load(q4)
    kw = dict(max_tokens=6, temperature=0, repeat_penalty=1.0)
    assert model.generate("Once upon", experts_per_token=1, **kw) == localmix.load(q4, experts_per_token=1).generate(
        "Once upon", **kw)
    assert model.transformer.args.num_experts_per_tok == 2  # and back to the model's afterwards
    assert model.generate("Once upon", min_expert_weight=0.51, **kw) == model.generate("Once upon",
                                                                                     experts_per_token=1, **kw)
    with pytest.raises(localmix.LocalmixError, match="min-expert-weight"):
        model.generate("Once upon", min_expert_weight=1.5)


ROUTINGS = [dict(experts_per_token=1), dict(min_expert_weight=0.4), dict(experts_per_token=3, min_expert_weight=0.3), {}]


def tokens_and_text(responses):
    responses = list(responses)
    return [r.token for r in responses], "".join(r.text for r in responses)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_interleaved_streams_keep_their_own_routing(q4, backend):
    """Streams with different per-call routing, advanced a token each in turn: each gives exactly
    what it gives alone (tokens, text, and its own trace: no record of another), and the model's
    config and default routing are as loaded afterwards."""
    model = localmix.load(q4, backend=backend)
    config, default = model.config, model.transformer.default_routing
    kw = dict(max_tokens=8, temperature=0, repeat_penalty=1.0)
    alone, alone_records = [], []
    for routing in ROUTINGS:
        records = []
        alone.append(tokens_and_text(model.stream("Once upon", trace=records.extend, **kw, **routing)))
        alone_records.append(records)
    assert len({tuple(tokens) for tokens, _ in alone}) > 1  # the settings change the answer: mixing them would show
    ran = len(model.tokenizer.encode("Once upon", bos=True)) + kw["max_tokens"] - 1  # the prompt, all but the last
    assert all(len(records) == ran for records in alone_records)  # each model call of the answer had its options
    per_token = [{len(layer["experts"]) for r in records for layer in r["layers"]} for records in alone_records]
    assert per_token[0] == {1} and per_token[2] <= {1, 2, 3} and 3 in per_token[2] and per_token[3] == {2}

    together_records = [[] for _ in ROUTINGS]
    streams = [model.stream("Once upon", trace=records.extend, **kw, **routing)
               for records, routing in zip(together_records, ROUTINGS)]
    together, going = [[] for _ in ROUTINGS], list(range(len(ROUTINGS)))
    while going:  # a token of each in turn
        for i in going:
            together[i].append(next(streams[i]))
        going = [i for i in going if not together[i][-1].finish_reason]
    assert [tokens_and_text(responses) for responses in together] == alone
    assert together_records == alone_records
    assert model.config is config and model.config.num_experts_per_tok == 2 and model.transformer.args is config
    assert model.transformer.default_routing == default == localmix.routing.RoutingOptions(2)
    # A call after them, with no settings of its own, routes as the model was loaded: the last one's.
    assert tokens_and_text(model.stream("Once upon", **kw)) == alone[-1]


def test_fallback_uses_resident_experts_while_decoding(q4):
    slots = 12
    exact_model = localmix.load(q4, memory=budget(q4, slots), prefetch=False)
    exact, exact_records = traced(exact_model)
    zero = localmix.load(q4, memory=budget(q4, slots), prefetch=False, fallback_margin=0.0)
    np.testing.assert_array_equal(prompt_then_decode(zero, IDS), exact)  # off: exact routing
    model = localmix.load(q4, memory=budget(q4, slots), prefetch=False, fallback_margin=1.0)
    logits, records = traced(model)

    def decoded_misses(records):
        return sum(not c for r in records[6:] for layer in r["layers"] for c in layer["cached"])

    # A margin of 1 takes any resident expert that was not chosen: a decoded token waits for the
    # disk only where its layer has too few experts in the cache.
    assert decoded_misses(records) < decoded_misses(exact_records) / 2
    assert all(np.isclose(sum(layer["weights"]), 1) for r in records for layer in r["layers"])
    assert model.expert_cache.stats()["expert_misses"] < exact_model.expert_cache.stats()["expert_misses"]
    assert np.isfinite(logits).all() and not np.array_equal(logits, exact)


def test_fallback_keeps_a_chosen_expert_that_is_resident():
    class Cache:
        resident = {(0, 1): None, (0, 3): None}

    class Layer:
        experts, router = CachedExperts(Cache(), 0, 4), np.diag([4.0, 3.0, 2.9, 1.0]).astype(np.float32)
        router_bias = None

    h = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)  # logits 4, 3, 2.9, 1
    chosen, weights = routing.fall_back_to_resident(h, np.array([[0, 1]]), Layer(), margin=0.2)
    p = np.exp([4, 3, 2.9, 1]) / np.exp([4, 3, 2.9, 1]).sum()
    assert chosen.tolist() == [[0, 1]]  # expert 0 is not resident, but 3's probability is far below it
    chosen, weights = routing.fall_back_to_resident(h, np.array([[0, 1]]), Layer(), margin=0.9)
    assert chosen.tolist() == [[3, 1]]
    np.testing.assert_allclose(weights[0], [p[3] / (p[3] + p[1]), p[1] / (p[3] + p[1])], rtol=1e-6)
    # A family that does not renormalize its top-k (Qwen2-MoE, OLMoE): the router's probabilities as they are.
    chosen, weights = routing.fall_back_to_resident(h, np.array([[0, 1]]), Layer(), margin=0.9, renormalize=False)
    np.testing.assert_allclose(weights[0], [p[3], p[1]], rtol=1e-6)
    Layer.router_bias = np.array([0.0, 0.0, 0.0, 3.5])  # gpt-oss's: expert 3 becomes the most probable
    chosen, weights = routing.fall_back_to_resident(h, np.array([[0, 1]]), Layer(), margin=0.0)
    assert chosen.tolist() == [[3, 1]]


def test_cli_trace_stats_and_plot(q4, tmp_path):
    trace = tmp_path / "trace.jsonl"
    result = localmix_cli("run", q4, "Hello there", "-n", "5", "--temperature", "0", "--trace", trace,
                          "--memory", budget(q4, 5), "--stats", "--min-expert-weight", "0.2")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    prompt = localmix.load(q4).tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    assert [r["token"] for r in records[:len(prompt)]] == prompt and len(records) == len(prompt) + 4
    assert all(len(layer["cached"]) == len(layer["experts"]) >= 1 for r in records for layer in r["layers"])
    assert "experts per token" in result.stderr and "used again by the next token" in result.stderr

    png = tmp_path / "heat.png"
    stats = localmix_cli("stats", q4, "--prompt", "Hello there, how are you?", "--plot", png)
    assert stats.returncode == 0, stats.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "reuse" in stats.stdout

    for args, message in [(["--min-expert-weight", "1"], "--min-expert-weight must be in [0, 1)"),
                          (["--fallback-margin", "-1"], "--fallback-margin must be in [0, 1]"),
                          (["--trace", tmp_path / "no" / "t.jsonl"], "cannot write the trace")]:
        assert_one_line_error(localmix_cli("run", q4, "Hi", *args), message)


def test_a_trace_argument_records_what_the_routers_chose(q4, tmp_path, monkeypatch):
    """A trace given to Model.stream gets, for every token the model ran, each layer's choice as
    the routers made it (Ops.route_tokens, seen from outside routing.py): the experts in index
    order with their weights. `run --trace FILE` writes the same records; a call without a trace
    records nothing."""
    model = localmix.load(q4, backend="numpy")
    seen = []  # (chosen, weights) of each route_tokens call: a model call's layers in order

    class Seen(Ops):
        def route_tokens(self, *args):
            seen.append(Ops.route_tokens(*args))
            return seen[-1]

    monkeypatch.setattr(model.transformer, "ops", Seen())
    records = []
    greedy = dict(temperature=0, repeat_penalty=1.0)
    responses = list(model.stream("Once upon", max_tokens=5, trace=records.extend, **greedy))
    ran = model.tokenizer.encode("Once upon", bos=True) + [r.token for r in responses[:-1]]
    assert [r["token"] for r in records] == ran and [r["position"] for r in records] == list(range(len(ran)))
    layers = model.config.num_hidden_layers
    for layer in range(layers):
        chosen = np.concatenate([c for c, _ in seen[layer::layers]])
        weights = np.concatenate([w for _, w in seen[layer::layers]])
        for record, c, w in zip(records, chosen, weights, strict=True):
            order = np.argsort(c)
            assert record["layers"][layer]["experts"] == c[order].tolist()
            np.testing.assert_allclose(record["layers"][layer]["weights"], w[order], atol=1e-6)
    model.generate("Once upon", max_tokens=3, **greedy)
    assert len(records) == len(ran)  # that call had no trace

    trace = tmp_path / "trace.jsonl"
    result = localmix_cli("run", q4, "Once upon", "--raw", "-n", "5", "--temperature", "0", "--repeat-penalty", "1",
                          "--backend", "numpy", "--trace", trace)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in trace.read_text().splitlines()] == json.loads(json.dumps(records))


def test_stats_saves_what_pinning_reads(q4, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(q4, copy)
    localmix_cli("stats", copy, "--prompt", "Hello there, how are you?", "--save")
    saved = routing.read_routing(copy, (3, 8))
    assert saved.sum() == 2 * 3 * len(localmix.load(copy).tokenizer.encode("Hello there, how are you?", bos=True))


def test_batched_decoding_counts_routes_but_no_reuse(q4):
    model = localmix.load(q4)
    t = model.transformer
    caches = [t.new_cache(16) for _ in range(3)]
    for cache, start in zip(caches, (100, 200, 300)):
        t(list(range(start, start + 4)), cache)
    before = t.routing.snapshot()
    records = []
    t.step([7, 8, 9], caches, model.routing_options(trace=records.extend))
    stats = t.routing.since(before)
    assert (stats["tokens"] == 3).all() and (stats["routed"].sum(axis=1) == 6).all()
    assert (stats["reused"] == 0).all() and (stats["followed"] == 0).all()
    assert [r["position"] for r in records] == [4, 4, 4] and [r["token"] for r in records] == [7, 8, 9]


def test_the_built_in_demo_is_never_written():
    """The demo's folder is the installed package: `stats demo --save` must not write into it."""
    from localmix import routing
    from localmix.errors import LocalmixError
    from localmix.home import DEMO

    before = (DEMO / routing.ROUTING_FILE).read_bytes()
    with pytest.raises(LocalmixError, match="read-only"):
        routing.save(DEMO, np.zeros((4, 8), np.int64), 0, "test")
    assert (DEMO / routing.ROUTING_FILE).read_bytes() == before


def test_dropped_experts_leave_weights_as_the_family_routes():
    """Dropping light experts weighs the rest as if routed to them alone: renormalized for a family
    that renormalizes its top-k (Mixtral, Qwen3-MoE), the router's probabilities as they are for
    one that does not (Qwen2-MoE, OLMoE)."""
    chosen, weights = np.array([[2, 0, 5]]), np.array([[0.5, 0.2, 0.05]], np.float32)
    dropped, renormalized = routing.drop_light_experts(chosen, weights, 0.1, 8)
    assert dropped.tolist() == [[2, 0, 8]]
    np.testing.assert_allclose(renormalized, [[0.5 / 0.7, 0.2 / 0.7, 0]], rtol=1e-6)
    _, raw = routing.drop_light_experts(chosen, weights, 0.1, 8, renormalize=False)
    np.testing.assert_allclose(raw, [[0.5, 0.2, 0]])
