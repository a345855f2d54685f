"""Per-expert bit widths to fit a size (`localmix shrink`, `localmix pull --size`): the fewest experts
at 2 bits, those least routed to; the rest kept byte for byte; a model whose layers mix 2- and 4-bit
experts decodes as the numpy reference does, resident and from expert slots."""

import json
import os

import numpy as np
import pytest
import torch

import localmix
from localmix import kernels
from localmix.quant.convert import LocalSource, convert
from localmix.quant.sizing import resize
from localmix.routing import ROUTING_FILE
from localmix.store import read_manifest, verify

from conftest import make_hf_model
from test_cli import assert_one_line_error, localmix_cli
from test_expert_cache import budget, prompt_then_decode

LAYERS, EXPERTS = 2, 8


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_hf_model(folder, dtype=torch.bfloat16, hidden_size=128, intermediate_size=128, num_local_experts=EXPERTS)
    return folder


@pytest.fixture(scope="module")
def q4(hf, tmp_path_factory):
    return convert(LocalSource(hf), tmp_path_factory.mktemp("models") / "tiny-q4", bits="4")


def total_bytes(folder) -> int:
    return sum(f["size"] for f in read_manifest(folder)["files"].values())


def two_bit_experts(folder) -> set:
    """(layer, expert) of the experts stored at 2 bits, from the manifest."""
    found = set()
    for name, t in read_manifest(folder)["tensors"].items():
        if t["dtype"] == "q2":
            layer, expert = t["file"].removeprefix("experts/L").removesuffix(".bin").split("-E")
            found.add((int(layer), int(expert)))
    return found


@pytest.fixture(scope="module")
def per_expert(q4, tmp_path_factory) -> int:
    """The bytes one expert saves at 2 bits (all of them have the same shape): a size one byte short
    of the model's puts exactly one expert at 2 bits."""
    one = resize(q4, tmp_path_factory.mktemp("one") / "m", total_bytes(q4) - 1, say=quiet)
    assert len(two_bit_experts(one)) == 1
    return total_bytes(q4) - total_bytes(one)


def quiet(_):
    pass


def with_routing(folder, tmp_path, routed) -> "os.PathLike":
    """A copy of the model folder (its files linked) with these routing counts as its routing.json."""
    copy = tmp_path
    copy.mkdir()
    for path in folder.rglob("*"):
        target = copy / path.relative_to(folder)
        if path.is_dir():
            target.mkdir()
        else:
            os.link(path, target)
    (copy / ROUTING_FILE).write_text(json.dumps({"source": "test", "tokens": 1, "routed": routed.tolist()}))
    return copy


def test_the_fewest_experts_go_to_2_bits_and_the_rest_keep_their_bytes(q4, per_expert, tmp_path):
    whole = total_bytes(q4)
    size = whole - int(2.5 * per_expert)
    out = resize(q4, tmp_path / "m", size, say=quiet)
    small = two_bit_experts(out)
    assert len(small) == 3 and total_bytes(out) <= size < total_bytes(out) + per_expert
    assert verify(out) == []
    for file in ["dense.bin"] + [f"experts/L{layer:03d}-E{e:03d}.bin" for layer in range(LAYERS)
                                 for e in range(EXPERTS) if (layer, e) not in small]:
        assert (out / file).read_bytes() == (q4 / file).read_bytes(), file
    manifest = read_manifest(out)["quantization"]
    assert manifest["bits"] == "2-4" and manifest["experts_at_2_bits"] == 3


def test_the_least_routed_experts_are_the_ones_made_small(q4, per_expert, tmp_path):
    """With the model's routing counts (`localmix stats --save`): the experts no token went to are
    the ones stored at 2 bits, whichever they are."""
    for i, quiet_ones in enumerate(({(0, 5), (1, 2)}, {(0, 0), (0, 7)})):
        routed = np.full((LAYERS, EXPERTS), 10**6)
        for layer, e in quiet_ones:
            routed[layer, e] = 0
        folder = with_routing(q4, tmp_path / f"copy{i}", routed)
        out = resize(folder, tmp_path / f"out{i}", total_bytes(q4) - int(1.5 * per_expert), say=quiet)
        assert two_bit_experts(out) == quiet_ones


def test_experts_of_two_formats_in_a_layer_decode_as_the_reference(q4, per_expert, tmp_path):
    """A layer's experts at 2 and 4 bits, through the fused decoding kernel (one call per format),
    resident and from expert slots, against the numpy path on the same weights."""
    out = resize(q4, tmp_path / "m", total_bytes(q4) - 5 * per_expert, say=quiet)
    per_layer = [sum(layer == l for l, _ in two_bit_experts(out)) for layer in range(LAYERS)]
    assert any(0 < n < EXPERTS for n in per_layer)
    ids = np.random.default_rng(7).integers(0, 32000, 12)
    reference = prompt_then_decode(localmix.load(out, backend="numpy"), ids)
    for memory in (None, budget(out, 6)):
        fast = localmix.load(out, memory=memory)
        ours = prompt_then_decode(fast, ids)
        assert fast.transformer.weights.layers[0].experts.on_vector_kernels() == kernels.has_vector_kernels()
        assert np.abs(ours - reference).max() <= 1e-3 * np.abs(reference).max()


def test_pull_and_shrink_with_a_size(hf, q4, per_expert, tmp_path):
    env = {"LOCALMIX_HOME": str(tmp_path / "home")}
    size = total_bytes(q4) - 2 * per_expert
    result = localmix_cli("pull", hf, "--size", size, env=env)
    assert result.returncode == 0, result.stderr
    name = f"{hf.name}-{size / 1e9:.3g}GB"
    models = tmp_path / "home" / "models"
    assert "2-4-bit" in result.stdout and len(two_bit_experts(models / name)) == 2
    assert "of 16 experts at 2 bits (routing: " in result.stderr
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [name]

    result = localmix_cli("shrink", name, "--size", size - per_expert, "--name", "smaller", env=env)
    assert result.returncode == 0, result.stderr
    assert len(two_bit_experts(models / "smaller")) == 3

    assert_one_line_error(localmix_cli("shrink", name, "--size", size, "--name", "smaller", env=env),
                          "a model named smaller exists already")
    assert_one_line_error(localmix_cli("shrink", name, "--size", "1KB", env=env),
                          "below the smallest this model can be", after_progress=True)
    assert_one_line_error(localmix_cli("pull", hf, "--calibration", hf / "config.json", env=env),
                          "--calibration goes with --size")
    assert_one_line_error(localmix_cli("shrink", name, "--size", "lots", env=env), "--size: cannot read 'lots'")
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [name, "smaller"]


def test_a_budget_holds_more_small_experts_than_large_ones(q4, per_expert, tmp_path):
    """The budget is bytes (`slots` largest experts): with most experts at 2 bits, more experts than
    that stay resident, and the pages the slots hold never pass it."""
    out = resize(q4, tmp_path / "m", total_bytes(q4) - 15 * per_expert, say=quiet)
    model = localmix.load(out, memory=budget(out, 3))
    cache = model.expert_cache
    assert cache.slots == 3 and len(cache.buffer) > 3
    cache_held = []
    ids = np.random.default_rng(8).integers(0, 32000, 16)
    kv = model.transformer.new_cache(len(ids))
    for i in range(len(ids)):
        model.transformer(ids[i:i + 1], kv)
        cache.counters()  # background reads done
        cache_held.append((len(cache.resident), sum(cache.held)))
    assert max(resident for resident, _ in cache_held) > 3
    assert all(held <= 3 * cache.slot_bytes for _, held in cache_held)
