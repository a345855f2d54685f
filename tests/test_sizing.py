"""Per-expert bit widths to fit a size (`localmix shrink`, `localmix pull --size`): the cheapest steps
down (3 bits, then 2) per byte saved, weighed by routing; the rest kept byte for byte; a model whose
layers mix 2-, 3- and 4-bit experts decodes as the numpy reference does, resident and from expert
slots."""

import json
import os

import numpy as np
import pytest
import torch

import localmix
from localmix import kernels
from localmix.quant.convert import LocalSource, convert
from localmix.quant.sizing import Step, cheapest_steps, resize
from localmix.routing import ROUTING_FILE
from localmix.store import read_manifest, verify

from conftest import make_hf_model
from test_cli import assert_one_line_error, localmix_cli
from test_expert_cache import budget, prompt_then_decode

LAYERS, EXPERTS = 2, 8
THREE, TWO = (3, 64), (2, 64)


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


def expert_bits(folder) -> dict:
    """(layer, expert) -> the bits its matrices are stored at, from the manifest."""
    found = {}
    for name, t in read_manifest(folder)["tensors"].items():
        if t["file"].startswith("experts/") and t["dtype"].startswith("q"):
            layer, expert = t["file"].removeprefix("experts/L").removesuffix(".bin").split("-E")
            found[int(layer), int(expert)] = int(t["dtype"][1:])
    return found


def at(folder, bits: int) -> set:
    return {key for key, b in expert_bits(folder).items() if b == bits}


@pytest.fixture(scope="module")
def saving(hf, q4, tmp_path_factory) -> tuple[int, int]:
    """The bytes one expert saves going from 4 to 3 bits, and from 3 to 2 (all have the same shape):
    from the expert files of the model pulled with --bits 3 and --bits 2."""
    file = "experts/L000-E000.bin"
    sizes = [read_manifest(q4)["files"][file]["size"]]
    for bits in ("3", "2"):
        out = convert(LocalSource(hf), tmp_path_factory.mktemp("models") / f"tiny-q{bits}", bits=bits)
        sizes.append(read_manifest(out)["files"][file]["size"])
    return sizes[0] - sizes[1], sizes[1] - sizes[2]


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


def routed_as(q4, tmp_path, groups: dict[int, set]) -> "os.PathLike":
    """A copy of the model whose routing.json gives each expert of groups[count] that many tokens,
    the others 10**6."""
    routed = np.full((LAYERS, EXPERTS), 10**6)
    for count, experts in groups.items():
        for layer, e in experts:
            routed[layer, e] = count
    return with_routing(q4, tmp_path, routed)


def test_cheapest_steps_per_byte_first_and_a_step_not_worth_stopping_at_skipped():
    """Expert A's 3-bit step costs 5 per byte, going on to 2 bits 1: A goes to 2 bits in one step of 3
    per byte. B's steps cost 0.1 and then 2 per byte; C, stored at 3 bits, has one step of 0.5."""
    steps = cheapest_steps({(0, 0): [(THREE, 10, 50.0), (TWO, 20, 60.0)],
                            (0, 1): [(THREE, 10, 1.0), (TWO, 20, 21.0)],
                            (1, 0): [(THREE, 0, 0.0), (TWO, 10, 5.0)]})  # stored at 3 bits: one step
    assert steps == [Step((0, 1), THREE, 10, 1.0), Step((1, 0), TWO, 10, 5.0), Step((0, 1), TWO, 10, 20.0),
                     Step((0, 0), TWO, 20, 60.0)]
    # two formats saving the same bytes: the cheaper, whichever comes first
    assert cheapest_steps({(0, 0): [(THREE, 10, 5.0), (TWO, 10, 3.0)]}) == [Step((0, 0), TWO, 10, 3.0)]
    assert cheapest_steps({(0, 0): [(THREE, 10, 3.0), (TWO, 10, 5.0)]}) == [Step((0, 0), THREE, 10, 3.0)]


def test_the_cheapest_steps_are_taken_and_the_rest_keep_their_bytes(q4, saving, tmp_path):
    """3 bits cost a fifth of 2 bits' error or less for the same bytes saved: a size 2.5 steps below
    the model's puts three experts at 3 bits, none at 2, and every other file stays as it was."""
    whole, (to_three, _) = total_bytes(q4), saving
    size = whole - int(2.5 * to_three)
    out = resize(routed_as(q4, tmp_path / "copy", {}), tmp_path / "m", size, say=quiet)  # routed evenly
    assert len(at(out, 3)) == 3 and not at(out, 2) and total_bytes(out) <= size < total_bytes(out) + to_three
    assert verify(out) == []
    for file in ["dense.bin"] + [f"experts/L{layer:03d}-E{e:03d}.bin" for layer in range(LAYERS)
                                 for e in range(EXPERTS) if (layer, e) not in at(out, 3)]:
        assert (out / file).read_bytes() == (q4 / file).read_bytes(), file
    manifest = read_manifest(out)["quantization"]
    assert manifest["bits"] == "3-4" and (manifest["experts_at_3_bits"], manifest["experts_at_2_bits"]) == (3, 0)


