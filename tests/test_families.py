"""Every room for every family: a Qwen3-MoE (per-head q/k norms, a dense layer among sparse ones,
experts 768 wide), a Qwen2-MoE (q/k/v biases, a shared expert, experts 1408 wide) and an OLMoE
(q/k norms over the projection) built by transformers, pulled at 4, 8 and mixed bits, and run on
the Numba kernels, on MLX and within a memory budget (the expert cache), steered and counted.

Float exactness against transformers is in test_model.py; here the quantized paths are checked
against the numpy reference on the same quantized weights, as test_store.py does for Mixtral.
"""

import numpy as np
import pytest
import torch

import localmix
from localmix import kernels
from localmix.quant.convert import LocalSource, convert
from localmix.store import read_manifest, verify
from conftest import make_hf_model
from test_expert_cache import budget

FAMILIES = {
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=32, num_hidden_layers=3, num_local_experts=8,
                      num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1], moe_intermediate_size=768,
                      intermediate_size=128),
    "qwen2_moe": dict(model_type="qwen2_moe", num_local_experts=6, num_experts_per_tok=2,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=128),
    "olmoe": dict(model_type="olmoe", num_local_experts=8, num_experts_per_tok=2, intermediate_size=128),
}
IDS = np.random.default_rng(3).integers(0, 32000, 10)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    hf = tmp_path_factory.mktemp("hf")
    make_hf_model(hf, dtype=torch.bfloat16, **FAMILIES[request.param])
    return request.param, hf, convert(LocalSource(hf), tmp_path_factory.mktemp("models") / request.param, bits="4")


def prompt_then_decode(model, ids, split=4):
    cache = model.transformer.new_cache(len(ids))
    return np.concatenate([model.transformer(ids[:split], cache)] +
                          [model.transformer(ids[i:i + 1], cache) for i in range(split, len(ids))])


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_layout_keeps_routed_experts_in_their_files(family):
    """Routed experts in files of their own; dense layers' MLPs and shared experts beside the
    attention in the dense file (every token uses them); verify finds the folder intact."""
    name, _, folder = family
    manifest = read_manifest(folder)
    args = localmix.load(folder, backend="numpy").config
    experts = [f for f in manifest["files"] if f.startswith("experts/")]
    assert len(experts) == len(args.moe_layers) * args.num_local_experts
    for tensor, entry in manifest["tensors"].items():
        routed = ".experts." in tensor
        assert (entry["file"] != "dense.bin") == routed, tensor
    assert verify(folder) == []


def test_kernels_match_the_numpy_reference(family):
    """Prompt and decoded tokens on the Numba kernels against numpy on the same 4-bit weights."""
    _, _, folder = family
    reference = prompt_then_decode(localmix.load(folder, backend="numpy"), IDS)
    fast = prompt_then_decode(localmix.load(folder, backend="numba"), IDS)
    print(f"{folder.name}: kernels vs numpy {relative(fast, reference):.1e}")
    assert relative(fast, reference) <= 1e-3
    assert (fast.argmax(-1) == reference.argmax(-1)).mean() >= 0.8


def test_eight_bits_stay_close_to_the_float_model(family, tmp_path):
    """The 8-bit model's logits are near the float checkpoint's, and nearer than the 4-bit model's:
    a check that names and shapes were mapped (a swapped matrix is 100% off), not of quality. Tiny
    random mixtures are chaotic (an expert choice flips with the rounding): 1-2% for one layer of
    plain experts, 12% for the Qwen3 case's three layers of top-3 (python -s prints them)."""
    _, hf, folder = family
    float_logits = prompt_then_decode(localmix.load(hf), IDS)
    four = prompt_then_decode(localmix.load(folder, backend="numpy"), IDS)
    eight = prompt_then_decode(localmix.load(convert(LocalSource(hf), tmp_path / "q8", bits="8"), backend="numpy"), IDS)
    print(f"{folder.name}: 8-bit {relative(eight, float_logits):.1e}, 4-bit {relative(four, float_logits):.1e}")
    assert relative(eight, float_logits) < 0.2
    assert relative(eight, float_logits) < relative(four, float_logits) / 2


def test_expert_cache_gives_the_resident_logits(family):
    """Within a budget of 3 expert slots (fewer than a token's experts over the layers), the
    logits are the resident model's, bit for bit, and the cache missed."""
    _, _, folder = family
    resident = prompt_then_decode(localmix.load(folder), IDS)
    model = localmix.load(folder, memory=budget(folder, 3), prefetch=True)
    assert model.expert_cache.slots == 3
    np.testing.assert_array_equal(prompt_then_decode(model, IDS), resident)
    assert model.expert_cache.stats()["expert_misses"] > 0
    routed = model.transformer.routing.routed
    dense = [i for i in range(model.config.num_hidden_layers) if i not in model.config.moe_layers]
    assert routed[model.config.moe_layers].sum() > 0 and routed[dense].sum() == 0


def test_mlx_matches_the_numpy_reference(family):
    _, _, folder = family
    reference = prompt_then_decode(localmix.load(folder, backend="numpy"), IDS)
    got = prompt_then_decode(localmix.load(folder, backend="mlx-f32"), IDS)
    assert relative(got, reference) < 1e-4


def test_steering_and_generation(family):
    """min_expert_weight drops light experts (fewer experts per token), and a seeded answer is
    the same on every backend."""
    _, _, folder = family
    model = localmix.load(folder)
    exact = list(model.stream(list(IDS), max_tokens=6, temperature=0.8, seed=1))
    before = model.transformer.routing.snapshot()
    steered = list(model.stream(list(IDS), max_tokens=6, temperature=0.8, seed=1, min_expert_weight=0.45))
    stats = model.transformer.routing.since(before)
    layers = model.config.moe_layers
    per_token = stats["routed"][layers].sum() / stats["tokens"][layers].sum()
    assert per_token < model.config.num_experts_per_tok
    assert len(steered) == len(exact)
    numpy_answer = [r.token for r in localmix.load(folder, backend="numpy").stream(
        list(IDS), max_tokens=6, temperature=0.8, seed=1)]
    assert [r.token for r in exact] == numpy_answer


@pytest.mark.parametrize("bits", ["8", "mixed"])
def test_other_bit_widths(tmp_path, bits):
    make_hf_model(tmp_path / "hf", dtype=torch.bfloat16, **FAMILIES["qwen2_moe"])
    folder = convert(LocalSource(tmp_path / "hf"), tmp_path / "model", bits=bits)
    reference = prompt_then_decode(localmix.load(folder, backend="numpy"), IDS)
    fast = localmix.load(folder)
    assert relative(prompt_then_decode(fast, IDS), reference) <= 1e-3
    if bits == "mixed":
        tensors = read_manifest(folder)["tensors"]
        assert tensors["model.layers.0.mlp.experts.0.gate_proj.weight"]["dtype"] == "q4"
        assert tensors["model.layers.0.mlp.shared_expert.gate_proj.weight"]["dtype"] == "q8"
        assert tensors["model.layers.0.self_attn.q_proj.bias"]["dtype"] == "f32"
    assert kernels.has_vector_kernels() is False or fast.transformer.ops.plans[0] is None  # biases: op by op
