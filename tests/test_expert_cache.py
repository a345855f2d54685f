"""Running within a memory budget: experts in preallocated slots, read from their files on demand."""

import dataclasses
import json
import mmap
import shutil

import numpy as np
import pytest
import torch

import localmix
from localmix import kernels
from localmix.errors import LocalmixError
from localmix import routing
from localmix.experts import (KV_FIRST_TOKENS, LFU, LRU, Pinned, ResidentExperts, Room, cgroup_room, fixed_memory,
                              kv_bytes, parse_memory, plan_memory, shadow_bytes)
from localmix.routing import hot_experts
from localmix.quant.convert import LocalSource, convert
from localmix.quality import kl_divergence
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
    return fixed_memory(manifest, model.config) + slots * max(sizes)


def prompt_then_decode(model, ids):
    cache = model.transformer.new_cache(len(ids))
    return np.concatenate([model.transformer(ids[:6], cache)] +
                          [model.transformer(ids[i:i + 1], cache) for i in range(6, len(ids))])


@pytest.fixture(scope="module")
def q4_routing(q4):
    """Routing statistics of a calibration text saved in the model's folder, as `localmix stats --save`
    writes them (for the pinned policy)."""
    model = localmix.load(q4)
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4, bos=True)
    routed = routing.collect(model, ids, step=16)["routed"]
    routing.save(q4, routed, len(ids), "test")
    return routed


@pytest.mark.parametrize("slots", [2, 5, 9])
@pytest.mark.parametrize("policy", ["lru", "lfu", "pinned"])
def test_logits_within_a_budget_are_the_resident_ones_bit_for_bit(q4, q4_routing, slots, policy):
    ids = np.random.default_rng(1).integers(0, 32000, 16)
    resident = prompt_then_decode(localmix.load(q4), ids)
    model = localmix.load(q4, memory=budget(q4, slots), expert_policy=policy, prefetch=True)
    cache = model.expert_cache
    assert cache.slots == slots
    np.testing.assert_array_equal(prompt_then_decode(model, ids), resident)
    stats = cache.stats()
    assert stats["expert_misses"] >= 16 and stats["expert_policy"] == policy
    # The cache is asked for exactly the experts that tokens were routed to, layer by layer.
    np.testing.assert_array_equal(cache.hits + cache.misses > 0, model.transformer.routing.routed > 0)
    assert (stats["prefetches"] > 0) == (slots > 2)  # guesses of the next layer's experts, where slots allow
    reads = stats["expert_misses"] + stats["prefetches"] + stats["expert_pinned"]
    assert stats["expert_bytes_read"] == reads * cache.slot_bytes
    if policy == "pinned":  # the hottest experts of the saved statistics, kept whatever came after
        pinned = hot_experts(q4_routing, max(0, slots - 4))
        assert cache.policy.pinned == set(pinned) and all(key in cache.resident for key in pinned)
        assert stats["expert_pinned"] == len(pinned) == {2: 0, 5: 1, 9: 5}[slots]


def test_without_prefetch_only_misses_are_read(q4):
    model = localmix.load(q4, memory=budget(q4, 5), prefetch=False)
    prompt_then_decode(model, np.arange(100, 116))
    stats = model.expert_cache.stats()
    assert stats["prefetches"] == 0 and stats["expert_bytes_read"] == stats["expert_misses"] * model.expert_cache.slot_bytes


