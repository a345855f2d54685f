"""Write a random Mixtral or Qwen3-MoE straight into the localmix format (4-bit, as `localmix pull
--bits 4` lays it out, or another of pull's --bits), with no float copy: packed words are drawn as
random integers, so a model of Mixtral 8x7B's real shape (about 26 GB) or Qwen3-30B-A3B's (about 17 GB, 6,144 experts) is written
in minutes, one tensor block at a time, with little memory.

    python scripts/make_random_localmix.py OUT [--family mixtral|qwen3_moe] [--bits 4|8|mixed|3|2]
        [--hidden H --ffn F --layers L --heads N --kv-heads K --head-dim D --experts E --top-k k --vocab V]

Each family's defaults are its real shape: mixtral is Mixtral 8x7B (--ffn is each expert's width),
qwen3_moe is Qwen3-30B-A3B (hidden 2048, 48 layers, 32 heads of 128, 4 KV heads, 128 experts of
768, top-8, norm_topk_prob, q/k norms, vocabulary 151936). Weights come out uniform in about
+-0.035 (standard deviation 0.02, as transformers initializes them; for qwen3_moe larger embeddings
and a smaller output projection, so that tokens spread over the experts as in a trained model, see
SPREADS), norms are ones, routers normal. The tokenizer: Mixtral's real one from mistral-common;
for qwen3_moe a byte-level BPE tokenizer.json trained here with the `tokenizers` library on a small
text (about 650 ids, all below the vocabulary; <|endoftext|>, <|im_start|> and <|im_end|> as
special tokens) with a ChatML chat template, as Qwen ships them. Load it by folder (`localmix run OUT ...`) or move it
under $LOCALMIX_HOME/models.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from localmix.checkpoint import tensor_table
from localmix.config import ModelArgs
from localmix.quant.convert import BITS_CHOICES, bits_policy, check_disk, write_model
from localmix.store import DENSE_FILE, plan_layout, sha256_of
from localmix.tokenizer import SENTENCEPIECE
from make_random_checkpoint import tokenizer_file  # beside this script

SPREAD = 0.035       # weights uniform in [-SPREAD, SPREAD): standard deviation 0.02
# Per family, the spread of the tensors that differ from SPREAD. qwen3_moe: with every weight at
# 0.02 (transformers' initialization), what the attention adds to the residual stream (about an
# average over the tokens before) swamps each token's own embedding, layer after layer, and every
# token goes to the same few experts (17-48 of 128 per layer in 1,000 tokens, one expert 15x the
# mean load): an expert cache would hit 97%. Embeddings of standard deviation 1 and an output
# projection 8x smaller spread the routing as a trained router does (every expert used, the busiest
# under 2x the mean load), so that benches within a budget read what a real model would. Mixtral
# keeps its earlier weights (the benches already published were taken on them).
SPREADS = {"mixtral": {}, "qwen3_moe": {"model.embed_tokens.weight": 1.73, "o_proj.weight": SPREAD / 8}}
BLOCK = 64 << 20     # bytes drawn at a time

# Each family's real shape: Mixtral 8x7B, Qwen3-30B-A3B. ffn: each routed expert's width.
SHAPES = {
    "mixtral": dict(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, head_dim=None, experts=8, top_k=2,
                    vocab=32000),
    "qwen3_moe": dict(hidden=2048, ffn=768, layers=48, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8,
                      vocab=151936),
}

# The text the qwen3_moe tokenizer is trained on: a little of several scripts, code and numbers,
# so that what people type encodes in a few ids (every byte encodes in any case).
CORPUS = """The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few
of its many feed-forward networks, so that a large model reads only a small part of its weights
for every token. Experts that are not used stay on disk until they are needed.
Hello! How are you today? I'm fine, thanks. What's the weather like in Paris, London and Tokyo?
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

