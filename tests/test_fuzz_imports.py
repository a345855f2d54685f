"""Fuzz suite for the importers: crafted GGUF files and mlx-lm folders, each pulled into a fresh
$LOCALMIX_HOME in a child process under a memory limit and a timeout (tests/fuzz.py).

Every case is classed before it runs: a LIE (a count, type, offset, shape or value that does not
hold, or that localmix cannot hold) must end in one LocalmixError and leave no model listed; a
HARMLESS change (another valid layout, type, key or value) must import, and the model must load
and give finite logits. The inputs are made on the fly from one small random Mixtral: a GGUF file
written by the gguf package's writer (as tests/test_gguf.py writes it), rewritten with other
metadata or tensors, or patched byte by byte at offsets found with gguf's own reader; and an
mlx-lm folder as `localmix export` writes it, re-saved with other tensors or config.

`pytest -s tests/test_fuzz_imports.py` prints the counts."""

from __future__ import annotations

import json
import os
import shutil
import struct
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is in the test extra")

from fuzz import HARMLESS, LIE, Case, run_cases  # noqa: E402

from localmix.errors import LocalmixError  # noqa: E402

T, V = gguf.GGMLQuantizationType, gguf.GGUFValueType
U64_MAX = (1 << 64) - 1
CASES: dict[str, Case] = {}


# -- what every case does with its input: pull it, then judge what is left --------------------------

def pull_and_check(source: Path, work: Path) -> None:
    """Pull `source` into a home of its own. Refused: nothing may be listed or left half-written.
    Accepted: the model must load and give finite logits."""
    os.environ["LOCALMIX_HOME"] = str(work / "home")
    from localmix.home import list_models, models_dir
    from localmix.quant.pull import pull
    try:
        out = pull(str(source), name="fuzzed", say=lambda *a, **k: None)
    except LocalmixError:
        left = [p.name for p in models_dir().iterdir() if not p.name.endswith(".lock")] if models_dir().is_dir() else []
        if list_models() or left:
            raise AssertionError(f"a refused pull left {left}") from None
        raise
    import localmix
    logits = localmix.load(out, backend="numpy").logits([1, 415, 2936])
    if not np.isfinite(logits).all():
        raise AssertionError("an accepted model gives logits that are not finite")


def case(name: str, kind: str, make) -> None:
    assert name not in CASES, name
    CASES[name] = Case(kind, lambda ctx, work: pull_and_check(make(ctx, work), work))


# -- GGUF: rewritten with the gguf writer, or patched in place ------------------------------------

@lru_cache(maxsize=None)
def base_reader(path: str):
    return gguf.GGUFReader(path)


