"""Decode speed on a busy laptop: localmix and llama.cpp, each quiet and beside one busy process.

    python scripts/busy_bench.py LOCALMIX_MODEL GGUF PEERS_PYTHON [--rounds 3] [-n 128]

LOCALMIX_MODEL and GGUF hold the same weights (the peers' mini model: `localmix pull mini --bits 4`
and `../shared/peers/hf2gguf.py mini mini-Q4_0.gguf --quant Q4_0`). PEERS_PYTHON is the python of
the venv where llama-cpp-python is built as ../shared/peers/README.md says. Each row is a fresh
process; the busy process (`python -c "while True: pass"`, one core's worth) is started before the
row and killed after it. Rows alternate within each round, so a slow moment of the machine hits
every row; the table gives each row's figures over the rounds and the ratio of the medians to
localmix's quiet one-thread decode (the bar the issue sets: busy default >= 0.8 of it).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"


def localmix(model: str, tokens: int, threads: int | None) -> float:
    cmd = [sys.executable, "-m", "localmix", "bench", model, "-p", "16", "-n", str(tokens), "--json"]
    cmd += ["--threads", str(threads)] if threads else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["decode_tok_s"]


def llama(peers_python: str, gguf: str, tokens: int, threads: int) -> float:
    out = subprocess.run([peers_python, str(PEERS / "llama_speed.py"), gguf, "16", str(tokens), str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return float(re.search(r"decode ([\d.]+) tok/s", out).group(1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model"), p.add_argument("gguf"), p.add_argument("peers_python")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-n", "--tokens", type=int, default=128)
    a = p.parse_args()
    rows = {  # name -> (busy, measure)
        "localmix, 1 thread, quiet": (False, lambda: localmix(a.model, a.tokens, 1)),
        "localmix, default threads, quiet": (False, lambda: localmix(a.model, a.tokens, None)),
        "localmix, default threads, busy": (True, lambda: localmix(a.model, a.tokens, None)),
        "localmix, 1 thread, busy": (True, lambda: localmix(a.model, a.tokens, 1)),
        "llama.cpp Q4_0, 1 thread, quiet": (False, lambda: llama(a.peers_python, a.gguf, a.tokens, 1)),
        "llama.cpp Q4_0, 2 threads, quiet": (False, lambda: llama(a.peers_python, a.gguf, a.tokens, 2)),
        "llama.cpp Q4_0, 2 threads, busy": (True, lambda: llama(a.peers_python, a.gguf, a.tokens, 2)),
        "llama.cpp Q4_0, 1 thread, busy": (True, lambda: llama(a.peers_python, a.gguf, a.tokens, 1)),
    }
    results = {name: [] for name in rows}
    for r in range(a.rounds):
        for name, (busy, measure) in rows.items():
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                results[name].append(measure())
            finally:
                if burner:
                    burner.kill()
                    burner.wait()
            print(f"round {r + 1}: {name}: {results[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    bar = statistics.median(results["localmix, 1 thread, quiet"])
    print("| decode tok/s | rounds | median | vs localmix 1 thread quiet |\n|---|---|---|---|")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {median:.1f} | {median / bar:.2f} |")


if __name__ == "__main__":
    main()
