"""The CPU cost of grammar-constrained JSON in three libraries: llguidance (what localmix uses),
xgrammar and outlines-core, on the same vocabularies and JSON schemas.

Setup (a scratch venv, so the project's own stays as it is; xgrammar pulls in torch):

    python3 -m venv /tmp/grammar-venv
    /tmp/grammar-venv/bin/pip install xgrammar outlines-core llguidance numpy sentencepiece

Run from the repository root:

    /tmp/grammar-venv/bin/python scripts/grammar_libraries.py [--threads 1 default] [--vocabs ...]
        [--libraries ...] [--masks 200] [--data DIR]

Vocabularies, read as the bytes each token stands for and given to all three libraries alike:
  spm-32k      Mistral's sentencepiece model tokenizer.model.v1 (32,000 ids, 3 control tokens)
  tekken-151k  mistral_common's tekken_240911.json: 1,000 control ids, then all 150,000 byte tokens
both from the mistral_common package's data folder (--data; by default the one in .venv).

Schemas: "person" (bounded strings, integer range, enum array), "object" (any JSON object),
"tool" (a tool call: a constant name, a nested arguments object with an enum). Every grammar is
compact: no whitespace between JSON tokens.

What each run measures, each library and vocabulary in a process of its own (ru_maxrss is a high
water mark), with RAYON_NUM_THREADS=OMP_NUM_THREADS=1 and xgrammar's max_threads=1 for "--threads 1",
the libraries' defaults otherwise:
  vocab s      building the library's tokenizer from the token bytes
  compile ms   schema to what an answer starts from (llguidance: the grammar text; xgrammar: a
               CompiledGrammar; outlines-core: the regex and its Index over the vocabulary), first
               time and again (only xgrammar caches; the others do the work again)
  start ms     a matcher for one answer from that (llguidance parses its grammar here)
  mask us      a token's mask, written into a numpy int32 bitmask: the first, then median and p90
               over walks of up to 200 tokens; each step takes the argmax of seeded random logits
               among the allowed tokens (the same logits for every library), one step in 8 among
               the allowed tokens holding '"' (in a string) or ']' or '}' (elsewhere), so that
               walks end; a walk ends at EOS, and walks with new seeds follow until --masks masks
               are timed
  rss MB       the process's peak RSS growth after the library's import, and the RSS at import
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3}},
        "required": ["name", "age", "pets"], "additionalProperties": False},
    "object": {"type": "object"},
    "tool": {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {
            "location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["location", "unit"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False},
}
VOCABS = ("spm-32k", "tekken-151k")
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")
WALK_LIMIT = 200  # tokens in one walk
CLOSE_EVERY = 8
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/mistral_common/data"


def load_vocab(name: str, data: Path) -> tuple[list[bytes], list[int], int]:
    """Each token's bytes (b"" for control tokens), the control tokens' ids, and EOS."""
    if name == "spm-32k":
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(data / "tokenizer.model.v1"))
        tokens, special = [], []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                tokens.append(b"")
                special.append(i)
            elif sp.is_byte(i):  # <0xAB>
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode())
        return tokens, special, sp.eos_id()
    if name == "tekken-151k":
        tekken = json.loads((data / "tekken_240911.json").read_text())
        controls = tekken["config"]["default_num_special_tokens"]
        tokens = [b""] * controls + [base64.b64decode(t["token_bytes"]) for t in tekken["vocab"]]
        return tokens, list(range(controls)), 2  # </s>, as in mistral_common's Tekkenizer
    raise ValueError(name)


class Llguidance:
    def __init__(self, tokens: list[bytes], special: list[int], eos: int, single_thread: bool):
        import llguidance
        import llguidance.numpy

        self.llg, self.fill_mask = llguidance, llguidance.numpy.fill_next_token_bitmask
        marked = list(tokens)
        for i in special:  # llguidance's mark for a control token, as localmix.structured does
            marked[i] = b"\xff<|control_%d|>" % i
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_GreedyEncoder(marked, special, eos)),
                                                n_vocab=len(tokens), eos_token=eos)

    def compile(self, schema: dict):
        return self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})

    def start(self, grammar):
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(self, matcher, bitmask: np.ndarray) -> None:
        self.fill_mask(matcher, bitmask)

    def advance(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class _GreedyEncoder:
    """What llguidance.TokenizerWrapper reads: token bytes, specials, EOS, and an encoder (the
    longest token that matches, byte by byte; used only for text the grammar forces)."""

    def __init__(self, tokens: list[bytes], special: list[int], eos: int):
        self.tokens, self.special_token_ids, self.eos_token_id, self.bos_token_id = tokens, special, eos, None
        skip = set(special)
        self.ids = {}
        for i, t in enumerate(tokens):
            if i not in skip:
                self.ids.setdefault(t, i)
        self.longest = max(map(len, self.ids))

    def __call__(self, data: bytes) -> list[int]:
        ids, at = [], 0
        while at < len(data):
            n = next(n for n in range(min(self.longest, len(data) - at), 0, -1) if data[at:at + n] in self.ids)
            ids.append(self.ids[data[at:at + n]])
            at += n
        return ids


class Xgrammar:
    def __init__(self, tokens: list[bytes], special: list[int], eos: int, single_thread: bool):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo(tokens, xgrammar.VocabType.RAW, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, **({"max_threads": 1} if single_thread else {}))

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def start(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: np.ndarray) -> None:
        matcher.fill_next_token_bitmask(bitmask)  # a numpy array, through DLPack

    def advance(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class OutlinesCore:
    def __init__(self, tokens: list[bytes], special: list[int], eos: int, single_thread: bool):
        import outlines_core

        self.oc = outlines_core
        skip, ids = set(special), {}
        for i, t in enumerate(tokens):
            if i not in skip:
                ids.setdefault(t, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, ids)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return self.oc.Index(regex, self.vocabulary)

    def start(self, index):
        return self.oc.Guide(index)

    def fill(self, guide, bitmask: np.ndarray) -> None:
        guide.write_mask_into(bitmask.ctypes.data, bitmask.size, bitmask.itemsize)

    def advance(self, guide, token: int) -> bool:
        guide.advance(token, return_tokens=False)
        return True


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def walk(lib, compiled, tokens: list[bytes], closers: dict, eos: int, seed: int) -> tuple[list[int], list[int], bytes, str]:
    """One answer: the nanoseconds of each mask, the number of tokens each allowed, the text, and how it
    ended. A step takes the argmax of seeded random logits among the allowed tokens; one step in
    CLOSE_EVERY, among the allowed tokens that close what the text is in (`closers`: a string, or
    else an object or array) if there are any, so that walks reach EOS."""
    vocab_size = len(tokens)
    matcher = lib.start(compiled)
    bitmask = np.zeros((1, (vocab_size + 31) // 32), np.int32)
    times, counts, text, in_string = [], [], b"", False
    for step in range(WALK_LIMIT):
        bitmask.fill(0)
        begin = time.perf_counter_ns()
        lib.fill(matcher, bitmask)
        times.append(time.perf_counter_ns() - begin)
        allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)
        counts.append(int(allowed.sum()))
        if not counts[-1]:
            return times, counts, text, "no token allowed"
        rng = np.random.default_rng((seed, step))
        logits = rng.random(vocab_size, np.float32)
        if rng.random() < 1 / CLOSE_EVERY and (allowed & closers[in_string]).any():
            allowed &= closers[in_string]
        token = int(np.argmax(np.where(allowed, logits, -1.0)))
        if token == eos:
            return times, counts, text, "eos"
        if not lib.advance(matcher, token):
            return times, counts, text, f"token {token} refused"
        text += tokens[token]
        in_string = _in_string(text)
    return times, counts, text, "limit"


def _in_string(text: bytes) -> bool:
    """Whether JSON text ends inside a string."""
    inside = escaped = False
    for byte in text:
        if escaped:
            escaped = False
        elif inside and byte == ord("\\"):
            escaped = True
        elif byte == ord('"'):
            inside = not inside
    return inside


def measure(library: str, vocab_name: str, single_thread: bool, masks: int, data: Path) -> dict:
    """One library on one vocabulary, every schema (run in a process of its own)."""
    tokens, special, eos = load_vocab(vocab_name, data)
    begin = time.perf_counter()
    __import__({"outlines-core": "outlines_core"}.get(library, library))
    result = {"import_s": time.perf_counter() - begin, "rss_import_mb": peak_rss_mb()}
    begin = time.perf_counter()
    lib = ADAPTERS[library](tokens, special, eos, single_thread)
    result["vocab_s"] = time.perf_counter() - begin
    closers = {True: np.array([b'"' in t for t in tokens]), False: np.array([b"]" in t or b"}" in t for t in tokens])}
    result["schemas"] = {}
    for name, schema in SCHEMAS.items():
        row = {}
        try:
            for key in ("compile_ms", "compile_again_ms"):
                begin = time.perf_counter()
                compiled = lib.compile(schema)
                row[key] = (time.perf_counter() - begin) * 1e3
            begin = time.perf_counter()
            lib.start(compiled)
            row["start_ms"] = (time.perf_counter() - begin) * 1e3
            times, counts, walks, ends = [], [], [], []
            while len(times) < masks:
                walk_times, walk_counts, text, end = walk(lib, compiled, tokens, closers, eos, seed=len(walks))
                times += walk_times
                counts += walk_counts
                walks.append(text)
                ends.append(end)
            row.update(first_mask_us=times[0] / 1e3, median_us=statistics.median(times) / 1e3,
                       p90_us=float(np.percentile(times, 90)) / 1e3, masks=len(times), walks=len(walks),
                       allowed_mean=statistics.mean(counts),
                       ends={e: ends.count(e) for e in set(ends)}, first_walk=walks[0][:60].decode("utf-8", "replace"),
                       walks_digest=hashlib.sha256(b"\0".join(walks)).hexdigest()[:8])
        except Exception as e:  # a library refusing a schema is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        result["schemas"][name] = row
    result["rss_growth_mb"] = peak_rss_mb() - result["rss_import_mb"]
    return result


def run_worker(library: str, vocab: str, threads: str, args) -> dict:
    env = dict(os.environ)
    if threads == "1":
        env.update(RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--worker", library, vocab, threads, "--masks", str(args.masks),
               "--data", str(args.data)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    if done.returncode:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", default=["1", "default"], choices=["1", "default"])
    parser.add_argument("--vocabs", nargs="+", default=list(VOCABS), choices=VOCABS)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--masks", type=int, default=200, help="masks timed per library, vocabulary and schema")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one library on one vocabulary")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="mistral_common's data folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("LIBRARY", "VOCAB", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        library, vocab, threads = args.worker
        print(json.dumps(measure(library, vocab, threads == "1", args.masks, args.data)))
        return

    results = []
    print("| threads | vocab | library | vocab s | rss import/growth MB | schema | compile ms (again) | start ms "
          "| first mask us | median us | p90 us | masks/walks | allowed mean | walk ends | walks digest |")
    print("|---" * 15 + "|")
    for threads in args.threads:
        for vocab in args.vocabs:
            for library in args.libraries:
                result = run_worker(library, vocab, threads, args)
                results.append({"threads": threads, "vocab": vocab, "library": library, **result})
                head = f"| {threads} | {vocab} | {library}"
                if "error" in result:
                    print(f"{head} | failed: {result['error']} |", flush=True)
                    continue
                head += f" | {result['vocab_s']:.2f} | {result['rss_import_mb']:.0f}/{result['rss_growth_mb']:.0f}"
                for name, row in result["schemas"].items():
                    if "error" in row:
                        print(f"{head} | {name} | failed: {row['error']} |", flush=True)
                        continue
                    print(f"{head} | {name} | {row['compile_ms']:.1f} ({row['compile_again_ms']:.1f}) "
                          f"| {row['start_ms']:.2f} | {row['first_mask_us']:.0f} | {row['median_us']:.1f} "
                          f"| {row['p90_us']:.1f} | {row['masks']}/{row['walks']} | {row['allowed_mean']:.0f} | {row['ends']} "
                          f"| {row['walks_digest']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
