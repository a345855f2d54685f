"""Where a decoded token's time goes: the kernels' share against the Python between them.

    python scripts/profile_decode.py NAME [--tokens 40]

Wraps the backend's operations and the matrix kernel with timers, prefills 128 tokens, decodes,
and prints milliseconds per token for each (the nested ones overlap: the kernel runs inside
experts_ffn and linears) and the weight bytes the kernels stream per second.
"""

import argparse
import collections
import time

import numpy as np

import localmix
from localmix import bench, kernels, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    llm = localmix.load(args.name)
    spent = collections.Counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    ops = llm.transformer.ops
    for name in ("rms_norm", "route_tokens", "apply_rope", "attend", "linears", "experts_ffn"):
        setattr(ops, name, staticmethod(timed(name, getattr(ops, name))))
    model.attention = timed("attention block", model.attention)
    model.moe_block = timed("experts block", model.moe_block)
    kernels._vector_matmul = timed("matrix kernel", kernels._vector_matmul)

    cache = llm.transformer.new_cache(128 + args.tokens + 4)
    logits = llm.transformer(bench.bench_prompt(128, llm.config.vocab_size), cache, last_only=True)
    for _ in range(3):
        logits = llm.transformer([int(np.argmax(logits[-1]))], cache, last_only=True)
    spent.clear()
    start = time.perf_counter()
    for _ in range(args.tokens):
        logits = llm.transformer([int(np.argmax(logits[-1]))], cache, last_only=True)
    per_token = (time.perf_counter() - start) / args.tokens
    print(f"{1 / per_token:.1f} tok/s, {per_token * 1e3:.2f} ms per token")
    for name, seconds in spent.most_common():
        print(f"  {name:16s} {seconds / args.tokens * 1e3:6.2f} ms")
    kernel_s = spent["matrix kernel"] / args.tokens
    print(f"the matrix kernel streams {bench.bytes_per_token(llm) / kernel_s / 1e9:.1f} GB/s of weights; "
          f"{100 * (1 - kernel_s / per_token):.0f}% of the time is elsewhere")


if __name__ == "__main__":
    main()
