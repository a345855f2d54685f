"""The float forward pass against transformers' MixtralForCausalLM, MistralForCausalLM,
Qwen3MoeForCausalLM, Qwen2MoeForCausalLM, OlmoeForCausalLM and GraniteMoeForCausalLM.

Tolerance: both sides compute in float32 with the same operation order, so the remaining
difference is summation order inside matrix products (numpy's BLAS versus torch's), a few float32
ulps per layer: we measure 4e-7 to 1.3e-6 of the largest logit on the cases here (pytest -s prints
it). We assert 1e-5, the project's aim (the hard limit is 1e-4), which leaves a factor of 20 for
BLAS differences; the same argmax at every position must hold too.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import localmix
from localmix.kv_cache import KVCache
from conftest import TOKENIZER_V1, make_hf_model, reference_logits

RTOL = 1e-5

CASES = {
    "gqa2-top2of4": {},
    "mha-top1of8": dict(num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=1),
    "gqa4-top3of8": dict(num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=3),
    "multi-query": dict(num_attention_heads=4, num_key_value_heads=1),
    "head-dim-32-not-16": dict(head_dim=32),
    "tied-embeddings": dict(tie_word_embeddings=True),
    "sliding-window-5": dict(sliding_window=5),
    "rope-theta-1e4": dict(rope_theta=1e4),
    "three-layers-odd-sizes": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                                   num_key_value_heads=3),
    "dense-mistral": dict(model_type="mistral"),
    "dense-mistral-window-7": dict(model_type="mistral", sliding_window=7, num_key_value_heads=1),
    "bf16-sharded": dict(dtype=torch.bfloat16, shard="300KB"),
    "fp16": dict(dtype=torch.float16),
    "wider-deeper": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, num_local_experts=8),
    # Qwen3-MoE: q/k RMSNorm per head, a head_dim of its own, softmax then top-k renormalized
    # (norm_topk_prob) or not, dense layers among sparse ones (mlp_only_layers, decoder_sparse_step).
    "qwen3-moe": dict(model_type="qwen3_moe", head_dim=32, num_hidden_layers=3, num_local_experts=8,
                      num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen3-moe-unnormalized-every-2nd": dict(model_type="qwen3_moe", num_hidden_layers=4, norm_topk_prob=False,
                                             decoder_sparse_step=2, tie_word_embeddings=True),
    "qwen3-moe-bf16-sharded": dict(model_type="qwen3_moe", num_local_experts=16, num_experts_per_tok=4,
                                   norm_topk_prob=True, dtype=torch.bfloat16, shard="300KB"),
    # Qwen2-MoE: q, k, v biases, a shared expert scaled by its sigmoid gate, no renormalization.
    "qwen2-moe": dict(model_type="qwen2_moe", num_local_experts=8, num_experts_per_tok=4),
    "qwen2-moe-renormalized-dense-layer": dict(model_type="qwen2_moe", num_hidden_layers=3, norm_topk_prob=True,
                                               mlp_only_layers=[0], num_key_value_heads=4),
    # OLMoE: q and k RMSNorm over the whole projection, no renormalization; clip_qkv where set.
    "olmoe": dict(model_type="olmoe", num_local_experts=8, num_experts_per_tok=2),
    "olmoe-clip-qkv-mha": dict(model_type="olmoe", num_key_value_heads=4, clip_qkv=0.8, norm_topk_prob=True),
    # GraniteMoE: experts stacked in two tensors per layer, top-k of the logits then their softmax,
    # embedding, residual and attention multipliers and a logits divisor (granite-3.0-1b-a400m's values).
    "granitemoe": dict(model_type="granitemoe", num_local_experts=8, num_experts_per_tok=3, embedding_multiplier=12.0,
                       residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=6.0,
                       tie_word_embeddings=True),
    "granitemoe-bf16-sharded-bias": dict(model_type="granitemoe", attention_bias=True, dtype=torch.bfloat16,
                                         shard="200KB"),
    # gpt-oss: attention sinks, sliding windows on alternate layers (shorter than the prompt), YaRN,
    # q/k/v/o biases, a router bias (top-k of the logits then their softmax), experts stacked
    # transposed with gate and up interleaved, with biases, and the clamped SwiGLU (a limit the
    # small model's activations cross, so that the clamps are exercised).
    "gpt-oss": dict(model_type="gpt_oss", head_dim=16, sliding_window=6, num_local_experts=8, num_experts_per_tok=3,
                    swiglu_limit=0.3),
    "gpt-oss-yarn-truncated-mha-full-windows": dict(
        model_type="gpt_oss", head_dim=32, num_key_value_heads=4, num_hidden_layers=3, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "full_attention"], swiglu_limit=0.5, swiglu_alpha=1.3,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "beta_slow": 2.0,
                         "original_max_position_embeddings": 64, "rope_theta": 1e4}),
    "gpt-oss-plain-rope-gqa4": dict(model_type="gpt_oss", num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                    sliding_window=3, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                    swiglu_limit=0.2),
    "gpt-oss-bf16-sharded": dict(model_type="gpt_oss", sliding_window=9, num_local_experts=16, num_experts_per_tok=4,
                                 swiglu_limit=0.3, dtype=torch.bfloat16, shard="300KB"),
}


def assert_close(ours: np.ndarray, ref: np.ndarray, label: str = "") -> None:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"{label}: max|diff|/max|ref| = {rel:.1e}")  # shown with pytest -s
    assert rel <= RTOL, f"max|diff|/max|ref| = {rel:.2e}"
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_logits_match_transformers(tmp_path, case):
    reference = make_hf_model(tmp_path, **CASES[case])
    ids = np.random.default_rng(1).integers(0, 32000, 40)
    model = localmix.load(tmp_path)
    assert_close(model.logits(ids), reference_logits(reference, ids), case)


@pytest.mark.parametrize("case", ["gqa2-top2of4", "sliding-window-5", "dense-mistral-window-7", "qwen3-moe",
                                  "qwen2-moe", "olmoe", "granitemoe", "gpt-oss"])
def test_kv_cache_decoding_equals_full_pass(tmp_path, case):
    reference = make_hf_model(tmp_path, **CASES[case])
    ids = np.random.default_rng(2).integers(0, 32000, 19)
    model = localmix.load(tmp_path)
    full = model.logits(ids)
    cache = KVCache(model.config, capacity=4)  # small on purpose: decoding must grow it
    prefix = model.transformer(ids[:6], cache)
    steps = [model.transformer(ids[i:i + 1], cache) for i in range(6, len(ids))]
    incremental = np.concatenate([prefix] + steps)
    np.testing.assert_allclose(incremental, full, rtol=0, atol=1e-5 * np.abs(full).max())
    assert_close(incremental, reference_logits(reference, ids), f"kv-cache {case}")


@pytest.mark.parametrize("k", [1, 3])
def test_experts_per_token_override(tmp_path, k):
    reference = make_hf_model(tmp_path, num_local_experts=4, num_experts_per_tok=2)
    ids = np.random.default_rng(3).integers(0, 32000, 11)
    model = localmix.load(tmp_path, experts_per_token=k)
    assert model.config.num_experts_per_tok == k
    for layer in reference.model.layers:  # the same override in transformers
        layer.mlp.gate.top_k = k
    assert_close(model.logits(ids), reference_logits(reference, ids), f"top-{k}")


def test_experts_per_token_out_of_range(tmp_path):
    make_hf_model(tmp_path)
    with pytest.raises(localmix.LocalmixError, match="between 1 and 4"):
        localmix.load(tmp_path, experts_per_token=5)


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] rounded to MXFP4 as gpt-oss ships it: per 32 values the smallest power of
    two 2^e with max|w| / 2^e <= 6, each value the nearest E2M1 value (0, ±0.5, ±1, ±1.5, ±2, ±3,
    ±4, ±6) times 2^e. Returns blocks [..., rows, cols / 32, 16] (two codes a byte, the low nibble
    first) and scales [..., rows, cols / 32] (e + 127)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    groups = w.reshape(*w.shape[:-1], -1, 32)
    e = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6)).to(torch.int32)
    scaled = groups / torch.exp2(e.float())[..., None]
    magnitude = (scaled.abs()[..., None] - grid).abs().argmin(-1)
    codes = (magnitude + 8 * (scaled < 0)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (e + 127).to(torch.uint8)


MXFP4_QUANTIZATION = {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}


def save_mxfp4(model, folder, config: dict, split: bool = False) -> None:
    """The transformers gpt-oss model saved as OpenAI publishes gpt-oss: its experts MXFP4 blocks and
    scales ([experts, out, in], gate and up rows interleaved), config.json `config` (which says
    mxfp4). The model's experts become what transformers' own dequantizer (convert_moe_packed_tensors)
    makes of the blocks: the reference. split: two shards, the blocks in the second and everything
    else (their scales too) in the first, which a converter reaches first."""
    from safetensors.torch import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = mxfp4(p.transpose(1, 2).contiguous())
                tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
                p.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            else:
                tensors[name] = p.contiguous()
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    if split:
        shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.endswith("_blocks")},
                  "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.endswith("_blocks")}}
        for shard, part in shards.items():
            save_file(part, folder / shard)
        weight_map = {name: shard for shard, part in shards.items() for name in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


def test_mxfp4_experts_as_published(tmp_path):
    """Read as floats, an MXFP4 checkpoint's logits are transformers' on the dequantized experts;
    pulled, its experts become 8-bit groups of 32 that hold every MXFP4 value exactly. Its blocks
    and their scales in different shards: a pull that deletes each shard once converted keeps them
    to the end (the scales' shard comes first)."""
    from localmix.quant.convert import LocalSource, convert
    from localmix.store import read_manifest, verify

    hf = tmp_path / "hf"
    model = make_hf_model(hf, model_type="gpt_oss", sliding_window=6, num_local_experts=4, swiglu_limit=0.3)
    config = {**json.loads((hf / "config.json").read_text()), "quantization_config": MXFP4_QUANTIZATION}
    save_mxfp4(model, hf, config, split=True)
    ids = np.random.default_rng(7).integers(0, 32000, 30)
    assert_close(localmix.load(hf).logits(ids), reference_logits(model, ids), "mxfp4")

    folder = convert(LocalSource(hf, delete_shards=True), tmp_path / "q4", bits="4")
    assert not list(hf.glob("*.safetensors"))
    assert verify(folder) == []
    entries = read_manifest(folder)["tensors"]
    assert entries["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "q4"  # the rest as --bits says
    pulled = localmix.load(folder, backend="numpy").transformer.weights.layers
    for i, layer in enumerate(model.model.layers):
        gate_up, down = layer.mlp.experts.gate_up_proj.detach(), layer.mlp.experts.down_proj.detach()
        for e in range(4):
            name = f"model.layers.{i}.mlp.experts.{e}."
            assert [entries[name + f"{m}.weight"]["dtype"] for m in ("gate_proj", "up_proj", "down_proj")] == ["q8"] * 3
            assert entries[name + "gate_proj.weight"]["group_size"] == 32
            expert = pulled[i].experts[e]
            np.testing.assert_array_equal(expert.w1.dequantize(), gate_up[e, :, 0::2].T.numpy())
            np.testing.assert_array_equal(expert.w3.dequantize(), gate_up[e, :, 1::2].T.numpy())
            np.testing.assert_array_equal(expert.w2.dequantize(), down[e].T.numpy())


# openai/gpt-oss-20b's config.json, key for key (transformers 4.55's: rope_scaling and a top-level
# rope_theta, no swiglu_alpha, OpenAI's own experts_per_token and initial_context_length).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
    "pad_token_id": 199999, "quantization_config": MXFP4_QUANTIZATION, "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088}


def test_published_gpt_oss_20b_config(tmp_path):
    """gpt-oss-20b's config.json, shrunk (3 layers, windows of 5, 8 experts), with MXFP4 experts:
    the logits are those of the model transformers builds from that config."""
    config = {**GPT_OSS_20B, "hidden_size": 64, "intermediate_size": 64, "head_dim": 16, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 3, "layer_types": GPT_OSS_20B["layer_types"][:3],
              "num_local_experts": 8, "sliding_window": 5, "vocab_size": 32000, "eos_token_id": 2, "pad_token_id": 0,
              "initializer_range": 0.05}
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **{k: v for k, v in config.items() if k != "quantization_config"})).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(("bias", "sinks")):
                p.copy_(0.3 * torch.randn_like(p))
    save_mxfp4(model, tmp_path, config)
    shutil.copy(TOKENIZER_V1, tmp_path / "tokenizer.model")
    ids = np.random.default_rng(8).integers(0, 32000, 24)
    assert_close(localmix.load(tmp_path).logits(ids), reference_logits(model, ids), "gpt-oss-20b config")


