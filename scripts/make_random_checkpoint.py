"""Write a random Mixtral (or dense Mistral) checkpoint in Hugging Face layout, with numpy alone:
config.json, safetensors shards with the real tensor names, and the real Mixtral tokenizer that
mistral-common ships (pip install mistral-common), or one you name.

Its answers are gibberish, but every part of localmix runs on it exactly as on a real model, so it
serves for trying the CLI, demos and benchmarks without a download.

    python scripts/make_random_checkpoint.py OUT [--hidden 256 --ffn 512 --layers 4 --heads 8
        --kv-heads 2 --experts 8 --top-k 2 --dtype bf16]
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def tokenizer_file(path: str | None) -> Path:
    if path:
        return Path(path)
    try:
        import mistral_common
    except ImportError:
        raise SystemExit("error: no tokenizer: pip install mistral-common, or pass --tokenizer FILE") from None
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8, help="0 for a dense Mistral")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="a sentencepiece tokenizer.model (default: mistral-common's v1)")
    a = p.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    head_dim = a.hidden // a.heads

    def matrix(rows, cols, std=0.02):
        w = rng.standard_normal((rows, cols), dtype=np.float32) * std
        return w * np.exp(0.3 * rng.standard_normal((rows, 1), dtype=np.float32))  # rows of unequal range

    def norm():
        return 1 + 0.1 * rng.standard_normal(a.hidden, dtype=np.float32)

    def stored(w):
        if a.dtype == "f32":
            return w
        if a.dtype == "f16":
            return w.astype(np.float16)
        # bf16: keep the high 16 bits (rounded to nearest even), stored as uint16 and relabelled below
        bits = w.astype(np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)

    moe = a.experts > 0
    config = {
        "architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
        "model_type": "mixtral" if moe else "mistral", "hidden_act": "silu",
        "hidden_size": a.hidden, "intermediate_size": a.ffn, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": head_dim,
        "vocab_size": a.vocab, "max_position_embeddings": a.context, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[a.dtype],
    }
    if moe:
        config.update(num_local_experts=a.experts, num_experts_per_tok=a.top_k)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer_file(a.tokenizer), out / "tokenizer.model")

    weight_map = {}

    def write_shard(index: int, tensors: dict) -> None:
        name = f"model-{index:05d}.safetensors"
        path = out / name
        save_file({k: stored(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        if a.dtype == "bf16":  # safetensors.numpy has no bf16: relabel the U16 entries in the header
            raw = path.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + n])
            for key, info in header.items():
                if key != "__metadata__":
                    info["dtype"] = "BF16"
            text = json.dumps(header).encode()
            text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned
            path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
        weight_map.update({k: name for k in tensors})

    write_shard(0, {"model.embed_tokens.weight": matrix(a.vocab, a.hidden, 1.0),
                    "model.norm.weight": norm(), "lm_head.weight": matrix(a.vocab, a.hidden, 0.05)})
    for layer in range(a.layers):
        p_ = f"model.layers.{layer}."
        t = {p_ + "input_layernorm.weight": norm(), p_ + "post_attention_layernorm.weight": norm(),
             p_ + "self_attn.q_proj.weight": matrix(a.heads * head_dim, a.hidden),
             p_ + "self_attn.k_proj.weight": matrix(a.kv_heads * head_dim, a.hidden),
             p_ + "self_attn.v_proj.weight": matrix(a.kv_heads * head_dim, a.hidden),
             p_ + "self_attn.o_proj.weight": matrix(a.hidden, a.heads * head_dim, 0.005)}
        if moe:
            t[p_ + "block_sparse_moe.gate.weight"] = matrix(a.experts, a.hidden, 0.03)
            for e in range(a.experts):
                q = f"{p_}block_sparse_moe.experts.{e}."
                t[q + "w1.weight"], t[q + "w3.weight"] = matrix(a.ffn, a.hidden), matrix(a.ffn, a.hidden)
                t[q + "w2.weight"] = matrix(a.hidden, a.ffn, 0.005)
        else:
            t[p_ + "mlp.gate_proj.weight"], t[p_ + "mlp.up_proj.weight"] = matrix(a.ffn, a.hidden), matrix(a.ffn, a.hidden)
            t[p_ + "mlp.down_proj.weight"] = matrix(a.hidden, a.ffn, 0.005)
        write_shard(layer + 1, t)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    print(f"wrote {out}: {a.layers} layers, {'%d experts' % a.experts if moe else 'dense'}, {a.dtype}")


if __name__ == "__main__":
    main()
