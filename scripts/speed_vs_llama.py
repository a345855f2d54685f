"""Decode and prefill speed, localmix against llama.cpp, on the peers' random "mini" Mixtral
(1.5 B parameters, 16 layers, 8 experts top-2), same machine, same threads, in one run.

    python scripts/speed_vs_llama.py WORKDIR PEERS_PYTHON [--repeat 3] [--threads 2]

PEERS_PYTHON: the python of a venv set up as ../shared/peers/README.md says (llama-cpp-python,
transformers, gguf; see scripts/quality_vs_llama.sh for the build flags that work on CPUs with
AVX-512). The first run builds the checkpoint, the GGUF files and the localmix models in WORKDIR
(about 20 minutes on 2 cores); later runs only measure (a few minutes). Runs alternate between
the two programs, and the table shows each figure's median over the repeats, so that a slow
moment of the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
PAIRS = [("Q4_0", "mini-q4", "4"), ("Q8_0", "mini-q8", "8")]


def run(cmd: list[str], **kwargs) -> str:
    print("$", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout


def localmix(*args: str) -> str:
    return run([sys.executable, "-m", "localmix", *args])


def prepare(work: Path, peers_python: str) -> None:
    if not (work / "mini" / "config.json").exists():
        run([peers_python, PEERS / "make_hf_mixtral.py", "mini", "--hidden", "1024", "--ffn", "3584", "--layers",
             "16", "--heads", "16", "--kv-heads", "4"], cwd=work)
    for quant, name, bits in PAIRS:
        if not (work / f"mini-{quant}.gguf").exists():
            run([peers_python, PEERS / "hf2gguf.py", "mini", f"mini-{quant}.gguf", "--quant", quant], cwd=work)
        if not (work / "home" / "models" / name).exists():
            localmix("pull", str(work / "mini"), "--bits", bits, "--name", name)


def llama_speed(work: Path, peers_python: str, quant: str, threads: int) -> dict:
    out = run([peers_python, PEERS / "llama_speed.py", f"mini-{quant}.gguf", "128", "64", str(threads)], cwd=work)
    prefill, decode = re.search(r"prefill ([\d.]+) tok/s\s+decode ([\d.]+) tok/s", out).groups()
    return {"prefill_tok_s": float(prefill), "decode_tok_s": float(decode)}


def localmix_speed(name: str, threads: int) -> dict:
    return json.loads(localmix("bench", name, "-p", "128", "-n", "64", "--threads", str(threads),
                               "--json").strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("peers_python")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LOCALMIX_HOME"] = str(work / "home")
    prepare(work, args.peers_python)

    runs: dict[str, list[dict]] = {}
    membw = []
    for _ in range(args.repeat):
        membw.append(json.loads(localmix("bench", "--membw", "--threads", str(args.threads), "--json"))["membw_gb_s"])
        for quant, name, _bits in PAIRS:
            runs.setdefault(quant, []).append(llama_speed(work, args.peers_python, quant, args.threads))
            runs.setdefault(name, []).append(localmix_speed(name, args.threads))

    def median(name, key):
        return statistics.median(r[key] for r in runs[name])

    bandwidth = statistics.median(membw)
    print(f"\nmemory read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads); "
          f"medians of {args.repeat} alternating runs; prompt 128 tokens, 64 generated\n")
    print("| model | prefill tok/s | decode tok/s | decode GB/s (% of bandwidth) | vs llama.cpp prefill | vs llama.cpp decode |")
    print("|---|---|---|---|---|---|")
    for quant, name, _bits in PAIRS:
        # llama.cpp's figure at localmix's bytes per token: the same weights at the same bits per weight
        bytes_per_token = median(name, "decode_gb_s") / median(name, "decode_tok_s")
        llama_gb_s = bytes_per_token * median(quant, "decode_tok_s")
        print(f"| llama.cpp {quant} | {median(quant, 'prefill_tok_s'):.1f} | {median(quant, 'decode_tok_s'):.1f} | "
              f"~{llama_gb_s:.1f} ({100 * llama_gb_s / bandwidth:.0f}%) | | |")
        gb_s = median(name, "decode_gb_s")
        print(f"| localmix {name} | {median(name, 'prefill_tok_s'):.1f} | {median(name, 'decode_tok_s'):.1f} | "
              f"{gb_s:.1f} ({100 * gb_s / bandwidth:.0f}%) | "
              f"{median(name, 'prefill_tok_s') / median(quant, 'prefill_tok_s'):.2f}x | "
              f"{median(name, 'decode_tok_s') / median(quant, 'decode_tok_s'):.2f}x |")


if __name__ == "__main__":
    main()
