"""How close decoding comes to the matrix kernels alone.

    python scripts/profile_decode.py NAME [--tokens 40]

Decodes after a 128-token prompt, then runs just the products one decoded token needs (every
layer's q, k, v and output projection, two experts' w1, w3 and w2, the output head) through
the kernels, back to back, and prints both rates with the memory bandwidth: the gap between them
is the time spent outside the products (attention, norms, routing, quantizing activations,
starting threads, Python).
"""

import argparse
import time

import numpy as np

import localmix
from localmix import bench, kernels
from localmix.kernels import Job


def decode_seconds(llm, tokens: int) -> float:
    cache = llm.transformer.new_cache(128 + tokens + 4)
    logits = llm.transformer(bench.bench_prompt(128, llm.config.vocab_size), cache, last_only=True)
    for _ in range(3):
        logits = llm.transformer([int(np.argmax(logits[-1]))], cache, last_only=True)
    start = time.perf_counter()
    for _ in range(tokens):
        logits = llm.transformer([int(np.argmax(logits[-1]))], cache, last_only=True)
    return (time.perf_counter() - start) / tokens


def products_seconds(llm, tokens: int) -> float:
    """One token's products (the first two experts of every layer), as the decoder batches them."""
    w = llm.transformer.weights
    rng = np.random.default_rng(0)
    steps = []
    for layer in w.layers:
        experts = layer.experts[:2]
        steps.append([layer.wq, layer.wk, layer.wv])
        steps.append([layer.wo])
        steps.append([m for e in experts for m in (e.w1, e.w3)])
        steps.append([e.w2 for e in experts])
    steps.append([w.lm_head])
    inputs = [kernels.quantize_activations(rng.standard_normal((1, ms[0].shape[1])).astype(np.float32),
                                           ms[0].bits, ms[0].group_size) for ms in steps]
    outputs = [np.empty((1, sum(m.shape[0] for m in ms)), np.float32) for ms in steps]
    jobs = [[Job(m, 0, 1, 0, int(col)) for m, col in zip(ms, np.cumsum([0] + [m.shape[0] for m in ms]))]
            for ms in steps]
    best = float("inf")
    for _ in range(max(3, tokens // 8)):
        start = time.perf_counter()
        for x, batch, out in zip(inputs, jobs, outputs):
            kernels.matmul_batch(x, batch, out)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    llm = localmix.load(args.name)
    per_token = decode_seconds(llm, args.tokens)
    products = products_seconds(llm, args.tokens)
    weights = bench.bytes_per_token(llm)
    bandwidth = bench.memory_bandwidth()
    print(f"memory read bandwidth {bandwidth:.1f} GB/s; {weights / 1e6:.0f} MB of weights per token")
    print(f"decoding:          {1 / per_token:6.1f} tok/s, {per_token * 1e3:6.2f} ms a token, "
          f"{weights / per_token / 1e9:5.1f} GB/s ({100 * weights / per_token / 1e9 / bandwidth:.0f}%)")
    print(f"the products only: {1 / products:6.1f} tok/s, {products * 1e3:6.2f} ms a token, "
          f"{weights / products / 1e9:5.1f} GB/s ({100 * weights / products / 1e9 / bandwidth:.0f}%)")


if __name__ == "__main__":
    main()