def rewrite(meta: dict | None = None, drop=(), tensors=None, alignment: int | None = None, arch: str | None = None,
            base: str = "gguf"):
    """The base GGUF (ctx[base]) written again: metadata keys in meta set to (value, type[, item
    type]), keys in drop left out, tensors(list of [name, data, raw_dtype]) changing the tensor list
    in place; arch: another architecture than the base's."""
    def make(ctx, work):
        r = base_reader(ctx[base])
        path = work / "model.gguf"
        w = gguf.GGUFWriter(str(path), arch or r.fields["general.architecture"].contents())
        if alignment:
            w.data_alignment = alignment
        for key, f in r.fields.items():
            if key.startswith("GGUF.") or key in drop or key == "general.architecture" or key in (meta or {}):
                continue
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == V.ARRAY else None)
        for key, spec in (meta or {}).items():
            w.add_key_value(key, *spec)
        listed = [[t.name, np.array(t.data), t.tensor_type] for t in r.tensors]
        if tensors:
            tensors(listed)
        for name, data, kind in listed:
            w.add_tensor(name, data, raw_dtype=None if kind in (T.F32, T.F16) and data.dtype != np.uint8 else kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path
    return make


def patch(*edits, base: str = "gguf"):
    """The base GGUF (ctx[base]) with bytes replaced: each edit is where(reader) -> offset, and a
    struct format and value (or raw bytes) to write there."""
    def make(ctx, work):
        r = base_reader(ctx[base])
        data = bytearray(Path(ctx[base]).read_bytes())
        for where, fmt, value in edits:
            at = where(r)
            raw = value if fmt is None else struct.pack(fmt, value)
            data[at:at + len(raw)] = raw
        path = work / "model.gguf"
        path.write_bytes(bytes(data))
        return path
    return make


def resized(size):
    """The base GGUF cut (or grown with zeros) to size(file size)."""
    def make(ctx, work):
        data = Path(ctx["gguf"]).read_bytes()
        n = size(len(data))
        path = work / "model.gguf"
        path.write_bytes(data[:n] + b"\0" * max(0, n - len(data)))
        return path
    return make


def at(offset):
    return lambda r: offset


def kv(key: str, part: int = 3):
    """Offset of a metadata field's part: 0 key length, 1 key, 2 type, 3 value (or a string's length,
    or an array's item type), 4 an array's count or a string's bytes, 5 its first item..."""
    def where(r):
        f = r.fields[key]
        return f.offset + sum(int(p.nbytes) for p in f.parts[:part])
    return where


def token(i: int, part: int = 0):
    """Offset of token i's length (part 0) or bytes (part 1) in tokenizer.ggml.tokens."""
    return kv("tokenizer.ggml.tokens", 5 + 2 * i + part)


def tensor(name: str, part: int):
    """Offset of a tensor info's part: 0 name length, 1 name, 2 dimension count, 3 dimensions,
    4 type, 5 offset."""
    def where(r):
        f = next(t for t in r.tensors if t.name == name).field
        return f.offset + sum(int(p.nbytes) for p in f.parts[:part])
    return where


def tensor_offset(name: str):
    return lambda r: next(t for t in r.tensors if t.name == name).field.parts[5][0]


def data(name: str, at_byte: int = 0):
    """Offset of a byte in a tensor's data."""
    return lambda r: next(t for t in r.tensors if t.name == name).data_offset + at_byte


def offset_of(name: str, other: str, shift: int = 0):
    """Patch value: the data offset of tensor `other` (relative to the data section) plus shift."""
    return lambda r: int(next(t for t in r.tensors if t.name == other).field.parts[5][0]) + shift


def patch_tensor_offset(name: str, value):
    """Set a tensor's data offset: value is an int or offset_of(...)."""
    def make(ctx, work):
        r = base_reader(ctx["gguf"])
        v = value(r) if callable(value) else value
        return patch((tensor(name, 5), "<Q", v))(ctx, work)
    return make


def pieces(ctx, base: str = "gguf", key: str = "tokenizer.ggml.tokens") -> list[str]:
    return base_reader(ctx[base]).fields[key].contents()


def duplicate_key(ctx, work):
    """Two keys of the same length: the second renamed to the first."""
    r = base_reader(ctx["gguf"])
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    first, second = next((a, b) for a in keys for b in keys if a < b and len(a) == len(b))
    return patch((kv(second, 1), None, first.encode()))(ctx, work)


E0 = "blk.0.ffn_gate_exps.weight"     # Q4_0 [64, 64, 4]
Q0 = "blk.0.attn_q.weight"            # Q8_0 [64, 64]
N0 = "blk.0.attn_norm.weight"         # F32 [64]
OUT = "output.weight"                 # F16 [64, 32000]

# Header
case("gguf header: magic", LIE, patch((at(0), None, b"GGUX")))
for v in (0, 1, 4, 0xFFFFFFFF):
    case(f"gguf header: version {v}", LIE, patch((at(4), "<I", v)))
case("gguf header: big-endian version", LIE, patch((at(4), ">I", 3)))
for n in (0, 1, 2**32, 2**63, U64_MAX):
    case(f"gguf header: tensor count {n}", LIE, patch((at(8), "<Q", n)))
case("gguf header: tensor count + 1", LIE, lambda ctx, work: patch(
    (at(8), "<Q", len(base_reader(ctx["gguf"]).tensors) + 1))(ctx, work))
case("gguf header: tensor count - 1", LIE, lambda ctx, work: patch(
    (at(8), "<Q", len(base_reader(ctx["gguf"]).tensors) - 1))(ctx, work))
for n in (0, 3, 2**32, U64_MAX):
    case(f"gguf header: key count {n}", LIE, patch((at(16), "<Q", n)))
case("gguf header: key count + 1", LIE, lambda ctx, work: patch(
    (at(16), "<Q", len([k for k in base_reader(ctx["gguf"]).fields if not k.startswith("GGUF.")]) + 1))(ctx, work))

# Truncations and growth
for n in (0, 4, 23, 24, 100, 1000, 50_000, 300_000):
    case(f"gguf truncated to {n} bytes", LIE, resized(lambda size, n=n: n))
for frac in (0.5, 0.9, 0.999):
    case(f"gguf truncated to {frac:.1%}", LIE, resized(lambda size, f=frac: int(size * f)))
case("gguf truncated by 1 byte", LIE, resized(lambda size: size - 1))
case("gguf truncated by 32 bytes", LIE, resized(lambda size: size - 32))
case("gguf with 64 KiB appended", LIE, resized(lambda size: size + 65536))
case("gguf with 1 byte appended", LIE, resized(lambda size: size + 1))

# Metadata keys: lengths and types patched in place
case("gguf key: length 2^64-1", LIE, patch((kv("llama.block_count", 0), "<Q", U64_MAX)))
case("gguf key: length past the end", LIE, patch((kv("llama.block_count", 0), "<Q", 1 << 40)))
case("gguf key: length 0", LIE, patch((kv("llama.block_count", 0), "<Q", 0)))
case("gguf key: renamed to a key already there", LIE, lambda ctx, work: duplicate_key(ctx, work))
for t in (13, 99, U64_MAX & 0xFFFFFFFF):
    case(f"gguf value: type {t}", LIE, patch((kv("llama.block_count", 2), "<I", t)))
case("gguf value: block_count relabelled float32", LIE, patch((kv("llama.block_count", 2), "<I", int(V.FLOAT32))))
case("gguf value: block_count relabelled int32", HARMLESS, patch((kv("llama.block_count", 2), "<I", int(V.INT32))))
case("gguf value: block_count relabelled uint8", LIE, patch((kv("llama.block_count", 2), "<I", int(V.UINT8))))
case("gguf value: block_count relabelled string", LIE, patch((kv("llama.block_count", 2), "<I", int(V.STRING))))
case("gguf value: block_count relabelled array", LIE, patch((kv("llama.block_count", 2), "<I", int(V.ARRAY))))
case("gguf value: block_count relabelled bool (value 2)", LIE, patch((kv("llama.block_count", 2), "<I", int(V.BOOL))))
case("gguf value: architecture length 2^64-1", LIE, patch((kv("general.architecture", 3), "<Q", U64_MAX)))
case("gguf value: architecture length + 1", LIE, patch((kv("general.architecture", 3), "<Q", 6)))
case("gguf value: architecture not UTF-8", LIE, patch((kv("general.architecture", 4), None, b"\xff\xfe")))

# The vocabulary's array, patched in place
case("gguf tokens: count 2^64-1", LIE, patch((kv("tokenizer.ggml.tokens", 4), "<Q", U64_MAX)))
case("gguf tokens: count 2^40", LIE, patch((kv("tokenizer.ggml.tokens", 4), "<Q", 1 << 40)))
case("gguf tokens: count + 1", LIE, patch((kv("tokenizer.ggml.tokens", 4), "<Q", 32001)))
case("gguf tokens: count - 1", LIE, patch((kv("tokenizer.ggml.tokens", 4), "<Q", 31999)))
case("gguf tokens: count 0", LIE, patch((kv("tokenizer.ggml.tokens", 4), "<Q", 0)))
case("gguf tokens: item type uint8", LIE, patch((kv("tokenizer.ggml.tokens", 3), "<I", int(V.UINT8))))
case("gguf tokens: item type array", LIE, patch((kv("tokenizer.ggml.tokens", 3), "<I", int(V.ARRAY))))
case("gguf tokens: item type 77", LIE, patch((kv("tokenizer.ggml.tokens", 3), "<I", 77)))
case("gguf tokens: a string's length 2^64-1", LIE, patch((token(100), "<Q", U64_MAX)))
case("gguf tokens: a string's length 2^32", LIE, patch((token(100), "<Q", 1 << 32)))
case("gguf tokens: a string not UTF-8", LIE, patch((token(300, 1), None, b"\xc3")))
case("gguf tokens: a piece renamed to another's (duplicate)", LIE, lambda ctx, work: rewrite(meta={
    "tokenizer.ggml.tokens": (pieces(ctx)[:300] + [pieces(ctx)[301]] + pieces(ctx)[301:], V.ARRAY, V.STRING)})(ctx, work))
case("gguf scores: count 2^62", LIE, patch((kv("tokenizer.ggml.scores", 4), "<Q", 1 << 62)))
case("gguf scores: count 2^64-1", LIE, patch((kv("tokenizer.ggml.scores", 4), "<Q", U64_MAX)))
case("gguf scores: item type float64", LIE, patch((kv("tokenizer.ggml.scores", 3), "<I", int(V.FLOAT64))))
case("gguf scores: a NaN", LIE, patch((kv("tokenizer.ggml.scores", 5), "<f", float("nan"))))
case("gguf token types: item type string", LIE, patch((kv("tokenizer.ggml.token_type", 3), "<I", int(V.STRING))))
case("gguf token types: a type 9", LIE, patch((kv("tokenizer.ggml.token_type", 5), "<i", 9)))
case("gguf token types: a type 0", LIE, patch((kv("tokenizer.ggml.token_type", 5), "<i", 0)))

# Metadata values: written by the writer with other values or types
U32 = V.UINT32
for value, kind, verdict in [(10**9, U32, LIE), (2**32 - 1, U32, LIE), (0, U32, LIE), (3, U32, LIE), (1, U32, LIE),
                             (2, V.INT64, HARMLESS), (2, V.UINT8, HARMLESS), (2, V.UINT64, HARMLESS), (-1, V.INT32, LIE),
                             (2.0, V.FLOAT32, LIE), ("2", V.STRING, LIE), (True, V.BOOL, LIE)]:
    case(f"gguf block_count {value!r} as {kind.name}", verdict, rewrite(meta={"llama.block_count": (value, kind)}))
for key, values in {
    "llama.embedding_length": [(10**9, LIE), (0, LIE), (96, LIE), (2**40, LIE)],
    "llama.feed_forward_length": [(10**9, LIE), (0, LIE), (32, LIE)],
    "llama.attention.head_count": [(0, LIE), (3, LIE), (10**6, LIE)],
    "llama.attention.head_count_kv": [(0, LIE), (3, LIE), (4, LIE), (1, LIE)],
    "llama.expert_count": [(10**9, LIE), (16384, LIE), (8, LIE), (3, LIE), (0, LIE)],
    "llama.expert_used_count": [(0, LIE), (5, LIE), (10**9, LIE), (1, HARMLESS), (4, HARMLESS)],
    "llama.context_length": [(0, LIE), (2**40, LIE), (4096, HARMLESS)],
    "llama.rope.dimension_count": [(8, LIE), (16, HARMLESS)],
    "tokenizer.ggml.bos_token_id": [(32000, LIE), (10**9, LIE), (1, HARMLESS)],
    "tokenizer.ggml.eos_token_id": [(32000, LIE), (2, HARMLESS)],
    "tokenizer.ggml.unknown_token_id": [(40000, LIE), (0, HARMLESS)],
}.items():
    for value, verdict in values:
        case(f"gguf {key} = {value}", verdict, rewrite(meta={key: (value, U32 if value < 1 << 32 else V.UINT64)}))
case("gguf bos id -1 (int32)", LIE, rewrite(meta={"tokenizer.ggml.bos_token_id": (-1, V.INT32)}))
case("gguf eos id as a string", LIE, rewrite(meta={"tokenizer.ggml.eos_token_id": ("2", V.STRING)}))
for key in ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"):
    ok = 1e-6 if "epsilon" in key else 1e4
    for value, verdict in ((0.0, LIE), (float("nan"), LIE), (float("inf"), LIE), (-1.0, LIE), (ok, HARMLESS)):
        case(f"gguf {key} = {value}", verdict, rewrite(meta={key: (value, V.FLOAT32)}))
    case(f"gguf {key} as a string", LIE, rewrite(meta={key: ("1e-5", V.STRING)}))
    case(f"gguf {key} as float64", HARMLESS, rewrite(meta={key: (ok, V.FLOAT64)}))
    case(f"gguf {key} missing (default)", HARMLESS, rewrite(drop={key}))
for key in ("llama.block_count", "llama.embedding_length", "llama.expert_count", "llama.expert_used_count",
            "llama.attention.head_count", "tokenizer.ggml.tokens", "tokenizer.ggml.model"):
    case(f"gguf {key} missing", LIE, rewrite(drop={key}))
for key in ("llama.context_length", "llama.attention.head_count_kv", "tokenizer.ggml.scores",
            "tokenizer.ggml.bos_token_id"):
    case(f"gguf {key} missing (default)", HARMLESS if key != "llama.attention.head_count_kv" else LIE,
         rewrite(drop={key}))
case("gguf architecture gpt2", LIE, rewrite(arch="gpt2"))
case("gguf architecture LLAMA", LIE, rewrite(arch="LLAMA"))
case("gguf tokenizer model gpt2", LIE, rewrite(meta={"tokenizer.ggml.model": ("gpt2", V.STRING)}))
case("gguf tokenizer model as an int", LIE, rewrite(meta={"tokenizer.ggml.model": (1, U32)}))
case("gguf tokens as uint32s", LIE, rewrite(meta={"tokenizer.ggml.tokens": (list(range(32000)), V.ARRAY, U32)}))
case("gguf scores of another length", LIE, rewrite(meta={"tokenizer.ggml.scores": ([0.0] * 100, V.ARRAY, V.FLOAT32)}))
case("gguf scores as strings", LIE, rewrite(meta={"tokenizer.ggml.scores": (["0"] * 32000, V.ARRAY, V.STRING)}))
case("gguf token types of another length", LIE, rewrite(meta={"tokenizer.ggml.token_type": ([1] * 31999, V.ARRAY, V.INT32)}))
case("gguf tokens: 32001 (one more than the embeddings)", LIE, lambda ctx, work: rewrite(meta={
    "tokenizer.ggml.tokens": (pieces(ctx) + ["extra"],
                              V.ARRAY, V.STRING)}, drop={"tokenizer.ggml.scores", "tokenizer.ggml.token_type"})(ctx, work))
case("gguf tokens: an empty piece", LIE, lambda ctx, work: rewrite(meta={
    "tokenizer.ggml.tokens": (pieces(ctx)[:400] + [""] + pieces(ctx)[401:],
                              V.ARRAY, V.STRING)})(ctx, work))
# Harmless metadata
case("gguf extra keys (name, license, a long chat template)", HARMLESS, rewrite(meta={
    "general.name": ("fuzzed", V.STRING), "general.license": ("apache-2.0", V.STRING),
    "tokenizer.chat_template": ("{{ x }}" * 20000, V.STRING)}))
case("gguf extra array of 2M uint8 (skipped, not kept)", HARMLESS, rewrite(meta={
    "fuzz.bytes": (np.zeros(2_000_000, np.uint8).tolist(), V.ARRAY, V.UINT8)}))
case("gguf extra array of 100k strings (skipped, not kept)", HARMLESS, rewrite(meta={
    "fuzz.strings": (["ab"] * 100_000, V.ARRAY, V.STRING)}))
case("gguf token types missing (byte pieces unknown)", LIE, rewrite(drop={"tokenizer.ggml.token_type"}))
case("gguf alignment 64", HARMLESS, rewrite(alignment=64, meta={"general.alignment": (64, U32)}))
case("gguf alignment 4096", HARMLESS, rewrite(alignment=4096, meta={"general.alignment": (4096, U32)}))
case("gguf alignment 0", LIE, rewrite(meta={"general.alignment": (0, U32)}))
case("gguf alignment 48", LIE, rewrite(meta={"general.alignment": (48, U32)}))
case("gguf alignment 2^31", LIE, rewrite(meta={"general.alignment": (1 << 31, U32)}))
case("gguf alignment 64 as uint64", LIE, rewrite(alignment=64, meta={"general.alignment": (64, V.UINT64)}))
case("gguf alignment 64 stated, data at 32", LIE, rewrite(meta={"general.alignment": (64, U32)}))

# Tensor infos, patched in place
for kind, verdict in ((T.Q4_1, LIE), (T.Q5_0, LIE), (T.Q8_0, LIE), (T.F16, LIE), (T.Q4_K, LIE), (T.I8, LIE)):
    case(f"gguf tensor type: experts Q4_0 -> {kind.name}", verdict, patch((tensor(E0, 4), "<I", int(kind))))
for kind in (T.Q4_0, T.Q4_1, T.F16, T.F32):
    case(f"gguf tensor type: attention Q8_0 -> {kind.name}", LIE, patch((tensor(Q0, 4), "<I", int(kind))))
for kind in (T.F16, T.I32, T.Q8_0):
    case(f"gguf tensor type: norm F32 -> {kind.name}", LIE, patch((tensor(N0, 4), "<I", int(kind))))
case("gguf tensor type: output F16 -> Q8_0", LIE, patch((tensor(OUT, 4), "<I", int(T.Q8_0))))
case("gguf tensor type: output F16 -> F32", LIE, patch((tensor(OUT, 4), "<I", int(T.F32))))
for kind in (4, 5, 200, 0xFFFFFFFF):
    case(f"gguf tensor type {kind}", LIE, patch((tensor(Q0, 4), "<I", kind)))
for value in (U64_MAX, (1 << 64) - 32, 1 << 63, 1 << 40, 1, 16):
    case(f"gguf tensor offset {value}", LIE, patch_tensor_offset(Q0, value))
case("gguf tensor offset + 32", LIE, patch_tensor_offset(Q0, offset_of(Q0, Q0, 32)))
case("gguf tensor offset - 32", LIE, patch_tensor_offset(Q0, offset_of(Q0, Q0, -32)))
case("gguf tensor offset: another tensor's (overlap)", LIE, patch_tensor_offset(N0, offset_of(N0, "blk.0.ffn_norm.weight")))
case("gguf tensor offset: wraps around to the file's first byte", LIE,
     patch_tensor_offset(N0, lambda r: (1 << 64) - r.data_offset))
case("gguf tensor offset: wraps around into the header (byte 1024)", LIE,
     patch_tensor_offset(N0, lambda r: (1 << 64) - r.data_offset + 1024))
for n in (0, 5, 0xFFFFFFFF):
    case(f"gguf tensor dimension count {n}", LIE, patch((tensor(Q0, 2), "<I", n)))
case("gguf tensor dimension count 3 for a matrix", LIE, patch((tensor(Q0, 2), "<I", 3)))
case("gguf tensor dims: 0", LIE, patch((tensor(Q0, 3), "<Q", 0)))
case("gguf tensor dims: 2^63", LIE, patch((tensor(Q0, 3), "<Q", 1 << 63)))
case("gguf tensor dims: product past 2^64", LIE, patch((tensor(E0, 3), "<Q", 1 << 40),
                                                      (lambda r: tensor(E0, 3)(r) + 8, "<Q", 1 << 40)))
case("gguf tensor dims: columns not whole blocks", LIE, patch((tensor(Q0, 3), "<Q", 48)))
case("gguf tensor dims: 8 experts in a stack of 4", LIE, patch((lambda r: tensor(E0, 3)(r) + 16, "<Q", 8)))
case("gguf tensor dims: rows and experts swapped", LIE, patch((lambda r: tensor(E0, 3)(r) + 8, "<Q", 4),
                                                                (lambda r: tensor(E0, 3)(r) + 16, "<Q", 64)))
case("gguf tensor name length 2^64-1", LIE, patch((tensor(Q0, 0), "<Q", U64_MAX)))
case("gguf tensor name renamed to another's (duplicate)", LIE,
     patch((tensor("blk.0.attn_k.weight", 1), None, b"blk.0.attn_q")))
case("gguf tensor name renamed to an unknown one", LIE, patch((tensor(Q0, 1), None, b"blk.0.attn_x")))
case("gguf tensor name not UTF-8", LIE, patch((tensor(Q0, 1), None, b"\xff")))

# Tensor data
case("gguf data: NaN in a norm", LIE, patch((data(N0, 8), "<f", float("nan"))))
case("gguf data: infinity in the F16 output", LIE, patch((data(OUT, 64), "<e", float("inf"))))
case("gguf data: NaN scale in a Q4_0 expert block", LIE, patch((data(E0, 18 * 5), "<e", float("nan"))))
case("gguf data: infinite scale in a Q8_0 block", LIE, patch((data(Q0, 34 * 3), "<e", float("-inf"))))
case("gguf data: other 4-bit values in an expert", HARMLESS, patch((data(E0, 18 * 7 + 2), None, b"\x5a" * 16)))
case("gguf data: other F32 norm value", HARMLESS, patch((data(N0, 4), "<f", 0.5)))

# Tensors rewritten by the writer


def drop_tensor(name):
    return lambda listed: listed.__delitem__(next(i for i, t in enumerate(listed) if t[0] == name))


def retype(names, kind):
    def change(listed):
        for t in listed:
            if t[0] in names or any(t[0].endswith(n) for n in names):
                values = gguf.quants.dequantize(t[1], t[2])
                if kind in (T.F32, T.F16):
                    t[1] = values.astype(np.float32 if kind == T.F32 else np.float16)
                else:
                    t[1] = gguf.quants.quantize(values, kind)
                t[2] = kind
    return change


def reorder(listed):
    listed.reverse()


case("gguf output.weight missing (tied embeddings)", HARMLESS, rewrite(tensors=drop_tensor(OUT)))
case("gguf token_embd missing", LIE, rewrite(tensors=drop_tensor("token_embd.weight")))
case("gguf an expert stack missing", LIE, rewrite(tensors=drop_tensor("blk.1.ffn_up_exps.weight")))
case("gguf a norm missing", LIE, rewrite(tensors=drop_tensor("blk.1.ffn_norm.weight")))
case("gguf an extra tensor (rope_freqs)", LIE, rewrite(tensors=lambda listed: listed.append(
    ["rope_freqs.weight", np.ones(8, np.float32), T.F32])))
case("gguf a third layer's tensor", LIE, rewrite(tensors=lambda listed: listed.append(
    ["blk.2.attn_norm.weight", np.ones(64, np.float32), T.F32])))
case("gguf tensors in reverse order", HARMLESS, rewrite(tensors=reorder))
for names, kind in ((["_exps.weight"], T.Q8_0), (["_exps.weight"], T.Q4_1), (["_exps.weight"], T.Q5_0),
                    (["attn_q.weight", "attn_k.weight"], T.F16), (["attn_v.weight"], T.F32),
                    (["token_embd.weight"], T.Q8_0), ([OUT], T.Q4_0), ([OUT], T.BF16), (["norm.weight"], T.F16)):
    case(f"gguf {'+'.join(names)} as {kind.name}", HARMLESS, rewrite(tensors=retype(names, kind)))
case("gguf norms as I32 (not weights)", LIE, rewrite(tensors=lambda listed: [
    t.__setitem__(slice(1, 3), [np.ones(t[1].shape, np.int32), T.I32]) for t in listed if t[0].endswith("norm.weight")]))


# -- GGUF of another architecture: qwen2moe (biases, a shared expert and its gate), byte-level BPE ----
Q2 = "gguf_qwen2"       # hidden 64, 4 heads of 16, 4 experts 64 wide, a shared expert 96 wide, 2 layers


def q2(**kwargs):
    return rewrite(base=Q2, **kwargs)


def q2_patch(*edits):
    return patch(*edits, base=Q2)


def q2_list(key, change):
    """The base's array `key` (strings) changed by change(list) -> list, rewritten."""
    return lambda ctx, work: q2(meta={key: (change(pieces(ctx, Q2, key)), V.ARRAY, V.STRING)})(ctx, work)


MERGES, PRE = "tokenizer.ggml.merges", "tokenizer.ggml.pre"
SHEXP_GATE = "blk.1.ffn_gate_inp_shexp.weight"
case("gguf qwen2moe unchanged", HARMLESS, lambda ctx, work: Path(ctx[Q2]))
case("gguf qwen2moe rewritten unchanged", HARMLESS, q2())
case("gguf qwen2moe merges: count 2^64-1", LIE, q2_patch((kv(MERGES, 4), "<Q", U64_MAX)))
case("gguf qwen2moe merges: count 2^40", LIE, q2_patch((kv(MERGES, 4), "<Q", 1 << 40)))
case("gguf qwen2moe merges: item type uint32", LIE, q2_patch((kv(MERGES, 3), "<I", int(V.UINT32))))
case("gguf qwen2moe merges missing", LIE, q2(drop={MERGES}))
case("gguf qwen2moe merges: one of tokens not in the vocabulary", LIE, q2_list(MERGES, lambda m: ["zzq qqz"] + m))
case("gguf qwen2moe merges: one of three parts", LIE, q2_list(MERGES, lambda m: ["a b c"] + m))
case("gguf qwen2moe merges: one without a space", LIE, q2_list(MERGES, lambda m: ["ab"] + m))
case("gguf qwen2moe merges: only the first 100", HARMLESS, q2_list(MERGES, lambda m: m[:100]))
case("gguf qwen2moe pre 'llama-bpe' (unknown here)", LIE, q2(meta={PRE: ("llama-bpe", V.STRING)}))
case("gguf qwen2moe pre as uint32", LIE, q2(meta={PRE: (2, V.UINT32)}))
case("gguf qwen2moe pre missing", LIE, q2(drop={PRE}))
case("gguf qwen2moe pre 'gpt-2' (another known split)", HARMLESS, q2(meta={PRE: ("gpt-2", V.STRING)}))
case("gguf qwen2moe token types: a type 9", LIE, q2_patch((kv("tokenizer.ggml.token_type", 5), "<i", 9)))
case("gguf qwen2moe token types missing", LIE, q2(drop={"tokenizer.ggml.token_type"}))
case("gguf qwen2moe tokens: a duplicate", LIE, q2_list("tokenizer.ggml.tokens", lambda t: t[:1] + t[:1] + t[2:]))
case("gguf qwen2moe tokens: an empty one", LIE, q2_list("tokenizer.ggml.tokens", lambda t: t[:5] + [""] + t[6:]))
case("gguf qwen2moe eos id on an unused [PAD] row", LIE, q2(meta={"tokenizer.ggml.eos_token_id": (31999, V.UINT32)}))
case("gguf qwen2moe eos id 32000", LIE, q2(meta={"tokenizer.ggml.eos_token_id": (32000, V.UINT32)}))
case("gguf qwen2moe eos id missing", HARMLESS, q2(drop={"tokenizer.ggml.eos_token_id"}))
case("gguf qwen2moe add_bos_token without a BOS id", LIE, q2(meta={"tokenizer.ggml.add_bos_token": (True, V.BOOL)},
                                                             drop={"tokenizer.ggml.bos_token_id"}))
case("gguf qwen2moe add_bos_token as uint8", LIE, q2(meta={"tokenizer.ggml.add_bos_token": (1, V.UINT8)}))
case("gguf qwen2moe add_eos_token true", LIE, q2(meta={"tokenizer.ggml.add_eos_token": (True, V.BOOL)}))
case("gguf qwen2moe chat template missing (a base model)", HARMLESS, q2(drop={"tokenizer.chat_template"}))
case("gguf qwen2moe chat template as uint32", LIE, q2(meta={"tokenizer.chat_template": (3, V.UINT32)}))
case("gguf qwen2moe chat template not jinja", LIE, q2(meta={"tokenizer.chat_template": ("{% if %}", V.STRING)}))
for key, values in {
    "qwen2moe.expert_feed_forward_length": [(32, LIE), (0, LIE), (10**9, LIE), (64, HARMLESS)],
    "qwen2moe.expert_shared_feed_forward_length": [(64, LIE), (0, LIE), (96, HARMLESS)],
    "qwen2moe.attention.key_length": [(8, LIE), (32, LIE), (16, HARMLESS)],
    "qwen2moe.attention.value_length": [(32, LIE)],
    "qwen2moe.expert_gating_func": [(2, LIE), (1, HARMLESS)],
}.items():
    for value, verdict in values:
        case(f"gguf qwen2moe {key} = {value}", verdict, q2(meta={key: (value, U32)}))
case("gguf qwen2moe expert_feed_forward_length missing (llama.cpp's n_ff / n_expert_used: 48)", LIE,
     q2(drop={"qwen2moe.expert_feed_forward_length"}))
case("gguf qwen2moe expert_shared_feed_forward_length missing (n_ff: 96)", HARMLESS,
     q2(drop={"qwen2moe.expert_shared_feed_forward_length"}))
case("gguf qwen2moe expert_weights_scale 2.5", LIE, q2(meta={"qwen2moe.expert_weights_scale": (2.5, V.FLOAT32)}))
case("gguf qwen2moe expert_weights_scale 1.0", HARMLESS, q2(meta={"qwen2moe.expert_weights_scale": (1.0, V.FLOAT32)}))
case("gguf qwen2moe expert_weights_scale as a string", LIE,
     q2(meta={"qwen2moe.expert_weights_scale": ("1", V.STRING)}))
case("gguf qwen2moe a k bias missing", LIE, q2(tensors=drop_tensor("blk.1.attn_k.bias")))
case("gguf qwen2moe layer 0's q bias missing (the others then extra)", LIE,
     q2(tensors=drop_tensor("blk.0.attn_q.bias")))
case("gguf qwen2moe every q/k/v bias missing (a model without)", HARMLESS, q2(tensors=lambda listed: listed.__setitem__(
    slice(None), [t for t in listed if not t[0].endswith(".bias")])))
case("gguf qwen2moe shared expert gate missing", LIE, q2(tensors=drop_tensor(SHEXP_GATE)))
case("gguf qwen2moe shared expert missing", LIE, q2(tensors=drop_tensor("blk.0.ffn_up_shexp.weight")))


def shexp_gate(shape):
    def change(listed):
        t = next(t for t in listed if t[0] == SHEXP_GATE)
        t[1] = np.resize(t[1], shape).astype(np.float32)
    return change


case("gguf qwen2moe shared expert gate as [64] (llama.cpp's shape)", HARMLESS, q2(tensors=shexp_gate((64,))))
case("gguf qwen2moe shared expert gate as [64, 2]", LIE, q2(tensors=shexp_gate((2, 64))))
case("gguf qwen2moe a dense MLP beside the experts", LIE, q2(tensors=lambda listed: listed.append(
    ["blk.0.ffn_gate.weight", np.zeros((96, 64), np.float32), T.F32])))
case("gguf qwen2moe a q norm (qwen3moe's)", LIE, q2(tensors=lambda listed: listed.append(
    ["blk.0.attn_q_norm.weight", np.ones(16, np.float32), T.F32])))
case("gguf qwen2moe relabelled qwen3moe", LIE, q2(arch="qwen3moe", meta={
    f"qwen3moe.{k}": v for k, v in {"block_count": (2, U32), "embedding_length": (64, U32),
                                      "feed_forward_length": (96, U32), "attention.head_count": (4, U32),
                                      "expert_count": (4, U32), "expert_used_count": (2, U32)}.items()}))
case("gguf qwen2moe relabelled olmoe", LIE, q2(arch="olmoe", meta={
    f"olmoe.{k}": v for k, v in {"block_count": (2, U32), "embedding_length": (64, U32),
                                   "feed_forward_length": (64, U32), "attention.head_count": (4, U32),
                                   "expert_count": (4, U32), "expert_used_count": (2, U32)}.items()}))


# -- mlx-lm folders ---------------------------------------------------------------------------------

def mlx_folder(config=None, tensors=None, files=None, tokenizer: bytes | None = None):
    """The base mlx-lm folder copied, with config(dict) changing config.json in place (or returning
    bytes to write instead), tensors(dict) changing the arrays (re-saved with safetensors), files(folder)
    changing anything else."""
    def make(ctx, work):
        base, folder = Path(ctx["mlx"]), work / "mixtral-mlx"
        shutil.copytree(base, folder)
        if config:
            value = json.loads((base / "config.json").read_text())
            written = config(value)
            (folder / "config.json").write_bytes(written if isinstance(written, bytes) else json.dumps(value).encode())
        if tensors:
            from safetensors.numpy import load_file, save_file
            arrays = load_file(str(base / "model.safetensors"))
            tensors(arrays)
            (folder / "model.safetensors").unlink()
            if arrays:
                save_file(arrays, str(folder / "model.safetensors"), metadata={"format": "mlx"})
        if tokenizer is not None:
            (folder / "tokenizer.model").write_bytes(tokenizer)
        if files:
            files(folder)
        return folder
    return make


def setq(**values):
    def change(config):
        config["quantization"].update(values)
    return change


def setc(**values):
    def change(config):
        config.update(values)
    return change


def quant_override(module, value):
    def change(config):
        config["quantization"][module] = value
    return change


SW = "model.layers.0.block_sparse_moe.switch_mlp.gate_proj"
QP = "model.layers.0.self_attn.q_proj"

# config.json and its quantization block
for key, value, verdict in [("bits", 3, LIE), ("bits", 2, LIE), ("bits", "4", LIE), ("bits", 4.0, LIE), ("bits", True, LIE),
                            ("bits", None, LIE), ("bits", 8, LIE), ("group_size", 16, LIE), ("group_size", 0, LIE),
                            ("group_size", "64", LIE), ("group_size", 32, LIE), ("group_size", 2**70, LIE),
                            ("mode", "mxfp4", LIE), ("mode", "affine", HARMLESS), ("mode", 1, LIE)]:
    case(f"mlx-lm quantization.{key} = {value!r}", verdict, mlx_folder(config=setq(**{key: value})))
case("mlx-lm quantization a list", LIE, mlx_folder(config=setc(quantization=[4, 64])))
case("mlx-lm quantization empty", LIE, mlx_folder(config=setc(quantization={})))
case("mlx-lm quantization missing (read as a HF folder)", LIE,
     mlx_folder(config=lambda c: c.pop("quantization")))
case("mlx-lm lm_head override 4 bits (data is 8)", LIE,
     mlx_folder(config=quant_override("lm_head", {"bits": 4, "group_size": 64})))
case("mlx-lm lm_head override dropped (data is 8)", LIE, mlx_folder(config=lambda c: c["quantization"].pop("lm_head")))
case("mlx-lm override group size 32 (data is 64)", LIE,
     mlx_folder(config=quant_override(QP, {"bits": 4, "group_size": 32})))
case("mlx-lm override as a string", LIE, mlx_folder(config=quant_override(QP, "4bit")))
case("mlx-lm override false on a quantized module", LIE, mlx_folder(config=quant_override(QP, False)))
case("mlx-lm override true on a quantized module", HARMLESS, mlx_folder(config=quant_override(QP, True)))
case("mlx-lm override for a module that does not exist", HARMLESS,
     mlx_folder(config=quant_override("model.vision_tower", {"bits": 4, "group_size": 64})))
case("mlx-lm override with bits 3", LIE, mlx_folder(config=quant_override(QP, {"bits": 3, "group_size": 64})))
for key, value in [("num_hidden_layers", 10**9), ("num_hidden_layers", 3), ("num_hidden_layers", 1),
                   ("num_local_experts", 10**6), ("num_local_experts", 16384), ("num_local_experts", 8),
                   ("hidden_size", 128), ("hidden_size", 2**40), ("intermediate_size", 2**20), ("vocab_size", 32001),
                   ("num_attention_heads", 3), ("num_key_value_heads", 4), ("tie_word_embeddings", "false"),
                   ("rope_theta", 0), ("rope_theta", "1e6"), ("rms_norm_eps", -1), ("num_experts_per_tok", 9),
                   ("model_type", "llama"), ("hidden_act", "gelu")]:
    case(f"mlx-lm config {key} = {value!r}", LIE, mlx_folder(config=setc(**{key: value})))
case("mlx-lm config not JSON", LIE, mlx_folder(config=lambda c: b"{not json"))
case("mlx-lm config nested 100000 deep", LIE, mlx_folder(config=lambda c: b"[" * 100000 + b"]" * 100000))
case("mlx-lm config with NaN", LIE, mlx_folder(config=lambda c: json.dumps({**c, "rope_theta": float("nan")}).encode()))
case("mlx-lm config a list", LIE, mlx_folder(config=lambda c: b"[1, 2]"))
case("mlx-lm config max_position_embeddings 4096", HARMLESS, mlx_folder(config=setc(max_position_embeddings=4096)))
case("mlx-lm config extra keys", HARMLESS, mlx_folder(config=setc(torch_dtype="bfloat16", custom={"a": [1, 2]})))


# tensors
def reshape(name, shape):
    return lambda a: a.__setitem__(name, a[name].reshape(shape))


def astype(name, dtype):
    return lambda a: a.__setitem__(name, a[name].astype(dtype))


def view(name, dtype):
    return lambda a: a.__setitem__(name, a[name].view(dtype))


def set_value(name, index, value):
    def change(a):
        array = a[name].copy()
        array.reshape(-1)[index] = value
        a[name] = array
    return change


case("mlx-lm expert stack missing", LIE, mlx_folder(tensors=lambda a: a.pop(SW + ".weight")))
case("mlx-lm scales missing (module looks unquantized)", LIE, mlx_folder(tensors=lambda a: a.pop(QP + ".scales")))
case("mlx-lm biases missing", LIE, mlx_folder(tensors=lambda a: a.pop(QP + ".biases")))
case("mlx-lm a norm missing", LIE, mlx_folder(tensors=lambda a: a.pop("model.norm.weight")))
case("mlx-lm no tensors at all", LIE, mlx_folder(tensors=lambda a: a.clear()))
case("mlx-lm stack of 4 reshaped to 2", LIE, mlx_folder(tensors=lambda a: reshape(SW + ".weight", (2, -1, 8))(a)))
case("mlx-lm words as one row per expert", LIE, mlx_folder(tensors=lambda a: reshape(SW + ".weight", (4, 1, -1))(a)))
case("mlx-lm words' rows and columns swapped", LIE, mlx_folder(tensors=lambda a: reshape(QP + ".weight", (8, 64))(a)))
case("mlx-lm scales transposed", LIE,
     mlx_folder(tensors=lambda a: a.__setitem__(QP + ".scales", a[QP + ".scales"].T.copy())))
case("mlx-lm words relabelled float32", LIE, mlx_folder(tensors=view(QP + ".weight", np.float32)))
case("mlx-lm words as int32", LIE, mlx_folder(tensors=view(QP + ".weight", np.int32)))
case("mlx-lm words as bytes", LIE, mlx_folder(tensors=view(QP + ".weight", np.uint8)))
case("mlx-lm scales as uint16", LIE, mlx_folder(tensors=view(QP + ".scales", np.uint16)))
case("mlx-lm scales as float32", HARMLESS, mlx_folder(tensors=astype(QP + ".scales", np.float32)))
case("mlx-lm norm as float32", HARMLESS, mlx_folder(tensors=astype("model.norm.weight", np.float32)))
case("mlx-lm norm as float64", LIE, mlx_folder(tensors=astype("model.norm.weight", np.float64)))
case("mlx-lm norm of the wrong length", LIE, mlx_folder(tensors=lambda a: a.__setitem__(
    "model.norm.weight", a["model.norm.weight"][:32].copy())))
case("mlx-lm NaN in a scale", LIE, mlx_folder(tensors=set_value(QP + ".scales", 3, np.nan)))
case("mlx-lm infinity in a bias of an expert", LIE, mlx_folder(tensors=set_value(SW + ".biases", 100, np.inf)))
case("mlx-lm NaN in a norm", LIE, mlx_folder(tensors=set_value("model.norm.weight", 0, np.nan)))
case("mlx-lm float32 scale float16 cannot hold", LIE, mlx_folder(tensors=lambda a: (
    astype(QP + ".scales", np.float32)(a), set_value(QP + ".scales", 0, 1e-30)(a))))
case("mlx-lm other packed words", HARMLESS, mlx_folder(tensors=set_value(SW + ".weight", 7, 0x12345678)))
case("mlx-lm an extra tensor (mlx-lm refuses it too)", LIE,
     mlx_folder(tensors=lambda a: a.__setitem__("extra.weight", np.zeros(4, np.float16))))


def split_files(folder):
    from safetensors.numpy import load_file, save_file
    arrays = load_file(str(folder / "model.safetensors"))
    names = sorted(arrays)
    save_file({n: arrays[n] for n in names[::2]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({n: arrays[n] for n in names[1::2]}, str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors").unlink()


def duplicate_tensor(folder):
    from safetensors.numpy import load_file, save_file
    arrays = load_file(str(folder / "model.safetensors"))
    save_file({QP + ".scales": arrays[QP + ".scales"] * 2}, str(folder / "other.safetensors"))


def edit_bytes(edit):
    def change(folder):
        path = folder / "model.safetensors"
        data = bytearray(path.read_bytes())
        path.write_bytes(bytes(edit(data)))
    return change


def header_json(change):
    """The safetensors header's JSON changed by change(dict), padded to its old length if shorter."""
    def edit(data):
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        change(header)
        raw = json.dumps(header).encode()
        raw += b" " * max(0, n - len(raw))
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    return edit


def offsets(name, begin_shift, end_shift):
    def change(h):
        h[name]["data_offsets"] = [h[name]["data_offsets"][0] + begin_shift, h[name]["data_offsets"][1] + end_shift]
    return change


case("mlx-lm weights split in two files", HARMLESS, mlx_folder(files=split_files))
case("mlx-lm a tensor in two files", LIE, mlx_folder(files=duplicate_tensor))
case("mlx-lm safetensors truncated by half", LIE, mlx_folder(files=edit_bytes(lambda d: d[:len(d) // 2])))
case("mlx-lm safetensors truncated by 1 byte", LIE, mlx_folder(files=edit_bytes(lambda d: d[:-1])))
case("mlx-lm safetensors truncated to 6 bytes", LIE, mlx_folder(files=edit_bytes(lambda d: d[:6])))
case("mlx-lm safetensors header length 2^64-1", LIE,
     mlx_folder(files=edit_bytes(lambda d: struct.pack("<Q", U64_MAX) + d[8:])))
case("mlx-lm safetensors header not JSON", LIE, mlx_folder(files=edit_bytes(lambda d: d[:8] + b"\xff" * 16 + d[24:])))
case("mlx-lm safetensors offsets past the end", LIE,
     mlx_folder(files=edit_bytes(header_json(offsets(QP + ".weight", 0, 1 << 40)))))
case("mlx-lm safetensors negative offset", LIE, mlx_folder(files=edit_bytes(header_json(
    lambda h: h[QP + ".weight"].__setitem__("data_offsets", [-2048, 0])))))
case("mlx-lm safetensors overlapping tensors", LIE, mlx_folder(files=edit_bytes(header_json(
    lambda h: h[QP + ".biases"].__setitem__("data_offsets", list(h[QP + ".scales"]["data_offsets"]))))))
case("mlx-lm safetensors dtype U32 -> F32 in the header", LIE, mlx_folder(files=edit_bytes(header_json(
    lambda h: h[QP + ".weight"].__setitem__("dtype", "F32")))))
case("mlx-lm safetensors shape as strings", LIE, mlx_folder(files=edit_bytes(header_json(
    lambda h: h[QP + ".weight"].__setitem__("shape", ["64", "8"])))))
case("mlx-lm safetensors file a symlink out of the folder", LIE, mlx_folder(files=lambda f: (
    shutil.move(f / "model.safetensors", f.parent / "outside.safetensors"),
    os.symlink(f.parent / "outside.safetensors", f / "model.safetensors"))))
case("mlx-lm tokenizer.model garbage", LIE, mlx_folder(tokenizer=b"\x0a\xff" * 100))
case("mlx-lm tokenizer.model empty", LIE, mlx_folder(tokenizer=b""))
case("mlx-lm tokenizer.model missing", LIE, mlx_folder(files=lambda f: (f / "tokenizer.model").unlink()))


# The controls: unmutated, both inputs import (else every LIE could pass for the wrong reason).
case("gguf unchanged", HARMLESS, lambda ctx, work: Path(ctx["gguf"]))
case("gguf rewritten unchanged", HARMLESS, rewrite())
case("mlx-lm unchanged", HARMLESS, mlx_folder())


# -- the suite ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One small random Mixtral as a GGUF file and as an mlx-lm folder; a Qwen2-MoE as a GGUF file."""
    import torch
    from conftest import make_hf_model
    from test_gguf import original_tokenizer, write_family_gguf, write_gguf

    from localmix.quant.convert import LocalSource, convert
    from localmix.quant.mlx_lm import export_mlx_lm

    root = tmp_path_factory.mktemp("fuzz-imports")
    hf = root / "hf"
    make_hf_model(hf, dtype=torch.bfloat16, hidden_size=64, intermediate_size=64, num_key_value_heads=2)
    path = write_gguf(hf, root / "base.gguf")
    export_mlx_lm(convert(LocalSource(hf), root / "base-q4", bits="4"), root / "base-mlx")
    make_hf_model(root / "hf-qwen2", "qwen2_moe", dtype=torch.bfloat16, moe_intermediate_size=64,
                  shared_expert_intermediate_size=96)
    tokenizer = original_tokenizer(root / "tokenizer-qwen2", "qwen2")
    qwen2, _ = write_family_gguf(root / "hf-qwen2", root / "base-qwen2moe.gguf", tokenizer)
    return {"gguf": str(path), "mlx": str(root / "base-mlx"), Q2: str(qwen2)}


def test_crafted_gguf_files_and_mlx_lm_folders(inputs, tmp_path):
    assert len(CASES) >= 150
    report = run_cases("test_fuzz_imports", CASES, context=inputs, workdir=tmp_path, timeout_s=60, memory_mb=3072)
    print()
    for kind in ("gguf", "mlx-lm"):
        part = type(report)({n: k for n, k in report.kinds.items() if n.startswith(kind)},
                            {n: o for n, o in report.outcomes.items() if n.startswith(kind)}, report.seconds)
        print(part.summary(f"import fuzz, {kind}"))
    print(report.summary("import fuzz, all"))
    report.assert_clean()