print(fibonacci(10))  # 55
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2026-12-01 12:30.
Größe, naïve café, déjà vu. Ça coûte 12,50 €. ¿Qué tal? Привет, как дела? Γειά σου κόσμε.
日本語のテキストです。中文文本很好。한국어 텍스트입니다。 مرحبا بالعالم 🎉🚀
"""
# Qwen2's pre-tokenizer pattern (Qwen3's tokenizer.json has it too)
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<think>", "</think>"]  # Qwen3's reasoning markers: added tokens, not special ones
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if not (message.role == 'system' and loop.first) %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")
TOKENIZER_VOCAB = 1000  # trained ids, bytes included; the special and added tokens come after


def mixtral_config(a) -> dict:
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": a.hidden,
            "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "num_local_experts": a.experts,
            "num_experts_per_tok": a.top_k, "vocab_size": a.vocab, "max_position_embeddings": 32768,
            "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2}


def qwen3_moe_config(a, bos: int, eos: int) -> dict:
    """Qwen3-30B-A3B's config.json with the shape of `a`; bos and eos: the tokenizer's
    <|endoftext|> and <|im_end|> (151643 and 151645 in the real one)."""
    return {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": a.hidden,
            "intermediate_size": 8 * a.ffn, "moe_intermediate_size": a.ffn, "num_hidden_layers": a.layers,
            "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim,
            "num_experts": a.experts, "num_experts_per_tok": a.top_k, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": a.vocab,
            "max_position_embeddings": 40960, "rope_theta": 1e6, "rope_scaling": None, "rms_norm_eps": 1e-6,
            "attention_bias": False, "hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
            "tie_word_embeddings": False, "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "bfloat16"}


def byte_level_tokenizer(folder: Path) -> dict[str, Path]:
    """A Qwen-style tokenizer written into folder: tokenizer.json (byte-level BPE trained on
    CORPUS), tokenizer_config.json (special tokens, ChatML template) and generation_config.json
    (stop ids). Returns the files by name, as tokenizer.tokenizer_files names them."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS.splitlines(keepends=True),
                            trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in ADDED])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "clean_up_tokenization_spaces": False,
              "model_max_length": 131072, "chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    stops = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}, indent=2))
    return {name: folder / name for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")}


def fill(fd: int, offset: int, size: int, draw) -> None:
    for start in range(0, size, BLOCK):
        n = min(BLOCK, size - start)
        os.pwrite(fd, draw(n).tobytes(), offset + start)


def write_tensors(tmp: Path, layouts, rng, spreads: dict[str, float]) -> dict:
    """Every tensor in table order. Open are the dense file and the expert file being written
    (an expert's three matrices come one after the other): a model of 6,144 expert files would
    otherwise hold as many descriptors. spreads: tensor name endings whose spread is not SPREAD."""
    entries = {}
    fds = {}
    try:
        for i, layout in enumerate(layouts):
            if layout.file not in fds:
                for file in [f for f in fds if f != DENSE_FILE]:
                    os.close(fds.pop(file))
                fds[layout.file] = os.open(tmp / layout.file, os.O_WRONLY)
            fd = fds[layout.file]
            if layout.bits is None:  # norms: ones; routers: normal
                values = np.ones(layout.shape, np.float32) if len(layout.shape) == 1 else \
                    rng.standard_normal(layout.shape, np.float32) * np.float32(0.02)
                os.pwrite(fd, values.tobytes(), layout.offset)
            else:
                levels = (1 << layout.bits) - 1
                spread = next((v for k, v in spreads.items() if layout.name.endswith(k)), SPREAD)
                scale, bias = np.float16(2 * spread / levels), np.float16(-spread)
                (_, w_off, w_size), (_, s_off, s_size), (_, b_off, b_size) = layout.parts
                fill(fd, w_off, w_size, lambda n: rng.integers(0, 256, n, dtype=np.uint8))
                fill(fd, s_off, s_size, lambda n: np.full(n // 2, scale, np.float16))
                fill(fd, b_off, b_size, lambda n: np.full(n // 2, bias, np.float16))
            entries[layout.name] = layout.to_json(sha256_of(tmp / layout.file, layout.offset, layout.nbytes))
            if i % 64 == 0 or i + 1 == len(layouts):
                print(f"\r{i + 1}/{len(layouts)} tensors", end="", file=sys.stderr, flush=True)
    finally:
        for fd in fds.values():
            os.close(fd)
    print(file=sys.stderr)
    return dict(sorted(entries.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=sorted(SHAPES), default="mixtral",
                        help="the architecture; its real shape is the default (mixtral: 8x7B, qwen3_moe: 30B-A3B)")
    for name in ("hidden", "ffn", "layers", "heads", "kv-heads", "head-dim", "experts", "top-k", "vocab"):
        parser.add_argument(f"--{name}", type=int, help="default: the family's real shape")
    parser.add_argument("--bits", choices=BITS_CHOICES, default="4",
                        help="the stored formats, as `localmix pull --bits` chooses them (3, 2: experts at 3 or 2 bits)")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    shape = dict(SHAPES[a.family])
    if a.family == "mixtral" or a.hidden is not None or a.heads is not None:
        shape["head_dim"] = None  # hidden / heads, as for Mixtral, unless --head-dim says otherwise
    for key, value in shape.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.head_dim is None:
        a.head_dim = a.hidden // a.heads
    if a.family == "mixtral" and a.head_dim != a.hidden // a.heads:
        sys.exit("error: Mixtral's head_dim is hidden / heads")
    if a.out.exists():
        sys.exit(f"error: {a.out} already exists")

    with tempfile.TemporaryDirectory() as tokenizer_dir:
        if a.family == "mixtral":
            tokenizer = {SENTENCEPIECE: tokenizer_file(None)}
            config = mixtral_config(a)
        else:
            tokenizer = byte_level_tokenizer(Path(tokenizer_dir))
            ids = json.loads(tokenizer["tokenizer.json"].read_text())["added_tokens"]
            ids = {t["content"]: t["id"] for t in ids}
            config = qwen3_moe_config(a, ids["<|endoftext|>"], ids["<|im_end|>"])
        args = ModelArgs.from_hf_config(config)
        layouts, sizes = plan_layout(tensor_table(args), bits_policy(a.bits, args), 64, args)
        check_disk(a.out.parent, sum(sizes.values()))
        print(f"writing {sum(sizes.values()) / 1e9:.1f} GB in {len(sizes)} files to {a.out}", file=sys.stderr)
        rng = np.random.default_rng(a.seed)
        write_model(a.out, sizes, lambda tmp: write_tensors(tmp, layouts, rng, SPREADS[a.family]), tokenizer, config,
                    {"repo": "random (scripts/make_random_localmix.py)", "revision": None},
                    {"bits": a.bits, "group_size": 64, "method": "random"})


if __name__ == "__main__":
    main()
