"""What quantizing the activations costs: the logits of a quantized model with its activations
rounded to int8 (llama.cpp's choice, blocks of 32) or int16 (localmix's kernels) before every
quantized product, against the exact product, on the same weights.

    python scripts/activation_precision.py NAME [--text scripts/data/prose.txt]

Runs the numpy reference path, so it shows the rounding alone, not any kernel's arithmetic.
"""

import argparse
from pathlib import Path

import numpy as np

import localmix
from localmix import store
from localmix.quality import kl_divergence


def rounded(x: np.ndarray, levels: int) -> np.ndarray:
    blocks = x.reshape(x.shape[0], -1, 32)
    step = np.abs(blocks).max(axis=-1, keepdims=True) / levels
    step[step == 0] = 1
    return (np.round(blocks / step) * step).reshape(x.shape).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--text", type=Path, default=Path(__file__).parent / "data" / "prose.txt")
    args = parser.parse_args()
    llm = localmix.load(args.name, backend="numpy")
    ids = llm.tokenizer.encode(args.text.read_text(), bos=True)
    exact = llm.logits(ids)
    product = store.QuantizedMatrix.linear
    for name, levels in (("int8", 127), ("int16", 32767)):
        store.QuantizedMatrix.linear = lambda self, x, levels=levels: product(self, rounded(x, levels))
        ours = llm.logits(ids)
        print(f"{name} activations: logits move by {np.abs(ours - exact).max() / np.abs(exact).max():.1e} of "
              f"the largest, KL {kl_divergence(exact, ours):.5f}, top-1 agreement "
              f"{(ours.argmax(-1) == exact.argmax(-1)).mean():.3f} over {len(ids)} tokens")
    store.QuantizedMatrix.linear = product


if __name__ == "__main__":
    main()