def test_the_pinned_policy_needs_saved_routing_statistics(q4, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(q4, copy)
    (copy / "routing.json").unlink(missing_ok=True)
    with pytest.raises(LocalmixError, match="run `localmix stats copy --file TEXT --save` first"):
        localmix.load(copy, memory=budget(q4, 5), expert_policy="pinned")
    (copy / "routing.json").write_text('{"routed": [[1, 2]]}')
    with pytest.raises(LocalmixError, match="routing statistics for"):
        localmix.load(copy, memory=budget(q4, 5), expert_policy="pinned")
    with pytest.raises(LocalmixError, match="unknown expert cache policy 'mru'"):
        localmix.load(copy, expert_policy="mru")


def test_a_failed_background_read_surfaces_in_the_caller(q4, tmp_path):
    model = localmix.load(q4, memory=budget(q4, 4), prefetch=True)
    cache = model.expert_cache
    cache.layouts[(1, 7)][0] = cache.layouts[(1, 7)][0].__class__(
        *[("experts/missing.bin" if f == "file" else getattr(cache.layouts[(1, 7)][0], f))
          for f in ("name", "file", "offset", "shape", "dtype", "group_size")])
    cache.prefetch(1, [7])
    cache.loading.get((1, 7)) and cache.loading[(1, 7)].result()
    with pytest.raises(LocalmixError, match="missing.bin: cannot read"):
        cache.get(0, 0)


def test_a_decoded_tokens_failed_reads_are_raised_in_it_and_not_after(q4):
    """Two of a token's misses whose files are gone, read by the reader threads: the token raises
    one of them; the next token, of other experts, is not failed by the other (each read's error
    stays with its own future), and the two are read again once their files are back."""
    model = localmix.load(q4, memory=budget(q4, 6), prefetch=False)
    cache = model.expert_cache
    gone = {key: cache.layouts[key][0] for key in [(0, 1), (0, 2)]}
    for key, layout in gone.items():
        cache.layouts[key][0] = dataclasses.replace(layout, file="experts/missing.bin")
    failing = cache.token_groups(0, [0, 1, 2, 3])  # the reads start here; their groups are taken below
    for loading in list(cache.loading.values()):
        loading.exception()  # every read has ended, two of them failed
    assert [ids for ids, _ in cache.token_groups(0, [4, 5])] == [[4, 5]]
    with pytest.raises(LocalmixError, match="missing.bin: cannot read"):
        list(failing)
    for key, layout in gone.items():
        cache.layouts[key][0] = layout
    groups = list(cache.token_groups(0, [1, 2]))
    assert sorted(e for ids, _ in groups for e in ids) == [1, 2] and cache.held_total == sum(cache.held)


def test_a_budget_that_holds_everything_keeps_the_model_resident(q4):
    assert localmix.load(q4, memory=budget(q4, 16)).expert_cache is None
    assert localmix.load(q4).expert_cache is None


def test_policies_choose_their_victims():
    lru, lfu = LRU(), LFU()
    for key in ["a", "b", "a", "c", "a", "b"]:
        lru.used(key)
        lfu.used(key)
    anyone = lambda key: True  # noqa: E731
    assert lru.victim(anyone) == "c"  # used longest ago
    assert lfu.victim(anyone) == "c"  # used once
    assert lru.victim(lambda key: key != "c") == "a"  # the batch being computed (c here) is never a victim
    lfu.used("c"), lfu.used("c"), lfu.used("c")
    assert lfu.victim(anyone) == "b"
    pinned = Pinned(["c"])
    for key in ["c", "a", "b"]:
        pinned.used(key)
    assert pinned.victim(anyone) == "a"  # c was used longest ago, but it is pinned
    assert pinned.victim(lambda key: key == "c") is None


def test_lfu_buckets_choose_as_a_pass_over_every_key_would():
    """LFU's buckets against the definition, a pass over every key it holds: the least used that
    may go, the one used longest ago on ties; through uses, reads ahead, evictions and keys that may
    not go, long enough for its heap of counts to be rebuilt."""
    rng = np.random.default_rng(3)
    lfu = LFU()
    for step in range(20000):
        key = int(rng.zipf(1.3)) % 40
        action = rng.random()
        if action < 0.7:
            lfu.used(key)
        elif action < 0.8:
            lfu.loaded(key)
        else:
            lfu.removed(key)
        busy = set(rng.integers(0, 40, 3).tolist())
        may_go = lambda k: k not in busy  # noqa: E731
        expected = min((k for k in lfu.order if may_go(k)), key=lambda k: lfu.uses[k], default=None)
        assert lfu.victim(may_go) == expected, step
    assert len(lfu.counts) <= 2 * len(lfu.buckets) + 65


def test_hot_experts_are_the_most_routed_to():
    routed = np.array([[5, 0, 9], [1, 7, 2]])
    assert hot_experts(routed, 3) == [(0, 2), (1, 1), (0, 0)]


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
    shutil.copy(q4 / "experts" / "L001-E003.bin", broken / "experts" / "L001-E003.bin")
    with open(broken / "experts" / "L000-E005.bin", "r+b") as f:
        f.truncate(1000)
    result = localmix_cli("run", broken, "Hello there, how are you today?", "-n", "8", "--memory", str(budget(q4, 2)))
    assert_one_line_error(result, "L000-E005.bin: truncated (1000 bytes")
    assert "localmix verify" in result.stderr


def test_stats_run_and_bench_report_the_experts(q4, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(q4, copy)
    (copy / "routing.json").unlink(missing_ok=True)
    table = localmix_cli("stats", copy, "--prompt", "Hello there, how are you today?")
    assert table.returncode == 0 and "max/mean" in table.stdout and "E7" in table.stdout, table.stderr
    assert not (copy / "routing.json").exists()
    result = localmix_cli("stats", copy, "--prompt", "Hello there, how are you today?", "--save", "--json")
    figures = json.loads(result.stdout)
    model = localmix.load(copy)
    tokens = len(model.tokenizer.encode("Hello there, how are you today?", bos=True))
    routed = np.array(figures["routed"])
    assert figures["tokens"] == tokens and (routed.sum(axis=1) == 2 * tokens).all()
    saved = json.loads((copy / "routing.json").read_text())
    assert saved["routed"] == figures["routed"] and saved["tokens"] == tokens
    assert all(1 <= m <= 4 for m in figures["max_over_mean"]) and all(0 < e <= 1 for e in figures["entropy"])

    run = localmix_cli("run", copy, "Hi", "-n", "4", "--memory", str(budget(q4, 5)), "--policy", "pinned", "--stats")
    assert run.returncode == 0, run.stderr
    assert "hit rate" in run.stderr and "(5 slots, pinned)" in run.stderr and "busiest expert" in run.stderr
    resident = localmix_cli("run", copy, "Hi", "-n", "4", "--stats")
    assert "experts: all resident; busiest expert" in resident.stderr

    bench = localmix_cli("bench", copy, "-p", "8", "-n", "4", "--memory", str(budget(q4, 5)), "--policy", "lfu",
                         "--cold", "--no-prefetch", "--json")
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    assert figures["expert_policy"] == "lfu" and figures["cold"] and figures["prefetches"] == 0
    assert figures["expert_prefetch"] is False
    assert figures["expert_hits"] + figures["expert_misses"] == 4 * 2 * 2  # 4 tokens, 2 layers, 2 experts each
    # beside the figures, the limit the disk sets: its read speed over what each decoded token read
    per_token = figures["expert_bytes_read"] / 4
    assert figures["disk_limit_tok_s"] == pytest.approx(figures["disk_gb_s"] * 1e9 / per_token)

    for args, message in [(["--prompt", "x", "--file", "y"], "one of them"), ([], "one of them"),
                          (["--file", tmp_path / "none.txt"], "none.txt: cannot read")]:
        assert_one_line_error(localmix_cli("stats", copy, *args), message)
    assert_one_line_error(localmix_cli("run", copy, "Hi", "--memory", str(budget(q4, 5)), "--policy", "mru"),
                          "unknown expert cache policy 'mru'")


# --- shadow copies: 2-bit experts used while the full ones are read ------------------------------

@pytest.fixture(scope="module")
def q4_wide(tmp_path_factory):
    """Widths that are multiples of 128, the 2-bit kernels' unit (as in every real Mixtral)."""
    hf = tmp_path_factory.mktemp("hf-wide")
    make_hf_model(hf, dtype=torch.bfloat16, hidden_size=128, intermediate_size=128, num_local_experts=8)
    return convert(LocalSource(hf), tmp_path_factory.mktemp("models") / "wide-q4", bits="4")


def shadow_budget(folder, slots: int) -> int:
    return budget(folder, slots) + shadow_bytes(read_manifest(folder), 2)


needs_vector_kernels = pytest.mark.skipif(not kernels.has_vector_kernels(),
                                          reason="shadow copies run on the AVX2 kernels, which this CPU lacks")


@needs_vector_kernels
def test_shadow_copies_are_2_bit_copies_of_the_experts(q4_wide):
    model = localmix.load(q4_wide, memory=shadow_budget(q4_wide, 3), shadow_bits=2)
    cache = model.expert_cache
    assert cache.slots == 3 and len(cache.shadows) == 2 * 8
    assert cache.shadow_bytes == shadow_bytes(read_manifest(q4_wide), 2)
    full = localmix.load(q4_wide).transformer.weights.layers[1].experts[5]
    shadow = cache.shadows[1, 5]
    for name in ("w1", "w2", "w3"):
        s, f = getattr(shadow, name), getattr(full, name).dequantize()
        assert (s.bits, s.group_size) == (2, 64)
        # 2 bits with the error-minimizing scale search: ~0.35 of the weights' norm on Gaussian
        # weights (min/max rounding gives 0.40); 0.4 allows for these 4-bit weights' outliers
        assert np.linalg.norm(s.dequantize() - f) / np.linalg.norm(f) < 0.4


@needs_vector_kernels
def test_decoding_with_shadow_copies_only_is_the_model_with_2_bit_experts(q4_wide):
    """With the full reads switched off, every expert a token is routed to comes from its shadow:
    the logits are those of the numpy reference with the shadows in place of the experts (within
    the kernels' 1e-3 of the largest logit, see test_store)."""
    model = localmix.load(q4_wide, memory=shadow_budget(q4_wide, 3), shadow_bits=2, prefetch=False)
    cache = model.expert_cache
    cache._start_load = lambda *args, **kwargs: None
    reference = localmix.load(q4_wide, backend="numpy")
    for i, layer in enumerate(reference.transformer.weights.layers):
        layer.experts = ResidentExperts([cache.shadows[i, e] for e in range(8)])
    ids = np.random.default_rng(4).integers(0, 32000, 8)

    def one_by_one(m):
        kv = m.transformer.new_cache(len(ids))
        return np.concatenate([m.transformer(ids[i:i + 1], kv) for i in range(len(ids))])

    ours, expected = one_by_one(model), one_by_one(reference)
    assert np.abs(ours - expected).max() <= 1e-3 * np.abs(expected).max()
    stats = cache.stats()
    assert stats["shadow_uses"] == stats["expert_misses"] == 8 * 2 * 2 and stats["expert_bytes_read"] == 0


@needs_vector_kernels
def test_shadow_copies_answer_misses_while_the_full_experts_are_read(q4_wide):
    ids = np.random.default_rng(1).integers(0, 32000, 16)
    resident = prompt_then_decode(localmix.load(q4_wide), ids)
    model = localmix.load(q4_wide, memory=shadow_budget(q4_wide, 4), shadow_bits=2, prefetch=False)
    ours = prompt_then_decode(model, ids)
    cache = model.expert_cache
    stats = cache.stats()
    np.testing.assert_array_equal(ours[:6], resident[:6])  # prompts wait for the full experts
    assert stats["shadow_uses"] > 0 and stats["expert_hits"] > 0 and stats["expert_shadow_bits"] == 2
    # the prompt's misses read their experts in the caller; a decoded one's shadow answers while
    # the full expert is read in the background, where the reader is free
    assert stats["expert_bytes_read"] <= stats["expert_misses"] * cache.slot_bytes
    assert stats["expert_bytes_read"] > (stats["expert_misses"] - stats["shadow_uses"]) * cache.slot_bytes
    # an approximation: close to the exact model, not equal (for scale, KL 0 is exact)
    kl = kl_divergence(resident[6:], ours[6:])
    assert 0 < kl < 0.5, kl


@needs_vector_kernels
def test_shadow_copies_take_their_memory_from_the_budget(q4, q4_wide):
    manifest = read_manifest(q4_wide)
    config = localmix.load(q4_wide).config
    memory = budget(q4_wide, 14)
    slots, _ = plan_memory(manifest, config, memory)
    with_shadows, _ = plan_memory(manifest, config, memory, shadow_bits=2)
    assert slots == 14 and with_shadows == 14 - -(-shadow_bytes(manifest, 2) // max(
        f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")))
    with pytest.raises(LocalmixError, match="2-bit shadow copies"):
        plan_memory(manifest, config, budget(q4_wide, 2), shadow_bits=2)
    resident = localmix.load(q4_wide, memory=budget(q4_wide, 16), shadow_bits=2)
    assert resident.expert_cache is None and "no shadow copies needed" in resident.memory_note
    with pytest.raises(LocalmixError, match="shadow copies are 2-bit, not 3"):
        localmix.load(q4_wide, memory=shadow_budget(q4_wide, 3), shadow_bits=3)
    with pytest.raises(LocalmixError, match="numba backend"):
        localmix.load(q4_wide, memory=shadow_budget(q4_wide, 3), shadow_bits=2, backend="numpy")
    with pytest.raises(LocalmixError, match="multiples of 128"):
        localmix.load(q4, memory=shadow_budget(q4, 3), shadow_bits=2)
    bench = localmix_cli("bench", q4_wide, "-p", "4", "-n", "4", "--memory", str(shadow_budget(q4_wide, 3)),
                         "--shadow-bits", "2", "--no-prefetch", "--json")
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    assert figures["expert_shadow_bits"] == 2 and figures["shadow_uses"] > 0, bench.stderr
    run = localmix_cli("run", q4_wide, "Hi", "-n", "4", "--memory", str(shadow_budget(q4_wide, 3)), "--shadow-bits",
                       "2", "--stats")
    assert run.returncode == 0 and "shadow uses" in run.stderr, run.stderr


@pytest.mark.parametrize("setting", ["resident", "budget", "adaptive"])
def test_sequences_decoded_together_match_each_decoded_alone(q4, setting):
    """Transformer.step (a server's answers, one token each per step) runs the fused kernels over
    all the sequences' rows, the experts once for all: within the kernels' rounding (their tiles
    of 2-4 rows add in another order than one row) of each sequence decoded alone, also when an
    expert cache of 3 slots splits a step's experts into batches, and with experts dropped."""
    options = {"resident": {}, "budget": {"memory": budget(q4, 3)}, "adaptive": {"min_expert_weight": 0.45}}[setting]
    model = localmix.load(q4, **options)
    t = model.transformer
    prompts = [np.random.default_rng(i).integers(0, 32000, 5) for i in range(4)]
    tokens = [[int(x) for x in np.random.default_rng(10 + i).integers(0, 32000, 3)] for i in range(4)]
    caches = [t.new_cache(8) for _ in prompts]
    for prompt, cache in zip(prompts, caches):
        t(prompt, cache)
    together = np.stack([t.step([row[i] for row in tokens], caches) for i in range(3)], axis=1)
    assert (t.ops.plans[0] is not None) == kernels.has_vector_kernels()
    for prompt, row, expected in zip(prompts, tokens, together):
        cache = t.new_cache(8)
        t(prompt, cache)
        alone = np.concatenate([t([token], cache) for token in row])
        assert np.abs(alone - expected).max() <= 1e-4 * np.abs(alone).max()


# --- the room a process has: memory cgroups, and the KV cache's growth within a budget -----------

def fake_cgroup(tmp_path, version: int, levels: dict) -> tuple:
    """A /proc/self/cgroup and a cgroup mount as the kernel shows them: levels maps a cgroup path
    ("/" the root) to (limit or None, usage, page cache)."""
    root = tmp_path / "sys-fs-cgroup"
    mount = root / "memory" if version == 1 else root
    for path, (limit, usage, cache) in levels.items():
        here = mount / path.strip("/")
        here.mkdir(parents=True, exist_ok=True)
        if version == 1:
            (here / "memory.limit_in_bytes").write_text(f"{limit or 9223372036854771712}\n")
            (here / "memory.usage_in_bytes").write_text(f"{usage}\n")
            (here / "memory.stat").write_text(f"cache 1\nrss 2\ntotal_cache {cache}\ntotal_rss {usage - cache}\n")
        else:
            (here / "memory.max").write_text(f"{limit or 'max'}\n")
            (here / "memory.current").write_text(f"{usage}\n")
            (here / "memory.stat").write_text(f"anon {usage - cache}\nfile {cache}\nkernel 0\n")
    if version == 2:
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
    own = max(levels, key=len)
    proc = tmp_path / "cgroup"
    proc.write_text(f"4:memory:{own}\n1:cpu:/\n0::/\n" if version == 1 else f"0::{own}\n")
    return proc, root


@pytest.mark.parametrize("version", [1, 2])
def test_a_memory_cgroup_limit_is_the_room_and_page_cache_counts_as_free(tmp_path, version):
    gib = 1 << 30
    # A 12 GiB limit one level up, which holds 3 GiB of which 2 GiB page cache: 11 GiB left.
    proc, root = fake_cgroup(tmp_path, version, {"/": (None, 20 * gib, 0), "/laptop": (12 * gib, 3 * gib, 2 * gib),
                                                 "/laptop/shell": (None, gib, 0)})
    room = cgroup_room(proc, root)
    assert room.available == 11 * gib and room.limit == 12 * gib and f"cgroup v{version}" in room.where
    # A tighter limit further down wins.
    proc, root = fake_cgroup(tmp_path / "b", version, {"/": (None, 0, 0), "/a": (12 * gib, 0, 0),
                                                       "/a/b": (8 * gib, gib, 0)})
    assert cgroup_room(proc, root).available == 7 * gib
    # No limit anywhere (or nothing readable): no room from cgroups.
    proc, root = fake_cgroup(tmp_path / "c", version, {"/": (None, gib, 0), "/a": (None, gib, 0)})
    assert cgroup_room(proc, root) is None and cgroup_room(tmp_path / "none", root) is None
    # A container whose own cgroup is the root of its mount, named by a path it cannot see.
    proc, root = fake_cgroup(tmp_path / "d", version, {"/": (4 * gib, gib, 0)})
    proc.write_text(proc.read_text().replace(":/\n", ":/docker/abc\n", 1))
    assert cgroup_room(proc, root).available == 3 * gib


def test_without_a_budget_a_model_larger_than_the_room_gets_most_of_it(q4):
    manifest, config = read_manifest(q4), localmix.load(q4).config
    for name, f in manifest["files"].items():  # experts of 40-odd MB, so that the runtime does not dwarf them
        f["size"] *= 3000 if name.startswith("experts/") else 1
    expert = max(f["size"] for name, f in manifest["files"].items() if name.startswith("experts/"))
    fixed = fixed_memory(manifest, config)
    whole = fixed + 16 * expert
    assert plan_memory(manifest, config, None, room=Room(whole)) == (None, None)
    # Most of it fits: mapped whole, the system pages the rest (faster, measured).
    slots, note = plan_memory(manifest, config, None, room=Room(int(0.9 * whole)))
    assert slots is None and "mapped whole" in note
    # Less: 90% of the room, for the process: what is fixed, then slots.
    limit = Room(int((fixed + 5.5 * expert) / 0.9), whole, "cgroup v2 /laptop")
    assert limit.available < 0.7 * whole
    slots, note = plan_memory(manifest, config, None, room=limit)
    assert slots == 5 and "under the" in note and "cgroup v2 /laptop" in note and "5 of 16 experts in memory" in note
    with pytest.raises(LocalmixError, match="too small for this model"):
        plan_memory(manifest, config, None, room=Room(fixed + expert))


def test_a_growing_kv_cache_takes_expert_slots_and_gives_them_back(q4):
    ids = np.random.default_rng(1).integers(0, 32000, 16)
    resident = prompt_then_decode(localmix.load(q4), ids)
    model = localmix.load(q4, memory=budget(q4, 9), prefetch=False)
    cache, allowance = model.expert_cache, model.transformer.kv_allowance
    planned = allowance.free
    context = model.config.max_position_embeddings
    assert planned == kv_bytes(model.config, min(KV_FIRST_TOKENS, context)) and cache.slots == 9
    # A cache for the planned room takes none; one that holds 3.5 slots more takes 4.
    room = model.transformer.new_cache(min(KV_FIRST_TOKENS, context))
    assert cache.slots == 9 and allowance.free == 0
    per_token = kv_bytes(model.config, 1)
    more = model.transformer.new_cache(int(3.5 * cache.slot_bytes) // per_token)
    assert cache.slots == 5 and 0 <= allowance.free < cache.slot_bytes
    np.testing.assert_array_equal(prompt_then_decode(model, ids), resident)  # fewer slots, the same logits
    del room, more  # the bytes come back, the slots too
    assert cache.slots == 9 and planned <= allowance.free < planned + cache.slot_bytes
    # Never below one token's experts (and two): past that, the KV cache grows over the budget.
    many = [model.transformer.new_cache(context) for _ in range(-(-20 * cache.slot_bytes // kv_bytes(model.config, context)))]
    assert cache.slots == 2
    np.testing.assert_array_equal(prompt_then_decode(model, ids), resident)
    del many
    assert cache.slots == 9


def test_reads_past_the_page_cache_and_buffered_ones_fill_a_slot_alike(tmp_path):
    from localmix.experts.reads import ALIGN, read_into
    data = np.random.default_rng(0).integers(0, 256, 3 * ALIGN + 123, dtype=np.uint8)
    path = tmp_path / "expert.bin"
    path.write_bytes(data.tobytes())
    region = mmap.mmap(-1, 8 * ALIGN)
    aligned = np.frombuffer(region, np.uint8)[:4 * ALIGN]  # O_DIRECT where the file system allows it
    unaligned = np.zeros(4 * ALIGN + 1, np.uint8)[1:]      # buffered (MLX's slots, say)
    for out in (aligned, unaligned):
        for parallel in (False, True):
            out[:] = 0
            read_into(path, out, data.size, parallel)
            np.testing.assert_array_equal(out[:data.size], data)
        with pytest.raises(LocalmixError, match="truncated"):
            read_into(path, out, data.size + ALIGN)
