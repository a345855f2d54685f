"""Is one file per expert still right for models of many small experts (Qwen3-30B-A3B: 6,144 experts
of 2.6 MB at 4 bits)? Times the two layouts on the same bytes: the model's own experts/L###-E###.bin
files, and a per-layer variant built from them in a temporary folder (experts/L###.bin, expert e
at e x its 4 KiB-aligned size), read the way the expert cache reads a miss: one pread per expert
into a page-aligned slot.

    python scripts/layout_bench.py MODEL_FOLDER [--tmp DIR] [--tokens 6] [--rounds 2] [--threads 1]
                                                [--cold fadvise|drop_caches] [--keep]

Each round draws the experts a decode of --tokens tokens would read (every layer, top-k experts per
token, uniformly: a random model's router spreads them so; none twice in a round, so --tokens x
top-k must not exceed the experts per layer) and reads that sequence
from each layout, cold then warm, alternating layouts. Per layout and state: per-read latency
p50/p99 and GB/s. Per-expert reads open the file, pread and close it, as experts/reads.py does;
per-layer reads pread from the layer's file, held open (one descriptor per layer). Cold:
posix_fadvise(DONTNEED) on every file of the layout before the run (pages only: the kernel's
dentry and inode caches stay warm), or drop_caches (root: `sync; echo 3 > drop_caches`, also
inodes; every process's page cache). Also: the cost of opening every file, and inode counts.
On a virtual machine the host may cache the disk too, so cold here can be faster than a laptop's SSD.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PAGE = 4096


def align(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def expert_files(model: Path) -> tuple[dict, int, int, int]:
    """{(layer, expert): path} of the model's routed experts, layers, experts per layer, top-k."""
    config = json.loads((model / "config.json").read_text())
    experts = config.get("num_experts") or config["num_local_experts"]
    files = {}
    for path in (model / "experts").iterdir():
        layer, expert = path.stem.removeprefix("L").split("-E")
        files[int(layer), int(expert)] = path
    layers = sorted({layer for layer, _ in files})
    assert len(files) == len(layers) * experts, "every layer must have all its experts"
    return files, len(layers), experts, config["num_experts_per_tok"]


def build_per_layer(files: dict, layers: int, experts: int, out: Path) -> tuple[Path, int, float]:
    """experts/L###.bin per layer, expert e at e x stride (its size, 4 KiB-aligned). Returns the
    folder, stride and seconds taken."""
    stride = align(max(p.stat().st_size for p in files.values()))
    folder = out / "experts"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for layer in range(layers):
        target = folder / f"L{layer:03d}.bin"
        with open(target, "wb") as f:
            f.truncate(stride * experts)
            for expert in range(experts):
                with open(files[layer, expert], "rb") as src:
                    size = os.fstat(src.fileno()).st_size
                    done = 0
                    while done < size:
                        done += os.copy_file_range(src.fileno(), f.fileno(), size - done, done,
                                                   expert * stride + done)
        print(f"\rper-layer copy: {layer + 1}/{layers} layers", end="", file=sys.stderr, flush=True)
    os.sync()
    print(file=sys.stderr)
    return folder, stride, time.perf_counter() - start


