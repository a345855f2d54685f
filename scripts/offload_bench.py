"""The expert cache against the fully resident model, in one run: decode speed, hit rates, reads,
waits and peak RSS for each cache policy, with and without prefetch, warm and cold page cache.

    python scripts/offload_bench.py NAME [--experts 0.5] [-p 32] [-n 64] [--repeat 3]

The budget is the one that holds the dense weights and the given fraction of the experts
(`--experts 0.5`: half of them). Each configuration is a fresh `localmix bench` process, so each
peak RSS is its own. "cold": the model's files are dropped from the page cache (posix_fadvise
DONTNEED) before each timed run, so reads come from the disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from localmix.config import ModelArgs
from localmix.experts import fixed_memory
from localmix.home import resolve_model
from localmix.store import read_manifest


def budget_for(folder, fraction: float) -> tuple[int, int, int]:
    """(--memory in bytes, slots it gives, experts in all)."""
    manifest = read_manifest(folder)
    args = ModelArgs.from_hf_config(manifest["config"])
    sizes = [f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")]
    slots = int(round(fraction * len(sizes)))
    return fixed_memory(manifest, args) + slots * max(sizes), slots, len(sizes)


def bench(name: str, extra: list[str], p: int, n: int, repeat: int) -> dict:
    command = [sys.executable, "-m", "localmix", "bench", name, "-p", str(p), "-n", str(n), "--repeat", str(repeat),
               "--json", *extra]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{' '.join(command)}: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--experts", type=float, default=0.5, help="fraction of the experts the budget holds")
    parser.add_argument("-p", type=int, default=32)
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--policies", default="lru,lfu,pinned")
    a = parser.parse_args()
    memory, slots, experts = budget_for(resolve_model(a.name), a.experts)
    print(f"budget --memory {memory} ({memory / 1e6:.0f} MB): {slots} of {experts} experts in slots")
    resident = bench(a.name, [], a.p, a.n, a.repeat)
    rows = [("resident", resident)]
    for policy in a.policies.split(","):
        for prefetch in ("--prefetch", "--no-prefetch"):
            for cold in ([], ["--cold"]):
                label = f"{policy} {prefetch[2:]}{' cold' if cold else ' warm'}"
                rows.append((label, bench(a.name, ["--memory", str(memory), "--policy", policy, prefetch, *cold],
                                          a.p, a.n, a.repeat)))
    print(f"{'':24} {'decode tok/s':>12} {'vs resident':>11} {'hit rate':>8} {'prefetch hits':>13} "
          f"{'read GB/token':>13} {'stalled s/token':>15} {'peak RSS MB':>11}")
    for label, r in rows:
        tokens = a.n * a.repeat
        cache = (f"{r['expert_hit_rate']:8.2f} {r['prefetch_hit_rate']:13.2f} "
                 f"{r['expert_bytes_read'] / tokens / 1e9:13.3f} {r['stall_s'] / tokens:15.4f}"
                 if "expert_hit_rate" in r else f"{'':8} {'':13} {'':13} {'':15}")
        print(f"{label:24} {r['decode_tok_s']:12.2f} {r['decode_tok_s'] / resident['decode_tok_s']:11.2f} {cache} "
              f"{r['peak_rss_mb']:11.0f}")
    print(f"peak RSS allowed: budget + 300 MB = {(memory + 300e6) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
