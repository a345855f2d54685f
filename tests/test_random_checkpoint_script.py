"""scripts/make_random_checkpoint.py writes a real Hugging Face folder: transformers loads it and
computes the same logits as localmix."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import localmix
from conftest import reference_logits

SCRIPT = Path(__file__).parents[1] / "scripts" / "make_random_checkpoint.py"


@pytest.mark.parametrize("dtype, experts", [("bf16", 4), ("f16", 0), ("f32", 2)])
def test_script_checkpoint_loads_in_transformers(tmp_path, dtype, experts):
    subprocess.run([sys.executable, SCRIPT, tmp_path, "--hidden", "64", "--ffn", "96", "--layers", "2",
                    "--heads", "4", "--kv-heads", "2", "--experts", str(experts), "--top-k", "2",
                    "--dtype", dtype, "--context", "256"], check=True, capture_output=True)
    cls = transformers.MixtralForCausalLM if experts else transformers.MistralForCausalLM
    reference = cls.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, 32000, 12)
    ref = reference_logits(reference, ids)
    ours = localmix.load(tmp_path).logits(ids)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert localmix.load(tmp_path).config.is_moe == bool(experts)


TINY = {"mixtral": ["--hidden", "128", "--ffn", "256", "--layers", "2", "--heads", "4", "--kv-heads", "2"],
        "qwen3_moe": ["--family", "qwen3_moe", "--hidden", "128", "--ffn", "64", "--layers", "2", "--heads", "4",
                      "--kv-heads", "2", "--head-dim", "48", "--experts", "8", "--top-k", "3", "--vocab", "2048"]}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_random_localmix_model_is_written_straight_into_the_format(tmp_path, family):
    """scripts/make_random_localmix.py: a model that verifies, runs, and runs the same within a
    memory budget."""
    script = Path(__file__).parents[1] / "scripts" / "make_random_localmix.py"
    out = tmp_path / "random-q4"
    subprocess.run([sys.executable, script, out, *TINY[family]], check=True, capture_output=True)
    from localmix.store import read_manifest, verify
    assert verify(out) == []
    manifest = read_manifest(out)
    assert manifest["quantization"]["bits"] == "4" and len(list((out / "experts").iterdir())) == 16
    vocab = manifest["config"]["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, 8)
    resident = localmix.load(out).logits(ids)
    assert np.isfinite(resident).all() and resident.std() > 0
    from localmix.experts import fixed_memory
    model = localmix.load(out)
    memory = fixed_memory(manifest, model.config) + \
        3 * max(f["size"] for name, f in manifest["files"].items() if name.startswith("experts/"))
    budgeted = localmix.load(out, memory=memory)
    assert budgeted.expert_cache.slots == 3
    np.testing.assert_array_equal(budgeted.logits(ids), resident)


def test_random_qwen3_moe_is_qwen3_with_a_byte_level_tokenizer(tmp_path):
    """--family qwen3_moe: a config transformers reads as Qwen3-MoE with the shape asked for (head_dim
    apart from hidden / heads, q/k norms, norm_topk_prob), and a byte-level BPE tokenizer.json whose
    chat ids are transformers' and whose ids all index the embeddings."""
    script = Path(__file__).parents[1] / "scripts" / "make_random_localmix.py"
    out = tmp_path / "random-qwen3"
    subprocess.run([sys.executable, script, out, *TINY["qwen3_moe"]], check=True, capture_output=True)
    config = transformers.AutoConfig.from_pretrained(out)
    assert type(config) is transformers.Qwen3MoeConfig
    assert (config.hidden_size, config.head_dim, config.moe_intermediate_size, config.num_experts,
            config.num_experts_per_tok, config.vocab_size, config.norm_topk_prob) == (128, 48, 64, 8, 3, 2048, True)
    model = localmix.load(out)
    assert model.config.qk_norm == "head" and model.config.norm_topk_prob
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".json") == \
        ["config.json", "generation_config.json", "manifest.json", "tokenizer.json", "tokenizer_config.json"]
    reference = transformers.AutoTokenizer.from_pretrained(out)
    assert len(reference) <= 2048 and model.tokenizer.vocab_size == len(reference)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Größe? 日本語 🎉 <|im_end|>"}]
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    got = model.tokenizer.apply_chat_template(messages)
    # the user's typed <|im_end|> stays text here, where plain transformers makes it the control token
    im_end = reference.convert_tokens_to_ids("<|im_end|>")
    assert got[:want.index(im_end)] == want[:want.index(im_end)] and got.count(im_end) == 2
    assert model.tokenizer.stop_ids == {im_end, reference.convert_tokens_to_ids("<|endoftext|>")}
    assert model.tokenizer.decode(model.tokenizer.encode("Größe 日本語 🎉")) == "Größe 日本語 🎉"
    assert isinstance(model.chat(messages[1:], max_tokens=4), str)


def test_random_qwen3_moe_spreads_tokens_over_the_experts(tmp_path):
    """A trained router spreads tokens over every expert (the load-balancing loss sees to it); with
    every weight at transformers' 0.02 the random model sends every token to the same few experts
    from layer 1 on (here 13-20 of 32 experts, the busiest 7-8x the mean load), and an expert cache
    would look far better on it than on a real model."""
    script = Path(__file__).parents[1] / "scripts" / "make_random_localmix.py"
    out = tmp_path / "random-qwen3"
    subprocess.run([sys.executable, script, out, "--family", "qwen3_moe", "--hidden", "256", "--ffn", "64",
                    "--layers", "6", "--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--experts", "32",
                    "--top-k", "4", "--vocab", "2048"], check=True, capture_output=True)
    model = localmix.load(out)
    records = []
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 2048, 128)]
    list(model.stream(ids, max_tokens=1, trace=records.extend))
    assert len(records) == 128
    for layer in range(6):
        loads = np.bincount([e for r in records for e in r["layers"][layer]["experts"]], minlength=32)
        assert np.count_nonzero(loads) >= 28 and loads.max() < 3 * loads.mean(), (layer, loads)