def drop(paths: list[Path], how: str) -> None:
    if how == "drop_caches":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def pread_full(fd: int, view: memoryview, offset: int, pool) -> int:
    """Read len(view) bytes at offset, split in as many page-aligned pieces as the pool has threads
    (as reads.read_parallel splits a miss among the kernels' threads)."""
    size = len(view)
    parts = pool._max_workers if pool else 1
    step = align(-(-size // parts))

    def piece(start: int) -> int:
        end, got = min(size, start + step), 0
        while start + got < end:
            n = os.preadv(fd, [view[start + got:end]], offset + start + got)
            if n <= 0:
                break
            got += n
        return got

    starts = range(0, size, step)
    return sum(pool.map(piece, starts)) if pool and parts > 1 else sum(map(piece, starts))


def read_per_expert(sequence, files, size: int, view, pool) -> list[float]:
    times = []
    for key in sequence:
        start = time.perf_counter()
        fd = os.open(files[key], os.O_RDONLY)
        try:
            got = pread_full(fd, view[:size], 0, pool)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - start)
        assert got == size
    return times


def read_per_layer(sequence, fds: list[int], stride: int, size: int, view, pool) -> list[float]:
    times = []
    for layer, expert in sequence:
        start = time.perf_counter()
        got = pread_full(fds[layer], view[:size], expert * stride, pool)
        times.append(time.perf_counter() - start)
        assert got == size
    return times


def summary(times: list[float], size: int) -> dict:
    ms = sorted(t * 1e3 for t in times)
    return {"reads": len(ms), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
            "mean_ms": round(statistics.fmean(ms), 3), "gb_s": round(len(ms) * size / sum(times) / 1e9, 3)}


def open_cost(paths: list[Path]) -> float:
    """Seconds to open, fstat and close every file."""
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fstat(fd)
        os.close(fd)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--tmp", type=Path, help="where the per-layer variant is built (default: beside the model)")
    p.add_argument("--tokens", type=int, default=6, help="decode steps' worth of expert reads per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads splitting each read (the cache's miss: all)")
    p.add_argument("--cold", choices=["fadvise", "drop_caches"], default="fadvise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the per-layer variant (and reuse one kept before)")
    a = p.parse_args()

    files, layers, experts, top_k = expert_files(a.model)
    if a.tokens * top_k > experts:
        sys.exit(f"error: --tokens x top-k ({a.tokens * top_k}) is more than the {experts} experts per layer")
    size = max(path.stat().st_size for path in files.values())
    tmp = Path(tempfile.mkdtemp(prefix="layout-bench.", dir=a.tmp or a.model.parent)) if not a.keep else \
        (a.tmp or a.model.parent) / f"{a.model.name}.per-layer"
    report = {"model": str(a.model), "layers": layers, "experts_per_layer": experts, "top_k": top_k,
              "expert_bytes": size, "threads": a.threads, "cold": a.cold}
    try:
        if a.keep and (tmp / "experts" / f"L{layers - 1:03d}.bin").is_file():
            folder, stride = tmp / "experts", align(size)
        else:
            folder, stride, seconds = build_per_layer(files, layers, experts, tmp)
            report["per_layer_build_s"] = round(seconds, 1)
        layer_paths = [folder / f"L{layer:03d}.bin" for layer in range(layers)]
        expert_paths = list(files.values())
        report["files"] = {"per_expert": len(expert_paths), "per_layer": len(layer_paths)}
        report["open_fstat_close_all_warm_s"] = {"per_expert": round(open_cost(expert_paths), 4),
                                                 "per_layer": round(open_cost(layer_paths), 4)}
        start = time.perf_counter()
        sorted(os.scandir(a.model / "experts"), key=lambda e: e.name)
        report["list_experts_folder_s"] = {"per_expert": round(time.perf_counter() - start, 4)}

        buffer = mmap.mmap(-1, align(size))  # page-aligned, like a slot
        view = memoryview(buffer)
        pool = ThreadPoolExecutor(a.threads) if a.threads > 1 else None
        rng = np.random.default_rng(a.seed)
        results = {f"{layout}_{state}": [] for layout in ("per_expert", "per_layer") for state in ("cold", "warm")}
        for round_ in range(a.rounds):
            # no expert twice in a round, so that a cold read is never served by an earlier one
            drawn = [rng.permutation(experts)[:a.tokens * top_k].reshape(a.tokens, top_k) for _ in range(layers)]
            sequence = [(layer, int(e)) for t in range(a.tokens) for layer in range(layers) for e in drawn[layer][t]]
            order = ("per_expert", "per_layer") if round_ % 2 == 0 else ("per_layer", "per_expert")
            for layout in order:
                if layout == "per_expert":
                    drop(expert_paths, a.cold)
                    run = lambda: read_per_expert(sequence, files, size, view, pool)  # noqa: E731
                else:
                    drop(layer_paths, a.cold)
                    fds = [os.open(path, os.O_RDONLY) for path in layer_paths]
                    run = lambda: read_per_layer(sequence, fds, stride, size, view, pool)  # noqa: E731
                if layout == "per_expert" and a.cold == "drop_caches":
                    report.setdefault("open_fstat_close_all_cold_s", []).append(round(open_cost(expert_paths), 4))
                    drop(expert_paths, a.cold)
                for state in ("cold", "warm"):
                    times = run()
                    results[f"{layout}_{state}"] += times
                    print(f"round {round_ + 1} {layout} {state}: {summary(times, size)}", file=sys.stderr, flush=True)
                if layout == "per_layer":
                    for fd in fds:
                        os.close(fd)
        report["reads"] = {key: summary(times, size) for key, times in results.items()}
        for state in ("cold", "warm"):
            e, l = report["reads"][f"per_expert_{state}"], report["reads"][f"per_layer_{state}"]
            report[f"per_layer_gain_{state}"] = round(l["gb_s"] / e["gb_s"] - 1, 3)
        print(json.dumps(report, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
