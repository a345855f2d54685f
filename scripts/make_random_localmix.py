"""Write a random Mixtral straight into the localmix format (4-bit, as `localmix pull --bits 4`
lays it out), with no float copy: packed words are drawn as random integers, so a model of
Mixtral 8x7B's real shape (about 26 GB) is written in minutes with little memory.

    python scripts/make_random_localmix.py OUT [--hidden 4096 --ffn 14336 --layers 32 --heads 32
                                                --kv-heads 8 --experts 8 --vocab 32000]

Defaults are Mixtral 8x7B's shape. Weights come out uniform in about +-0.035 (standard deviation
0.02, as transformers initializes them), norms are ones, routers normal; the tokenizer is the real
Mixtral one from mistral-common. Load it by folder (`localmix run OUT ...`) or move it under
$LOCALMIX_HOME/models.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from localmix.checkpoint import tensor_table
from localmix.config import ModelArgs
from localmix.quant.convert import bits_policy, check_disk, write_model
from localmix.store import plan_layout, sha256_of
from make_random_checkpoint import tokenizer_file  # beside this script

SPREAD = 0.035       # weights uniform in [-SPREAD, SPREAD)
BLOCK = 64 << 20     # bytes drawn at a time


def mixtral_config(a) -> dict:
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": a.hidden,
            "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "num_local_experts": a.experts, "num_experts_per_tok": 2,
            "vocab_size": a.vocab, "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
            "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def fill(fd: int, offset: int, size: int, draw) -> None:
    for start in range(0, size, BLOCK):
        n = min(BLOCK, size - start)
        os.pwrite(fd, draw(n).tobytes(), offset + start)


def write_tensors(tmp: Path, layouts, rng) -> dict:
    entries = {}
    fds = {}
    try:
        for i, layout in enumerate(layouts):
            if layout.file not in fds:
                fds[layout.file] = os.open(tmp / layout.file, os.O_WRONLY)
            fd = fds[layout.file]
            if layout.bits is None:  # norms: ones; routers: normal
                values = np.ones(layout.shape, np.float32) if len(layout.shape) == 1 else \
                    rng.standard_normal(layout.shape, np.float32) * np.float32(0.02)
                os.pwrite(fd, values.tobytes(), layout.offset)
            else:
                levels = (1 << layout.bits) - 1
                scale, bias = np.float16(2 * SPREAD / levels), np.float16(-SPREAD)
                (_, w_off, w_size), (_, s_off, s_size), (_, b_off, b_size) = layout.parts
                fill(fd, w_off, w_size, lambda n: rng.integers(0, 256, n, dtype=np.uint8))
                fill(fd, s_off, s_size, lambda n: np.full(n // 2, scale, np.float16))
                fill(fd, b_off, b_size, lambda n: np.full(n // 2, bias, np.float16))
            entries[layout.name] = layout.to_json(sha256_of(tmp / layout.file, layout.offset, layout.nbytes))
            print(f"\r{i + 1}/{len(layouts)} tensors", end="", file=sys.stderr, flush=True)
    finally:
        for fd in fds.values():
            os.close(fd)
    print(file=sys.stderr)
    return dict(sorted(entries.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    for name, default in (("hidden", 4096), ("ffn", 14336), ("layers", 32), ("heads", 32), ("kv-heads", 8),
                          ("experts", 8), ("vocab", 32000), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    a = parser.parse_args()
    tokenizer = tokenizer_file(None)
    config = mixtral_config(a)
    args = ModelArgs.from_hf_config(config)
    layouts, sizes = plan_layout(tensor_table(args), bits_policy("4", args), 64, args)
    if a.out.exists():
        sys.exit(f"error: {a.out} already exists")
    check_disk(a.out.parent, sum(sizes.values()))
    print(f"writing {sum(sizes.values()) / 1e9:.1f} GB to {a.out}", file=sys.stderr)
    rng = np.random.default_rng(a.seed)
    write_model(a.out, sizes, lambda tmp: write_tensors(tmp, layouts, rng), tokenizer, config,
                {"repo": "random (scripts/make_random_localmix.py)", "revision": None},
                {"bits": "4", "group_size": 64, "method": "random"})


if __name__ == "__main__":
    main()
