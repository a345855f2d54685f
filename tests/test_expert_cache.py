"""Running within a memory budget: experts in preallocated slots, read from their files on demand."""

import numpy as np
import pytest
import torch

import localmix
from localmix.errors import LocalmixError
from localmix.expert_cache import LFU, LRU, RUNTIME_BYTES, kv_bytes, parse_memory
from localmix.quant.convert import LocalSource, convert
from localmix.store import read_manifest

from conftest import make_hf_model
from test_cli import assert_one_line_error, localmix_cli


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    hf = tmp_path_factory.mktemp("hf")
    make_hf_model(hf, dtype=torch.bfloat16, intermediate_size=128, num_local_experts=8)
    return convert(LocalSource(hf), tmp_path_factory.mktemp("models") / "tiny-q4", bits="4")


def budget(folder, slots: int) -> int:
    """The --memory that leaves room for `slots` experts."""
    manifest = read_manifest(folder)
    model = localmix.load(folder)
    sizes = [f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")]
    return manifest["files"]["dense.bin"]["size"] + kv_bytes(model.config, 4096) + RUNTIME_BYTES + slots * max(sizes)


def prompt_then_decode(model, ids):
    cache = model.transformer.new_cache(len(ids))
    return np.concatenate([model.transformer(ids[:6], cache)] +
                          [model.transformer(ids[i:i + 1], cache) for i in range(6, len(ids))])


@pytest.mark.parametrize("slots", [2, 5])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_logits_within_a_budget_are_the_resident_ones_bit_for_bit(q4, slots, policy):
    ids = np.random.default_rng(1).integers(0, 32000, 16)
    resident = prompt_then_decode(localmix.load(q4), ids)
    model = localmix.load(q4, memory=budget(q4, slots), expert_policy=policy)
    assert model.expert_cache.slots == slots
    np.testing.assert_array_equal(prompt_then_decode(model, ids), resident)
    stats = model.expert_cache.stats()
    assert stats["expert_misses"] >= 16 and stats["expert_hits"] + stats["expert_misses"] == \
        sum(model.expert_cache.activations.values())
    assert (stats["prefetches"] > 0) == (slots > 2)  # guesses of the next layer's experts, where slots allow
    assert stats["expert_bytes_read"] == (stats["expert_misses"] + stats["prefetches"]) * model.expert_cache.slot_bytes


def test_a_failed_background_read_surfaces_in_the_caller(q4, tmp_path):
    model = localmix.load(q4, memory=budget(q4, 4))
    cache = model.expert_cache
    cache.layouts[(1, 7)][0] = cache.layouts[(1, 7)][0].__class__(
        *[("experts/missing.bin" if f == "file" else getattr(cache.layouts[(1, 7)][0], f))
          for f in ("name", "file", "offset", "shape", "dtype", "group_size")])
    cache.prefetch(1, [7])
    cache.loading.get((1, 7)) and cache.loading[(1, 7)].result()
    with pytest.raises(LocalmixError, match="missing.bin: cannot read"):
        cache.get(0, 0)


def test_a_budget_that_holds_everything_keeps_the_model_resident(q4):
    assert localmix.load(q4, memory=budget(q4, 16)).expert_cache is None
    assert localmix.load(q4).expert_cache is None


def test_policies_choose_their_victims():
    lru, lfu = LRU(), LFU()
    for key in ["a", "b", "a", "c", "a", "b"]:
        lru.used(key)
        lfu.used(key)
    keys = ["a", "b", "c"]
    assert lru.victim(keys) == "c"  # used longest ago
    assert lfu.victim(keys) == "c"  # used once
    assert lru.victim(["a", "b"]) == "a"  # the batch being computed (c here) is never a victim
    lfu.used("c"), lfu.used("c"), lfu.used("c")
    assert lfu.victim(keys) == "b"


def test_memory_sizes():
    assert parse_memory("12GB") == 12_000_000_000 and parse_memory("16GiB") == 16 << 30
    assert parse_memory("800 MB") == 800_000_000 and parse_memory(1234) == 1234
    with pytest.raises(LocalmixError, match="cannot read"):
        parse_memory("lots")


def test_too_small_a_budget_and_a_missing_expert_file_are_one_line_errors(q4, tmp_path):
    assert_one_line_error(localmix_cli("run", q4, "Hi", "--memory", "1MB"), "too small for this model: it needs at least")
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in q4.rglob("*"):
        target = broken / path.relative_to(q4)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    (broken / "experts" / "L001-E003.bin").unlink()
    result = localmix_cli("run", broken, "Hello there, how are you today?", "-n", "8", "--memory", str(budget(q4, 2)))
    assert_one_line_error(result, "L001-E003.bin: cannot read")
    assert "localmix verify" in result.stderr
