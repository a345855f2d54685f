"""Decode and prefill speed, localmix against llama.cpp, on the peers' random "mini" Mixtral
(1.5 B parameters, 16 layers, 8 experts top-2), same machine, same threads, in one run: the command
that makes README's Speed table.

    python scripts/speed_vs_llama.py WORKDIR PEERS_PYTHON [--prompts 128,512] [-n 64] [--threads 2]
        [--kernels default,avx2] [--repeat 3]

PEERS_PYTHON: the python of a venv set up as ../shared/peers/README.md says (llama-cpp-python built
with everything the CPU has that runs: on AVX-512 machines the flags in that README, without AMX).
The first run builds the checkpoint, the GGUF files and the localmix models in WORKDIR (about 20
minutes on 2 cores); later runs only measure (a few minutes per round).

Each round measures the memory read bandwidth for each thread count, then for each quantization
llama.cpp and localmix in turn (localmix once per --kernels setting: `avx2` runs it with
LOCALMIX_KERNELS=avx2, what a CPU with AVX2 alone would run), so that a slow moment of the machine
hits both programs; the table gives each figure's median over the rounds. Prefill is timed for each
prompt length (a run of its own, as llama.cpp's), decode for -n greedy tokens after the first one.
Above the table: this command, the CPU and its flags, the kernels localmix chose and llama.cpp's
own system line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

PEERS = Path(__file__).resolve().parents[2] / "shared" / "peers"
PAIRS = [("Q4_0", "mini-q4", "4"), ("Q8_0", "mini-q8", "8")]  # llama.cpp's quantization, localmix's model, bits
KERNELS = {"default": "", "avx2-vnni": " (256-bit kernels)", "avx2": " (AVX2 kernels only)",
           "plain": " (plain Numba kernels)"}  # -> row label
FLAGS = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]


def run(cmd: list, env: dict | None = None, **kwargs) -> str:
    setting = f"LOCALMIX_KERNELS={env['LOCALMIX_KERNELS']} " if env and "LOCALMIX_KERNELS" in env else ""
    shown = setting + " ".join(map(str, cmd))
    print("$", shown, file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shown}\n{done.stderr[-2000:]}")
    return done.stdout


def localmix_env(kernels: str = "default") -> dict:
    """The environment of a localmix process for a --kernels setting. NUMBA_CACHE_DIR is left to
    localmix, which names the compiled kernels' folder by LOCALMIX_KERNELS too: a folder shared by
    two settings would hand one setting the other's cached kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCALMIX_KERNELS", "NUMBA_CACHE_DIR")}
    return env if kernels == "default" else {**env, "LOCALMIX_KERNELS": kernels}


def localmix(*args: str, kernels: str = "default") -> str:
    return run([sys.executable, "-m", "localmix", *args], env=localmix_env(kernels))


def counts(text: str) -> list[int]:
    """128,512 -> [128, 512] (argparse's type), each once. Not localmix.bench.parse_counts: importing
    localmix here would make its kernels' cache folder under the default LOCALMIX_HOME (main points
    it at WORKDIR later) and put NUMBA_CACHE_DIR into the peers' processes' environment."""
    if not re.fullmatch(r"[1-9][0-9]{0,8}(,[1-9][0-9]{0,8})*", text) or len(set(text.split(","))) < text.count(",") + 1:
        raise argparse.ArgumentTypeError(f"different counts of at least 1 separated by commas (e.g. 128,512), "
                                         f"not {text!r}")
    return [int(item) for item in text.split(",")]


def kernel_settings(text: str) -> list[str]:
    settings = text.split(",")
    if not settings or any(s not in KERNELS for s in settings) or len(set(settings)) < len(settings):
        raise argparse.ArgumentTypeError(f"settings from {', '.join(KERNELS)} separated by commas, not {text!r}")
    return settings


def prepare(work: Path, peers_python: str) -> None:
    if not (work / "mini" / "config.json").exists():
        run([peers_python, PEERS / "make_hf_mixtral.py", "mini", "--hidden", "1024", "--ffn", "3584", "--layers",
             "16", "--heads", "16", "--kv-heads", "4"], cwd=work)
    for quant, name, bits in PAIRS:
        if not (work / f"mini-{quant}.gguf").exists():
            run([peers_python, PEERS / "hf2gguf.py", "mini", f"mini-{quant}.gguf", "--quant", quant], cwd=work)
        if not (work / "home" / "models" / name).exists():
            localmix("pull", str(work / "mini"), "--bits", bits, "--name", name)


