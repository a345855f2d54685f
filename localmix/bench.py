"""`localmix bench`: prompt processing and generation speed, measured the way the peers' script
(../shared/peers/llama_speed.py) measures llama.cpp, so the two can be compared in one run: the
same synthetic prompt, one timed prefill, then greedy decoding one token at a time."""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from localmix.errors import LocalmixError
from localmix.generate import peak_memory_gb
from localmix.store import nbytes
from localmix.threads import physical_cores


def bench_prompt(length: int, vocab_size: int, sequence: int = 0) -> list[int]:
    """llama_speed.py's prompt: BOS, then a fixed spread of ordinary token ids; for concurrent
    sequences after the first, other ids (the same prompt would send every sequence to the same
    experts, so that batching them would read no more weights than one)."""
    span = min(31000, vocab_size - 501)
    return [1] + [((i + 104729 * sequence) * 7919) % span + 500 for i in range(length - 1)]


def bytes_per_token(model) -> int:
    """Weight bytes one decoded token must read: every dense matrix, one embedding row, and in
    each layer its MLP, or the experts it is routed to (the model's experts per token) and its
    shared expert."""
    w, args = model.transformer.weights, model.config
    total = nbytes(w.lm_head) + nbytes(w.norm) + nbytes(w.embed) // args.vocab_size
    for layer in w.layers:
        dense = [layer.attention_norm, layer.wq, layer.wk, layer.wv, layer.wo, layer.ffn_norm, layer.router,
                 layer.bq, layer.bk, layer.bv, layer.bo, layer.q_norm, layer.k_norm, layer.shared_expert_gate]
        if layer.shared_expert is not None:
            dense += [layer.shared_expert.w1, layer.shared_expert.w2, layer.shared_expert.w3]
        total += sum(nbytes(m) for m in dense if m is not None)
        total += layer.experts.expert_bytes() * (args.num_experts_per_tok if layer.router is not None else 1)
    return total


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to forget the cached pages of the model's files (posix_fadvise DONTNEED), so
    that the next reads come from the disk. Pages the process has mapped stay."""
    for path in Path(folder).rglob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


MOST_COUNTS = 16  # values in one -p or -n list: each is a run of its own


def parse_counts(text: str, option: str) -> list[int]:
    """A comma-separated list of token counts, as llama-bench takes `-p 128,512`: digits only (no
    sign, no underscore, no empty item), each at least 1, at most MOST_COUNTS of them."""
    items = text.split(",")
    if not all(re.fullmatch(r"[0-9]{1,9}", item.strip()) for item in items):
        raise LocalmixError(f"{option} takes token counts separated by commas (e.g. 128,512), not {text!r}")
    if len(items) > MOST_COUNTS:
        raise LocalmixError(f"{option} takes at most {MOST_COUNTS} counts, not {len(items)}")
    counts = [int(item) for item in items]
    if min(counts) < 1:
        raise LocalmixError(f"{option} counts must be at least 1, not {min(counts)}")
    return counts


def check(model, prompt_tokens: int, gen_tokens: int, repeat: int = 1, concurrency: int = 1) -> None:
    """The checks run() makes, for a caller that runs several sizes to make them all before the first."""
    if prompt_tokens < 1 or gen_tokens < 1 or repeat < 1 or concurrency < 1:
        raise LocalmixError("-p, -n, --repeat and --concurrency must be at least 1")
    if prompt_tokens + gen_tokens > model.config.max_position_embeddings:
        raise LocalmixError(f"-p plus -n ({prompt_tokens} + {gen_tokens}) exceed the model's context of "
                            f"{model.config.max_position_embeddings}")


def kernels_used(backend: str) -> str:
    """What ran the model's products, for the bench table: on the numba backend the kernels this CPU
    and LOCALMIX_KERNELS chose; other backends by name."""
    if backend == "numba":
        from localmix import kernels  # numba: not for `bench --membw`
        return kernels.kernel_name()
    return "numpy (reference)" if backend == "numpy" else backend


def run(model, prompt_tokens: int = 128, gen_tokens: int = 64, repeat: int = 1, cold: bool = False,
        concurrency: int = 1) -> dict:
    """Speeds, peak RSS, and with an expert cache its figures while decoding. cold: drop the model
    files' pages from the page cache before each run. concurrency: decode that many sequences
    together (as the server batches concurrent answers); decode_tok_s is then their sum."""
    check(model, prompt_tokens, gen_tokens, repeat, concurrency)
    prompts = [bench_prompt(prompt_tokens, model.config.vocab_size, i) for i in range(concurrency)]
    prefill, decode = [], []
    experts = model.expert_cache
    used_before = dict(model.tuner.used)  # the tuner counts over its life: earlier sizes' rows too
    decoding = Counter()  # the expert cache's counters while decoding, summed over the runs
    # Warm up as llama_speed.py does (8 prompt tokens, then start again): the first touch of each
    # memory-mapped weight page is paid here, not in the timed prefill.
    model.transformer(prompts[0][:8], model.transformer.new_cache(8), last_only=True)
    for _ in range(repeat):
        if cold:
            drop_page_cache(model.path)
        caches = [model.transformer.new_cache(prompt_tokens + gen_tokens) for _ in range(concurrency)]
        start = time.perf_counter()
        logits = np.concatenate([model.transformer(prompt, cache, last_only=True)
                                 for prompt, cache in zip(prompts, caches)])
        prefill.append((time.perf_counter() - start) / concurrency)
        before, start = experts.counters() if experts else {}, time.perf_counter()
        model.tuner.start()  # threads chosen per token as Model.stream chooses them
        for _ in range(gen_tokens):
            token_start = time.perf_counter()
            logits = model.transformer.step([int(t) for t in np.argmax(logits, axis=1)], caches)
            model.tuner.record(time.perf_counter() - token_start)
        decode.append(time.perf_counter() - start)
        if experts:
            decoding.update({key: value - before[key] for key, value in experts.counters().items()})
    decode_tok_s = concurrency * gen_tokens / float(np.mean(decode))
    disk = {}
    if experts:  # the limit the disk sets: its read speed over the bytes each decoded token read
        gb_s = experts.read_bandwidth()
        per_token = decoding["expert_bytes_read"] / (repeat * concurrency * gen_tokens)
        disk = {"disk_gb_s": gb_s, "disk_limit_tok_s": gb_s * 1e9 / per_token if per_token else None}
    return {**(experts.stats(dict(decoding)) if experts else {}), **disk, "cold": cold,
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeat": repeat, "threads": model.threads,
        # decoded tokens (all this call's runs) with each thread count
        "tokens_per_thread_count": {n: used - used_before.get(n, 0) for n, used in model.tuner.used.items()},
        "concurrency": concurrency,
        "prefill_tok_s": prompt_tokens / float(np.mean(prefill)),
        "decode_tok_s": decode_tok_s,
        "decode_gb_s": bytes_per_token(model) * decode_tok_s / concurrency / 1e9,  # weights read per step
        "peak_rss_mb": peak_memory_gb() * 1e3,
        "ttft_s": float(np.mean(prefill)),
    }


def memory_bandwidth(threads: int | None = None) -> float:
    """Sustained read bandwidth in GB/s: the faster of two reads of a 1 GiB array, one slice per
    thread: numpy's max over float32 (as the peers' membw.py) and an OR over it as uint64. Either
    alone under-reads on some CPUs: on a 2-vCPU Zen 5, max gave 43.5 GB/s with two threads where
    the OR gave 51.4 (and one decoded token's products alone streamed 46-50), the OR 33.5 with one
    thread where max gave 36.5."""
    threads = threads or physical_cores()
    data = np.ones(1 << 28, np.float32)
    reads = [(np.max, np.array_split(data, threads)),
             (np.bitwise_or.reduce, np.array_split(data.view(np.uint64), threads))]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for read, parts in reads:
            list(pool.map(read, parts))
            best = min(best, *(_timed(lambda: list(pool.map(read, parts))) for _ in range(5)))
    return data.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