def test_gpt_oss_20b_config_read_as_transformers_reads_it():
    """The full-size config: its windows, YaRN, activation and MXFP4 experts as transformers reads
    them, and as many parameters as transformers' model of it has (built on the meta device)."""
    from localmix.config import ModelArgs
    args = ModelArgs.from_hf_config(GPT_OSS_20B)
    config = transformers.GptOssConfig(**{k: v for k, v in GPT_OSS_20B.items() if k != "quantization_config"})
    assert args.layer_windows == tuple(128 if t == "sliding_attention" else None for t in config.layer_types)
    yarn, rope = args.rope_scaling, config.rope_parameters
    assert (args.rope_theta, yarn.factor, yarn.beta_fast, yarn.beta_slow, yarn.truncate,
            yarn.original_max_position_embeddings) == (rope["rope_theta"], rope["factor"], rope["beta_fast"],
                                                       rope["beta_slow"], rope["truncate"],
                                                       rope["original_max_position_embeddings"])
    inv_freq, attention_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](config)
    assert yarn.attention_factor == attention_factor
    # to an ulp: torch's float32 pow is its own (the default RoPE's table differs alike)
    np.testing.assert_allclose(localmix.model.rope_inverse_frequencies(args), inv_freq.numpy(), rtol=2.5e-7, atol=0)
    assert (args.swiglu_alpha, args.swiglu_limit) == (config.swiglu_alpha, config.swiglu_limit)
    assert args.mxfp4_experts and args.num_experts_per_tok == 4 and args.moe_intermediate_size == 2880
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(config)
    assert args.parameter_count() == sum(p.numel() for p in model.parameters()) == 20_914_757_184


@pytest.mark.parametrize("change, message", [
    (dict(layer_types=["sliding_attention"] * 23), "layer_types must list"),
    (dict(layer_types=["local"] * 24), "layer_types must list"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 32.0, "truncate": "no"}), "truncate must be true or false"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": -2.0}), "factor must be"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "unsupported rope_type 'longrope'"),
    (dict(quantization_config={"quant_method": "gptq"}), "unsupported quant_method 'gptq'"),
    (dict(swiglu_limit=0), "swiglu_limit must be"),
])
def test_gpt_oss_config_lies_are_refused(change, message):
    from localmix.config import ModelArgs
    with pytest.raises(localmix.LocalmixError, match=message):
        ModelArgs.from_hf_config({**GPT_OSS_20B, **change})