def llama_figures(work: Path, peers_python: str, quant: str, prompts: list[int], tokens: int, threads: int) -> dict:
    """One round of llama.cpp: a process per prompt length (llama_speed.py takes one); decode after the first."""
    prefill, decode = {}, None
    for p in prompts:
        out = run([peers_python, PEERS / "llama_speed.py", f"mini-{quant}.gguf", str(p), str(tokens), str(threads)],
                  cwd=work)
        found = re.search(r"prefill ([\d.]+) tok/s\s+decode ([\d.]+) tok/s", out)
        if found is None:
            raise SystemExit(f"llama_speed.py printed no figures: {out!r}")
        prefill[p] = float(found.group(1))
        decode = float(found.group(2)) if decode is None else decode
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "decode_gb_s": None}


def localmix_figures(name: str, prompts: list[int], tokens: int, threads: int, kernels: str) -> dict:
    """One round of localmix: one process, a bench row (its own run) per prompt length; decode after the first."""
    out = localmix("bench", name, "-p", ",".join(map(str, prompts)), "-n", str(tokens), "--threads", str(threads),
                   "--json", kernels=kernels)
    rows = [json.loads(line) for line in out.strip().splitlines()[-len(prompts):]]
    first = rows[0]
    return {"prefill_tok_s": {r["prompt_tokens"]: r["prefill_tok_s"] for r in rows},
            "decode_tok_s": first["decode_tok_s"], "decode_gb_s": first["decode_gb_s"]}


def label(quant: str, kernels: str | None) -> str:
    if kernels is None:
        return f"llama.cpp {quant}"
    bits = next(bits for q, _name, bits in PAIRS if q == quant)
    return f"localmix {bits}-bit{KERNELS[kernels]}"


