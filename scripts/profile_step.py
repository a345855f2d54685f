"""Where a decoding step of several sequences goes (the server's batched answers).

    python scripts/profile_step.py NAME [--streams 1,2,4] [--steps 32]

For each number of streams, prefills that many different prompts (bench's), then times steps of
Transformer.step, one token of each sequence per step, and prints per step: the milliseconds in
each fused decode kernel (summed over the layers), the different experts a layer's step runs,
the expert weights that makes it read and the rate at which the experts' kernel read them. When
that rate falls as streams are added, the experts' products (1 to 4 rows each) are bound by
arithmetic, not by memory.
"""

import argparse
import time
from collections import defaultdict

import numpy as np

import localmix
from localmix import bench, kernels
from localmix.store import read_manifest

TIMED = ("decode_qkv", "decode_attention", "attend", "attention_out", "route_tokens", "decode_experts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--steps", type=int, default=32)
    a = parser.parse_args()
    llm = localmix.load(a.name)
    t = llm.transformer
    spent, experts = defaultdict(float), []
    for name in TIMED:  # wrap the kernels that backends.NumbaOps calls while decoding
        def timed(*args, _kernel=getattr(kernels, name), _name=name):
            start = time.perf_counter()
            result = _kernel(*args)
            spent[_name] += time.perf_counter() - start
            if _name == "decode_experts":
                experts.append(args[3].size)  # decode_experts(h, chosen, weights, experts, ...)
            return result
        setattr(kernels, name, timed)
    sizes = [f["size"] for n, f in read_manifest(llm.path)["files"].items() if n.startswith("experts/")]
    expert_bytes = float(np.mean(sizes))
    layers = llm.config.num_hidden_layers
    print(f"{'streams':>7} {'step ms':>8} {'tok/s':>7} " + " ".join(f"{n:>16}" for n in TIMED) +
          f" {'experts/layer':>13} {'expert GB/step':>14} {'experts GB/s':>12}")
    for streams in map(int, a.streams.split(",")):
        caches = [t.new_cache(64 + a.steps + 8) for _ in range(streams)]
        logits = np.concatenate([t(bench.bench_prompt(64, llm.config.vocab_size, i), cache, last_only=True)
                                 for i, cache in enumerate(caches)])
        for _ in range(3):
            logits = t.step([int(x) for x in np.argmax(logits, axis=1)], caches)
        spent.clear()
        experts.clear()
        start = time.perf_counter()
        for _ in range(a.steps):
            logits = t.step([int(x) for x in np.argmax(logits, axis=1)], caches)
        step = (time.perf_counter() - start) / a.steps
        per_layer = sum(experts) / (a.steps * layers)
        read = per_layer * layers * expert_bytes
        print(f"{streams:7} {step * 1e3:8.2f} {streams / step:7.1f} " +
              " ".join(f"{spent[n] / a.steps * 1e3:16.2f}" for n in TIMED) +
              f" {per_layer:13.2f} {read / 1e9:14.3f} {read / (spent['decode_experts'] / a.steps) / 1e9:12.1f}")


if __name__ == "__main__":
    main()