def test_the_least_routed_experts_go_furthest(q4, saving, tmp_path):
    """With the model's routing counts (`localmix stats --save`): the experts no token went to go to 2
    bits, those a thousand went to stop at 3, the busy ones keep 4 bits, whichever they are."""
    to_three, to_two = saving
    for i, (idle, some) in enumerate((({(0, 5), (1, 2)}, {(1, 7)}), ({(0, 0), (0, 7)}, {(0, 3), (1, 1)}))):
        folder = routed_as(q4, tmp_path / f"copy{i}", {0: idle, 1000: some})
        size = total_bytes(q4) - len(idle) * (to_three + to_two) - len(some) * to_three
        out = resize(folder, tmp_path / f"out{i}", size, say=quiet)
        assert (at(out, 2), at(out, 3)) == (idle, some)


def test_experts_of_three_formats_in_a_layer_decode_as_the_reference(q4, saving, tmp_path):
    """A layer's experts at 2, 3 and 4 bits, through the fused decoding kernel (one call per format),
    resident and from expert slots, against the numpy path on the same weights."""
    idle, some = {(0, 1), (0, 4), (1, 0)}, {(0, 2), (0, 6), (1, 5)}
    folder = routed_as(q4, tmp_path / "copy", {0: idle, 1000: some})
    out = resize(folder, tmp_path / "m", total_bytes(q4) - 3 * sum(saving) - 3 * saving[0], say=quiet)
    assert set(expert_bits(out)[0, e] for e in range(EXPERTS)) == {2, 3, 4}
    ids = np.random.default_rng(7).integers(0, 32000, 12)
    reference = prompt_then_decode(localmix.load(out, backend="numpy"), ids)
    for memory in (None, budget(out, 6)):
        fast = localmix.load(out, memory=memory)
        ours = prompt_then_decode(fast, ids)
        assert fast.transformer.weights.layers[0].experts.on_vector_kernels() == kernels.has_vector_kernels()
        assert np.abs(ours - reference).max() <= 1e-3 * np.abs(reference).max()


def test_pull_and_shrink_with_a_size(hf, q4, saving, tmp_path):
    env = {"LOCALMIX_HOME": str(tmp_path / "home")}
    to_three, to_two = saving
    size = total_bytes(q4) - 2 * to_three
    result = localmix_cli("pull", hf, "--size", size, env=env)
    assert result.returncode == 0, result.stderr
    name = f"{hf.name}-{size / 1e9:.3g}GB"
    models = tmp_path / "home" / "models"
    threes, twos = len(at(models / name, 3)), len(at(models / name, 2))
    assert total_bytes(models / name) <= size and threes + twos in (1, 2)
    assert f"of 16 experts, {threes} at 3 bits, {twos} at 2 bits (routing: " in result.stderr
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [name]

    smaller = total_bytes(q4) - 16 * to_three - to_two  # past every expert at 3 bits
    result = localmix_cli("shrink", name, "--size", smaller, "--name", "smaller", env=env)
    assert result.returncode == 0, result.stderr
    assert total_bytes(models / "smaller") <= smaller and at(models / "smaller", 2)
    label = "-".join(str(b) for b in sorted(set(expert_bits(models / "smaller").values())))
    listed = [line.split() for line in localmix_cli("list", env=env).stdout.splitlines()]
    assert label in ("2-3-4", "2-4") and ["smaller", label] in [row[:2] for row in listed]

    assert_one_line_error(localmix_cli("shrink", name, "--size", size, "--name", "smaller", env=env),
                          "a model named smaller exists already")
    assert_one_line_error(localmix_cli("shrink", name, "--size", "1KB", env=env),
                          "below the smallest this model can be", after_progress=True)
    assert_one_line_error(localmix_cli("pull", hf, "--calibration", hf / "config.json", env=env),
                          "--calibration goes with --size")
    assert_one_line_error(localmix_cli("shrink", name, "--size", "lots", env=env), "--size: cannot read 'lots'")
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [name, "smaller"]


def test_a_budget_holds_more_small_experts_than_large_ones(q4, saving, tmp_path):
    """The budget is bytes (`slots` largest experts): with most experts at 2 bits, more experts than
    that stay resident, and the pages the slots hold never pass it."""
    busy = {(0, 3)}
    idle = {(layer, e) for layer in range(LAYERS) for e in range(EXPERTS)} - busy
    folder = routed_as(q4, tmp_path / "copy", {0: idle, 10**6: busy})
    out = resize(folder, tmp_path / "m", total_bytes(q4) - len(idle) * sum(saving), say=quiet)
    assert at(out, 2) == idle
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
        assert cache.held_total == sum(cache.held)
    assert max(resident for resident, _ in cache_held) > 3
    assert all(held <= 3 * cache.slot_bytes for _, held in cache_held)
