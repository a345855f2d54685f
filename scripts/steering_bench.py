"""What each routing approximation costs and buys: KL divergence from exact routing, and decode
speed, on the same text, in one run.

    python scripts/steering_bench.py NAME [--memory 12GB] [--file scripts/data/prose.txt]
        [--prompt 16] [--tokens 64] [--thresholds 0.25,0.4] [--margins 0.05,0.15] [--shadow-bits 2]

Each configuration loads the model afresh (an empty expert cache), processes the first --prompt
tokens of the text as a prompt, then feeds the next --tokens tokens of the text one at a time
(teacher forcing: every configuration sees the same tokens, so their next-token distributions
can be compared position by position). Decode tok/s is over those one-token steps. Fallback
margins and shadow copies apply under --memory only; shadow copies take their memory from the
same budget (fewer slots). The first line also measures what collecting the routing
statistics costs: the share of the exact run's decoding spent in LayerRouting.__call__ and in
counting the decoded tokens' choices when the statistics are read.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import localmix
from localmix import routing
from localmix.quality import kl_divergence, top1_agreement


def run(name: str, ids: list[int], prompt: int, **settings) -> dict:
    model = localmix.load(name, **settings)
    t = model.transformer
    cache = t.new_cache(len(ids))
    t(ids[:prompt], cache, last_only=True)
    before = t.routing.snapshot()
    counters = model.expert_cache.counters() if model.expert_cache else None
    logits, start = [], time.perf_counter()
    for token in ids[prompt:-1]:
        logits.append(t([token], cache, last_only=True)[0])
    seconds = time.perf_counter() - start
    stats = routing.summary(t.routing.since(before))
    result = {"logits": np.array(logits), "tok_s": len(logits) / seconds, "seconds": seconds,
              "experts_per_token": float(stats["experts_per_token"].mean())}
    if counters:
        s = model.expert_cache.stats({k: v - counters[k] for k, v in model.expert_cache.counters().items()})
        result.update(hit_rate=s["expert_hit_rate"], read_gb=s["expert_bytes_read"] / 1e9, stall_s=s["stall_s"],
                      slots=s["expert_slots"], shadow_uses=s["shadow_uses"])
    return result


def routing_share(name: str, memory, ids: list[int], prompt: int) -> float:
    """The share of decoding time spent counting (and, off here, steering) the routes."""
    spent = [0.0]
    original = routing.LayerRouting.__call__

    def timed(self, *args):
        start = time.perf_counter()
        try:
            return original(self, *args)
        finally:
            spent[0] += time.perf_counter() - start

    routing.LayerRouting.__call__ = timed
    try:
        model = localmix.load(name, memory=memory)
        cache = model.transformer.new_cache(len(ids))
        model.transformer(ids[:prompt], cache, last_only=True)
        spent[0] = 0.0
        start = time.perf_counter()
        for token in ids[prompt:-1]:
            model.transformer([token], cache, last_only=True)
        counted = time.perf_counter()
        model.transformer.routing.snapshot()  # decoded tokens are counted when the statistics are read
        spent[0] += time.perf_counter() - counted
        return spent[0] / (time.perf_counter() - start)
    finally:
        routing.LayerRouting.__call__ = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--memory")
    parser.add_argument("--file", default="scripts/data/prose.txt")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--thresholds", default="0.25,0.4")
    parser.add_argument("--margins", default="0.05,0.15")
    parser.add_argument("--shadow-bits", type=int, default=2, help="0: leave the shadow copies' row out")
    parser.add_argument("--shadow-memory", help="the shadow copies' row's budget (default --memory); exact "
                                                "routing is measured at it too, for the same memory")
    a = parser.parse_args()
    tokenizer = localmix.load(a.name, memory=a.memory).tokenizer
    ids = tokenizer.encode(open(a.file).read(), bos=True)[:a.prompt + a.tokens + 1]
    share = routing_share(a.name, a.memory, ids, a.prompt)
    print(f"routing statistics: {100 * share:.2f}% of decoding time (LayerRouting.__call__, exact routing)")
    configs = [("exact", {})]
    configs += [(f"adaptive, min weight {t}", {"min_expert_weight": float(t)}) for t in a.thresholds.split(",") if t]
    if a.memory:
        configs += [(f"fallback, margin {m}", {"fallback_margin": float(m)}) for m in a.margins.split(",") if m]
        if a.shadow_bits:
            memory = a.shadow_memory or a.memory
            if memory != a.memory:
                configs.append((f"exact, --memory {memory}", {"memory": memory}))
            configs.append((f"{a.shadow_bits}-bit shadows, --memory {memory}",
                            {"shadow_bits": a.shadow_bits, "memory": memory}))
    exact = None
    print(f"{'':36} {'decode tok/s':>12} {'KL vs exact':>11} {'top-1 agree':>11} {'experts/token':>13} "
          f"{'hit rate':>8} {'read GB':>8} {'stalled s':>9} {'slots':>5} {'shadow uses':>11}")
    for label, steering in configs:
        try:
            r = run(a.name, ids, a.prompt, **{"memory": a.memory, **steering})
        except localmix.LocalmixError as e:  # shadow copies that do not fit the budget
            print(f"{label:36} {e}")
            continue
        exact = exact or r
        cache = (f"{r['hit_rate']:8.2f} {r['read_gb']:8.2f} {r['stall_s']:9.2f} {r['slots']:5} {r['shadow_uses']:11}"
                 if "hit_rate" in r else "")
        print(f"{label:36} {r['tok_s']:12.2f} {kl_divergence(exact['logits'], r['logits']):11.5f} "
              f"{top1_agreement(exact['logits'], r['logits']):11.3f} {r['experts_per_token']:13.2f} {cache}", flush=True)


if __name__ == "__main__":
    main()