def speed_table(runs: dict, bandwidth: dict, prompts: list[int]) -> str:
    """The markdown table. runs: (threads, quant, kernels) -> the rounds' figures, kernels None for
    llama.cpp, each round {"prefill_tok_s": {prompt length: tok/s}, "decode_tok_s": x, "decode_gb_s":
    x, or None for llama.cpp}; rows in the order of runs. bandwidth: threads -> GB/s. Each figure is
    the median over the rounds; ratios are localmix's median over llama.cpp's of the same threads and
    quantization."""
    head = ["model", "threads", *(f"prefill {p} tok/s" for p in prompts), "decode tok/s",
            "decode GB/s (% of bandwidth)", *(f"vs llama.cpp prefill {p}" for p in prompts), "vs llama.cpp decode"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def medians(key) -> tuple[dict, float]:
        figures = runs[key]
        return ({p: statistics.median(f["prefill_tok_s"][p] for f in figures) for p in prompts},
                statistics.median(f["decode_tok_s"] for f in figures))

    for key, figures in runs.items():
        threads, quant, kernels = key
        prefill, decode = medians(key)
        if kernels is None:
            # llama.cpp reads the same weights at about the same bits per weight: its GB/s at
            # localmix's bytes per token (decode_gb_s / decode_tok_s), marked as an estimate.
            ours = [f for (t, q, k), fs in runs.items() if (t, q) == (threads, quant) and k is not None for f in fs]
            gb_s = ours[0]["decode_gb_s"] / ours[0]["decode_tok_s"] * decode if ours else None
            traffic = f"~{gb_s:.1f} ({100 * gb_s / bandwidth[threads]:.0f}%)" if gb_s else ""
            ratios = [""] * (len(prompts) + 1)
        else:
            gb_s = statistics.median(f["decode_gb_s"] for f in figures)
            traffic = f"{gb_s:.1f} ({100 * gb_s / bandwidth[threads]:.0f}%)"
            peer_prefill, peer_decode = medians((threads, quant, None))
            ratios = [f"{prefill[p] / peer_prefill[p]:.2f}x" for p in prompts] + [f"{decode / peer_decode:.2f}x"]
        cells = [label(quant, kernels), str(threads), *(f"{prefill[p]:.1f}" for p in prompts), f"{decode:.1f}",
                 traffic, *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_summary(cpuinfo: str, cpus: int | None) -> str:
    """The CPU's model (from /proc/cpuinfo's text) and which of FLAGS it lists: listed is not
    usable (whether AMX works is tried: see system_lines)."""
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    listed = set(flags.group(1).split()) if flags else set()
    return (f"CPU: {model.group(1).strip() if model else 'unknown'}, {cpus} logical CPUs; flags listed: "
            f"{' '.join(f for f in FLAGS if f in listed) or 'none'}; not listed: "
            f"{' '.join(f for f in FLAGS if f not in listed) or 'none'}")


def system_lines(peers_python: str, settings: list[str]) -> list[str]:
    """What ran: the CPU, llama.cpp's build (its own system line), the kernels localmix chose per setting."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    try:
        info = subprocess.run([peers_python, "-c", "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"],
                              capture_output=True, text=True)
        llama = info.stdout.strip() if info.returncode == 0 else f"unavailable ({info.stderr.strip()[-200:]})"
    except OSError as e:
        llama = f"unavailable ({e})"
    chosen = {}
    for s in settings:
        out = run([sys.executable, "-c", "from localmix.bench import kernels_used; print(kernels_used('numba'))"],
                  env=localmix_env(s))
        chosen[s] = out.strip()
    amx = run([sys.executable, "-c", "from localmix.kernels import amx_usable; print(amx_usable())"],
              env=localmix_env()).strip()
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    return [cpu_summary(cpuinfo, os.cpu_count()), f"llama.cpp system info: {llama}",
            "localmix kernels: " + ", ".join(f"{s} -> {name}" for s, name in chosen.items())
            + f"; AMX tiles work here (asked for, tried): {amx}; commit {commit}"]


def record(runs: dict, key: tuple, round_: int, figures: dict) -> None:
    runs.setdefault(key, []).append(figures)
    print(f"round {round_ + 1}: {label(*key[1:])}, {key[0]} threads: {figures}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("peers_python")
    parser.add_argument("--prompts", type=counts, default=[128, 512], help="prompt lengths (default 128,512)")
    parser.add_argument("-n", "--tokens", type=int, default=64, help="greedy tokens decoded (default 64)")
    parser.add_argument("--threads", type=counts, default=[2], help="thread counts, e.g. 1,2 (default 2)")
    parser.add_argument("--kernels", type=kernel_settings, default=["default", "avx2"],
                        help="localmix's kernels: default, avx2 (LOCALMIX_KERNELS=avx2), plain (default default,avx2)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    if args.tokens < 1 or args.repeat < 1:
        parser.error("-n and --repeat must be at least 1")
    command = shlex.join(["python", *sys.argv])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LOCALMIX_HOME"] = str(work / "home")
    prepare(work, args.peers_python)
    system = system_lines(args.peers_python, args.kernels)

    # Untimed: each setting's kernels compiled (or loaded) into its cache, each file paged in.
    for kernels in args.kernels:
        for _quant, name, _bits in PAIRS:
            localmix("bench", name, "-p", "8", "-n", "2", kernels=kernels)

    runs: dict[tuple, list[dict]] = {}
    membw: dict[int, list[float]] = {t: [] for t in args.threads}
    for round_ in range(args.repeat):
        for threads in args.threads:
            membw[threads].append(json.loads(localmix("bench", "--membw", "--threads", str(threads),
                                                      "--json"))["membw_gb_s"])
            for quant, name, _bits in PAIRS:
                record(runs, (threads, quant, None), round_,
                       llama_figures(work, args.peers_python, quant, args.prompts, args.tokens, threads))
                for kernels in args.kernels:
                    record(runs, (threads, quant, kernels), round_,
                           localmix_figures(name, args.prompts, args.tokens, threads, kernels))

    bandwidth = {t: statistics.median(values) for t, values in membw.items()}
    print(f"\n{command}\n")
    print("\n".join(system))
    print("memory read bandwidth: " + ", ".join(f"{gb_s:.1f} GB/s with {t} thread{'s' * (t > 1)}"
                                                 for t, gb_s in bandwidth.items()))
    print(f"medians of {args.repeat} alternating rounds; prefill of {', '.join(map(str, args.prompts))}-token "
          f"prompts; decode of {args.tokens} greedy tokens after the {args.prompts[0]}-token prompt\n")
    print(speed_table(runs, bandwidth, args.prompts))


if __name__ == "__main__":
    main()
