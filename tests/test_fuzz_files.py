"""Crafted model files of every kind localmix reads, run through its real entry points.

Two small models are built once: a sharded bfloat16 Hugging Face folder and a 4-bit localmix model
converted from it. Each case copies one (hard links; a file is replaced before it is edited), changes
one thing, and is classified in advance:

- LIE: the change makes a file say something untrue or unsafe (a shape, an offset, a size, a type,
  a path out of the folder, a garbage tokenizer). It must be refused with LocalmixError, by every
  entry point named for it: loading and generating, and for localmix models `verify` too.
- HARMLESS: a change that keeps the files true (key order, unknown keys, padding, an unused extra
  tensor, a default spelled out). It must load and generate (and verify clean).
- PAYLOAD: the tensor bytes changed under an intact manifest. Loading may go either way (hashes are
  not checked at load: that would read the whole model), but `verify` must report it, and loading
  and generating must end in a LocalmixError or in text: never a traceback or a crash.

Cases run in child processes (tests/fuzz.py) under an address-space limit and a timeout, so an
abort, a segfault, a hang or a blow-up is counted. Most use the numpy backend; the ones marked
`numba` run the Numba kernels, and with `cache` the expert cache within a memory budget, since those
are where a manifest's lie became a write past a buffer.

    pytest -s tests/test_fuzz_files.py      # prints the counts
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest

from fuzz import HARMLESS, LIE, Case, run_cases

PROMPT = "In the beginning"
PAYLOAD = LIE  # counted with the lies: verify must report them (see the module's docstring)

CASES: dict[str, Case] = {}


# -- entry points (run in the child) ---------------------------------------------------------------

def generate(folder: Path, **options) -> None:
    import localmix
    llm = localmix.load(folder, **options)
    llm.generate(PROMPT, max_tokens=2, temperature=0.0)


def verify_clean(folder: Path) -> None:
    from localmix.errors import LocalmixError
    from localmix.store import verify
    problems = verify(folder)
    if problems:
        raise LocalmixError(problems[0])


def refused_by_all(*checks):
    """LIE: every check must refuse; returns (accepted) naming the first that did not."""
    from localmix.errors import LocalmixError
    first = None
    for check in checks:
        try:
            check()
        except LocalmixError as e:
            first = first or e
            continue
        return f"accepted by {check.__name__}"
    raise first


def tolerated(check) -> None:
    """Either way is fine (LocalmixError or success); anything else propagates."""
    from localmix.errors import LocalmixError
    try:
        check()
    except LocalmixError:
        pass


def named(fn, name):
    fn.__name__ = name
    return fn


def hf_checks(kind):
    """A Hugging Face folder: localmix.load (Checkpoint, numpy reference) and two generated tokens."""
    def run(folder):
        load = named(lambda: generate(folder), "load+generate")
        return refused_by_all(load) if kind == LIE else load()
    return run


def lm_checks(kind, numba=False, cache=False):
    """A localmix folder: load and generate (numpy, or the Numba kernels, with the expert cache
    within a two-slot budget), and verify."""
    def run(folder):
        options = {"backend": "numba" if numba else "numpy"}
        if cache:
            options["memory"] = budget(os.environ["FUZZ_LM_BASE"])
        load = named(lambda: generate(folder, **options), "load+generate")
        check = named(lambda: verify_clean(folder), "verify")
        if kind == HARMLESS:
            load()
            check()
            return None
        if kind == "payload":
            tolerated(load)
            return refused_by_all(check)
        return refused_by_all(load, check)
    return run


def budget(base: str) -> int:
    """--memory leaving two expert slots, from the base model's manifest (the mutated one may lie)."""
    from localmix.experts import fixed_memory
    from localmix.store import read_manifest
    from localmix.config import ModelArgs
    manifest = read_manifest(Path(base))
    sizes = [f["size"] for name, f in manifest["files"].items() if name.startswith("experts/")]
    return fixed_memory(manifest, ModelArgs.from_hf_config(manifest["config"])) + 2 * max(sizes)


# -- making a mutated copy -------------------------------------------------------------------------

def clone(base: str, work: Path) -> Path:
    """The base folder as hard links: cheap, and safe as long as files are replaced, not edited."""
    folder = work / "model"
    shutil.copytree(base, folder, copy_function=os.link)
    return folder


def replace(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


NAN, INF, HUGE = "@@NaN@@", "@@Infinity@@", "@@1e400@@"


def dumps(value) -> bytes:
    """JSON, with markers for what json.dumps cannot write (or writes only when asked)."""
    text = json.dumps(value, indent=1)
    for marker, raw in ((NAN, "NaN"), (INF, "Infinity"), (HUGE, "1e400")):
        text = text.replace(f'"{marker}"', raw)
    return text.encode()


def add(group: str, name: str, kind: str, mutate, check):
    key = f"{group}: {name}"
    assert key not in CASES, key
    outcome = kind if kind != "payload" else PAYLOAD
    CASES[key] = Case(outcome, lambda ctx, work: check(mutate(ctx, work)))


# -- configs: the Hugging Face folder's config.json and the manifest's copy of it ------------------

def setter(**values):
    def edit(c):
        c.update(values)
    return edit


def deleter(key):
    def edit(c):
        c.pop(key, None)
    return edit


def rope(value):
    def edit(c):
        c["rope_parameters"] = dict(c.get("rope_parameters") or {"rope_type": "default"}, rope_theta=value)
    return edit


# (name, edit, kind for a Hugging Face folder, kind for a manifest); None: not applicable
CONFIG_EDITS = [
    ("layers 10^9", setter(num_hidden_layers=10 ** 9), LIE, LIE),
    ("layers 0", setter(num_hidden_layers=0), LIE, LIE),
    ("layers -1", setter(num_hidden_layers=-1), LIE, LIE),
    ("layers '2'", setter(num_hidden_layers="2"), LIE, LIE),
    ("layers 2.0", setter(num_hidden_layers=2.0), LIE, LIE),
    ("layers true", setter(num_hidden_layers=True), LIE, LIE),
    ("layers missing", deleter("num_hidden_layers"), LIE, LIE),
    ("layers 3 (weights have 2)", setter(num_hidden_layers=3), LIE, LIE),
    ("layers 1 (weights have 2)", setter(num_hidden_layers=1), None, LIE),
    ("hidden 10^9", setter(hidden_size=10 ** 9), LIE, LIE),
    ("hidden 0", setter(hidden_size=0), LIE, LIE),
    ("hidden '64'", setter(hidden_size="64"), LIE, LIE),
    ("hidden 128 (weights 64)", setter(hidden_size=128), LIE, LIE),
    ("hidden 2^64", setter(hidden_size=2 ** 64), LIE, LIE),
    ("intermediate 10^9", setter(intermediate_size=10 ** 9), LIE, LIE),
    ("intermediate 0", setter(intermediate_size=0), LIE, LIE),
    ("intermediate 192 (weights 128)", setter(intermediate_size=192), LIE, LIE),
    ("heads 0", setter(num_attention_heads=0), LIE, LIE),
    ("heads 10^6", setter(num_attention_heads=10 ** 6), LIE, LIE),
    ("heads '4'", setter(num_attention_heads="4"), LIE, LIE),
    ("heads 3 (not a multiple of kv heads)", setter(num_attention_heads=3), LIE, LIE),
    ("heads 8 (head_dim 8)", setter(num_attention_heads=8), LIE, LIE),
    ("kv heads 0", setter(num_key_value_heads=0), LIE, LIE),
    ("kv heads 10^5", setter(num_key_value_heads=10 ** 5), LIE, LIE),
    ("kv heads 1 (weights 2)", setter(num_key_value_heads=1), LIE, LIE),
    ("head_dim 3 (odd)", setter(head_dim=3), LIE, LIE),
    ("head_dim -2", setter(head_dim=-2), LIE, LIE),
    ("head_dim 0", setter(head_dim=0), LIE, LIE),
    ("head_dim 10^7", setter(head_dim=10 ** 7), LIE, LIE),
    ("head_dim '16'", setter(head_dim="16"), LIE, LIE),
    ("head_dim 32 (weights 16)", setter(head_dim=32), LIE, LIE),
    ("head_dim 16 spelled out", setter(head_dim=16), HARMLESS, HARMLESS),
    ("vocab 0", setter(vocab_size=0), LIE, LIE),
    ("vocab 10^9", setter(vocab_size=10 ** 9), LIE, LIE),
    ("vocab '32000'", setter(vocab_size="32000"), LIE, LIE),
    ("vocab 100 (weights and tokenizer 32000)", setter(vocab_size=100), LIE, LIE),
    ("vocab 32768", setter(vocab_size=32768), LIE, LIE),
    ("tie 'false'", setter(tie_word_embeddings="false"), LIE, LIE),
    ("tie 'true'", setter(tie_word_embeddings="true"), LIE, LIE),
    ("tie 0", setter(tie_word_embeddings=0), LIE, LIE),
    ("tie 1", setter(tie_word_embeddings=1), LIE, LIE),
    ("tie true (lm_head stored)", setter(tie_word_embeddings=True), None, LIE),
    ("tie null (default false)", setter(tie_word_embeddings=None), HARMLESS, HARMLESS),
    ("rope_theta 0", rope(0), LIE, LIE),
    ("rope_theta -1", rope(-1.0), LIE, LIE),
    ("rope_theta NaN", rope(NAN), LIE, LIE),
    ("rope_theta Infinity", rope(INF), LIE, LIE),
    ("rope_theta 1e400", rope(HUGE), LIE, LIE),
    ("rope_theta '1e6'", rope("1e6"), LIE, LIE),
    ("rope_theta true", rope(True), LIE, LIE),
    ("rope_theta 10000 (int)", rope(10000), HARMLESS, HARMLESS),
    ("top-level rope_theta 0 beside rope_parameters", setter(rope_theta=0), LIE, LIE),
    ("top-level rope_theta 1e6 beside rope_parameters", setter(rope_theta=1e6), HARMLESS, HARMLESS),
    ("rope_parameters 'default'", setter(rope_parameters="default"), LIE, LIE),
    ("rope_parameters [1]", setter(rope_parameters=[1]), LIE, LIE),
    ("rope_parameters yarn", setter(rope_parameters={"rope_type": "yarn", "factor": 4.0}), LIE, LIE),
    ("rope_scaling linear beside default", setter(rope_scaling={"type": "linear", "factor": 2.0}), LIE, LIE),
    ("rope_parameters null (default theta)", setter(rope_parameters=None), HARMLESS, HARMLESS),
    ("rms_norm_eps 0", setter(rms_norm_eps=0), LIE, LIE),
    ("rms_norm_eps -1e-5", setter(rms_norm_eps=-1e-5), LIE, LIE),
    ("rms_norm_eps NaN", setter(rms_norm_eps=NAN), LIE, LIE),
    ("rms_norm_eps '1e-5'", setter(rms_norm_eps="1e-5"), LIE, LIE),
    ("rms_norm_eps 2.0", setter(rms_norm_eps=2.0), LIE, LIE),
    ("rms_norm_eps [1e-5]", setter(rms_norm_eps=[1e-5]), LIE, LIE),
    ("rms_norm_eps null (default)", setter(rms_norm_eps=None), HARMLESS, HARMLESS),
    ("context 0", setter(max_position_embeddings=0), LIE, LIE),
    ("context 10^12", setter(max_position_embeddings=10 ** 12), LIE, LIE),
    ("context '512'", setter(max_position_embeddings="512"), LIE, LIE),
    ("context 1.5", setter(max_position_embeddings=1.5), LIE, LIE),
    ("context 64", setter(max_position_embeddings=64), HARMLESS, HARMLESS),
    ("sliding_window 0", setter(sliding_window=0), LIE, LIE),
    ("sliding_window -1", setter(sliding_window=-1), LIE, LIE),
    ("sliding_window '4096'", setter(sliding_window="4096"), LIE, LIE),
    ("sliding_window true", setter(sliding_window=True), LIE, LIE),
    ("sliding_window 1.5", setter(sliding_window=1.5), LIE, LIE),
    ("sliding_window 8", setter(sliding_window=8), HARMLESS, HARMLESS),
    ("1024 layers of 16384 experts (each within its bound)", setter(num_hidden_layers=1024, num_local_experts=16384),
     LIE, LIE),
    ("experts 0", setter(num_local_experts=0), LIE, LIE),
    ("experts 10^9", setter(num_local_experts=10 ** 9), LIE, LIE),
    ("experts '4'", setter(num_local_experts="4"), LIE, LIE),
    ("experts 8 (weights 4)", setter(num_local_experts=8), LIE, LIE),
    ("experts 2 (weights 4)", setter(num_local_experts=2), LIE, LIE),
    ("experts per token 0", setter(num_experts_per_tok=0), LIE, LIE),
    ("experts per token 5 of 4", setter(num_experts_per_tok=5), LIE, LIE),
    ("experts per token '2'", setter(num_experts_per_tok="2"), LIE, LIE),
    ("experts per token true", setter(num_experts_per_tok=True), LIE, LIE),
    ("experts per token 1", setter(num_experts_per_tok=1), HARMLESS, HARMLESS),
    ("experts per token 4", setter(num_experts_per_tok=4), HARMLESS, HARMLESS),
    ("model_type llama", setter(model_type="llama"), LIE, LIE),
    ("model_type 5", setter(model_type=5), LIE, LIE),
    ("model_type ['mixtral']", setter(model_type=["mixtral"]), LIE, LIE),
    ("model_type missing", deleter("model_type"), LIE, LIE),
    ("model_type mistral (tensors are a mixture's)", setter(model_type="mistral"), LIE, LIE),
    ("hidden_act gelu", setter(hidden_act="gelu"), LIE, LIE),
    ("hidden_act 5", setter(hidden_act=5), LIE, LIE),
    ("hidden_act silu spelled out", setter(hidden_act="silu"), HARMLESS, HARMLESS),
    ("localmix_base_model 'false'", setter(localmix_base_model="false"), LIE, LIE),
    ("localmix_base_model true", setter(localmix_base_model=True), HARMLESS, HARMLESS),
    ("localmix_base_model false", setter(localmix_base_model=False), HARMLESS, HARMLESS),
    ("unknown key", setter(my_extra_key={"nested": [1, 2, 3]}), HARMLESS, HARMLESS),
    ("unicode key", setter(**{"cl\u00e9 \u2603": "\u00e9t\u00e9"}), HARMLESS, HARMLESS),
    ("dtype float16", setter(dtype="float16", torch_dtype="float16"), HARMLESS, HARMLESS),
    ("keys reversed", lambda c: [c.update({k: c.pop(k)}) for k in list(c)[::-1]], HARMLESS, HARMLESS),
]


def hf_config(edit):
    def mutate(ctx, work):
        folder = clone(ctx["hf"], work)
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        replace(folder / "config.json", dumps(config))
        return folder
    return mutate


def hf_config_raw(data: bytes):
    def mutate(ctx, work):
        folder = clone(ctx["hf"], work)
        replace(folder / "config.json", data)
        return folder
    return mutate


def manifest_edit(edit):
    def mutate(ctx, work):
        folder = clone(ctx["lm"], work)
        manifest = json.loads((folder / "manifest.json").read_text())
        out = edit(manifest, folder)
        replace(folder / "manifest.json", out if isinstance(out, bytes) else dumps(manifest))
        return folder
    return mutate


for name, edit, hf_kind, lm_kind in CONFIG_EDITS:
    if hf_kind:
        add("config.json", name, hf_kind, hf_config(edit), hf_checks(hf_kind))
    if lm_kind:
        add("manifest config", name, lm_kind,
            manifest_edit(lambda m, folder, edit=edit: edit(m["config"])), lm_checks(lm_kind))

DEEP = b"[" * 100_000 + b"]" * 100_000
for name, data in [("a list", b"[1, 2]"), ("a string", b'"mixtral"'), ("truncated JSON", b'{"model_type": "mix'),
                   ("empty", b""), ("invalid UTF-8", b'{"model_type": "\xff\xfe"}'), ("nested 100000 deep", DEEP),
                   ("NaN constant", b'{"model_type": "mixtral", "x": NaN}'), ("null", b"null")]:
    add("config.json", name, LIE, hf_config_raw(data), hf_checks(LIE))


def hf_config_huge(ctx, work):
    folder = clone(ctx["hf"], work)
    (folder / "config.json").unlink()
    with open(folder / "config.json", "wb") as f:  # sparse: 65 MB of spaces would do the same
        f.write(b"{")
        f.truncate(65 * 1024 * 1024)
    return folder


add("config.json", "65 MB", LIE, hf_config_huge, hf_checks(LIE))


# -- safetensors headers ---------------------------------------------------------------------------

def split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header, body: bytes, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else dumps(header)
    return struct.pack("<Q", len(text)) + text + body


def shard_of(folder: Path, tensor: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][tensor]


NORM = "model.layers.0.input_layernorm.weight"     # 64 bfloat16 values
WQ = "model.layers.0.self_attn.q_proj.weight"      # [64, 64]
EMBED = "model.embed_tokens.weight"


def header_edit(edit, tensor: str = WQ):
    """edit(header, tensor name, body) changes the header of the shard that holds the tensor;
    it may return new body bytes."""
    def mutate(ctx, work):
        folder = clone(ctx["hf"], work)
        path = shard_of(folder, tensor)
        header, body = split(path)
        out = edit(header, tensor, body)
        replace(path, join(header, out if isinstance(out, bytes) else body))
        return folder
    return mutate


def shard_raw(make):
    """make(file bytes) -> new file bytes, for the shard holding WQ."""
    def mutate(ctx, work):
        folder = clone(ctx["hf"], work)
        path = shard_of(folder, WQ)
        replace(path, make(path.read_bytes()))
        return folder
    return mutate


def entry_set(**values):
    def edit(h, t, body):
        h[t].update(values)
    return edit


def offsets(f):
    def edit(h, t, body):
        begin, end = h[t]["data_offsets"]
        h[t]["data_offsets"] = f(begin, end, len(body))
    return edit


def same_size_pair(h):
    """Two tensors of the header with the same byte count (the layers' norms)."""
    by_size = {}
    for name, info in sorted(h.items()):
        if name == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        if size in by_size:
            return by_size[size], name
        by_size[size] = name
    raise AssertionError("no two tensors of one size")


def overlap_whole(h, t, body):
    a, b = same_size_pair(h)
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def overlap_part(h, t, body):
    a, b = same_size_pair(h)
    begin, end = h[a]["data_offsets"]
    size = end - begin
    start = begin + size // 2
    if start + size > len(body):
        start = begin - size // 2
    h[b]["data_offsets"] = [start, start + size]


def extra_tensor(dtype, shape, nbytes):
    def edit(h, t, body):
        h["my.extra.tensor"] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + nbytes]}
        return body + b"\x01" * nbytes
    return edit


def meta(value):
    def edit(h, t, body):
        h["__metadata__"] = value
    return edit


HEADER_EDITS = [
    ("dtype 5", entry_set(dtype=5), LIE),
    ("dtype null", entry_set(dtype=None), LIE),
    ("dtype F32 for BF16 bytes", entry_set(dtype="F32"), LIE),
    ("dtype F64 for BF16 bytes", entry_set(dtype="F64"), LIE),
    ("dtype I32", entry_set(dtype="I32"), LIE),
    ("dtype U8 (right byte count, unreadable)", lambda h, t, b: h[t].update(
        dtype="U8", shape=[h[t]["shape"][0], 2 * h[t]["shape"][1]]), LIE),
    ("dtype 'bf16' lower case", entry_set(dtype="bf16"), LIE),
    ("dtype F16 for BF16 bytes (same size)", entry_set(dtype="F16"), HARMLESS),
    ("shape negative", entry_set(shape=[-64, -64]), LIE),
    ("shape floats", entry_set(shape=[64.0, 64.0]), LIE),
    ("shape a string", entry_set(shape="64,64"), LIE),
    ("shape 2^40 x 2^40", entry_set(shape=[2 ** 40, 2 ** 40]), LIE),
    ("shape 2^64", entry_set(shape=[2 ** 64]), LIE),
    ("shape overflowing int64 products", entry_set(shape=[2 ** 31, 2 ** 31, 2 ** 31, 2]), LIE),
    ("shape 9 dimensions", entry_set(shape=[1] * 7 + [64, 64]), LIE),
    ("shape transposed count kept [32, 128]", entry_set(shape=[32, 128]), LIE),
    ("shape [4096] (same count, flat)", entry_set(shape=[4096]), LIE),
    ("shape [] (a scalar)", entry_set(shape=[]), LIE),
    ("shape null", entry_set(shape=None), LIE),
    ("offsets negative (header read as weights)", offsets(lambda b, e, n: [b - 200, e - 200]), LIE),
    ("offsets begin > end", offsets(lambda b, e, n: [e, b]), LIE),
    ("offsets past the end", offsets(lambda b, e, n: [n - (e - b) + 2, n + 2]), LIE),
    ("offsets [0, 2^64-1]", offsets(lambda b, e, n: [0, 2 ** 64 - 1]), LIE),
    ("offsets [2^63, 2^63+8192]", offsets(lambda b, e, n: [2 ** 63, 2 ** 63 + e - b]), LIE),
    ("offsets floats", offsets(lambda b, e, n: [float(b), float(e)]), LIE),
    ("offsets strings", offsets(lambda b, e, n: [str(b), str(e)]), LIE),
    ("offsets three", offsets(lambda b, e, n: [b, e, e]), LIE),
    ("offsets one", offsets(lambda b, e, n: [b]), LIE),
    ("offsets a dict", offsets(lambda b, e, n: {"begin": b, "end": e}), LIE),
    ("offsets shifted by 2 (byte count kept, overlaps)", offsets(lambda b, e, n: [b + 2, e + 2]), LIE),
    ("offsets one byte short", offsets(lambda b, e, n: [b, e - 1]), LIE),
    ("two tensors on the same bytes", overlap_whole, LIE),
    ("two tensors overlapping by half", overlap_part, LIE),
    ("entry a list", lambda h, t, b: h.update({t: [1, 2]}), LIE),
    ("entry null", lambda h, t, b: h.update({t: None}), LIE),
    ("entry without data_offsets", lambda h, t, b: h[t].pop("data_offsets"), LIE),
    ("entry without dtype", lambda h, t, b: h[t].pop("dtype"), LIE),
    ("tensor renamed", lambda h, t, b: h.update({t + ".x": h.pop(t)}), LIE),
    ("tensor removed", lambda h, t, b: h.pop(t), LIE),
    ("__metadata__ a list", meta(["pt"]), LIE),
    ("__metadata__ {format: 5}", meta({"format": 5}), LIE),
    ("__metadata__ a string", meta("pt"), LIE),
    ("__metadata__ extra strings", meta({"format": "pt", "note": "\u00e9t\u00e9"}), HARMLESS),
    ("__metadata__ removed", lambda h, t, b: h.pop("__metadata__", None), HARMLESS),
    ("keys reversed", lambda h, t, b: [h.update({k: h.pop(k)}) for k in list(h)[::-1]], HARMLESS),
    ("extra unused I64 tensor", extra_tensor("I64", [2], 16), HARMLESS),
    ("extra unused tensor of an unknown dtype", extra_tensor("F4", [7], 4), HARMLESS),
    ("extra empty tensor", extra_tensor("F32", [0, 64], 0), HARMLESS),
    ("extra tensor with a lying byte count", extra_tensor("F32", [4], 8), LIE),
]
for name, edit, kind in HEADER_EDITS:
    add("safetensors header", name, kind, header_edit(edit), hf_checks(kind))


def header_length(n):
    return lambda data: struct.pack("<Q", n) + data[8:]


def padded_header(data: bytes) -> bytes:
    """Spaces after the JSON (the format pads headers so), the data after them."""
    (n,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", n + 64) + data[8:8 + n] + b" " * 64 + data[8 + n:]


def raw_header(text: bytes):
    return lambda data: join(None, data[8 + struct.unpack("<Q", data[:8])[0]:], raw=text)


RAW_SHARD = [
    ("header length 0", header_length(0), LIE),
    ("header length 1", header_length(1), LIE),
    ("header length past the end", lambda d: struct.pack("<Q", len(d)) + d[8:], LIE),
    ("header length 2^63", header_length(2 ** 63), LIE),
    ("header length 2^64-1", header_length(2 ** 64 - 1), LIE),
    ("header length one short", lambda d: struct.pack("<Q", struct.unpack("<Q", d[:8])[0] - 1) + d[8:], LIE),
    ("header a list", raw_header(b"[1, 2, 3]"), LIE),
    ("header a string", raw_header(b'"tensors"'), LIE),
    ("header null", raw_header(b"null"), LIE),
    ("header not JSON", raw_header(b"{not json at all"), LIE),
    ("header invalid UTF-8", raw_header(b'{"\xff\xfe": 1}'), LIE),
    ("header nested 100000 deep", raw_header(DEEP), LIE),
    ("header with NaN", raw_header(b'{"x": NaN}'), LIE),
    ("file truncated by 1000 bytes", lambda d: d[:-1000], LIE),
    ("file truncated to 5 bytes", lambda d: d[:5], LIE),
    ("file empty", lambda d: b"", LIE),
    ("file of zeros", lambda d: bytes(len(d)), LIE),
    ("file of random bytes", lambda d: random.Random(1).randbytes(len(d)), LIE),
    ("header padded with 64 spaces", padded_header, HARMLESS),
    ("header length +64 (swallows data)", lambda d: struct.pack("<Q", struct.unpack("<Q", d[:8])[0] + 64) + d[8:],
     LIE),
    ("file with 4 KiB appended", lambda d: d + bytes(4096), HARMLESS),
]
for name, make, kind in RAW_SHARD:
    add("safetensors file", name, kind, shard_raw(make), hf_checks(kind))


# -- index files -----------------------------------------------------------------------------------

def index_edit(edit):
    """edit(index, folder, work) changes model.safetensors.index.json."""
    def mutate(ctx, work):
        folder = clone(ctx["hf"], work)
        path = folder / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        out = edit(index, folder, work)
        replace(path, out if isinstance(out, bytes) else dumps(index))
        return folder
    return mutate


def remap(target, tensor=NORM):
    def edit(index, folder, work):
        index["weight_map"][tensor] = target(folder, work) if callable(target) else target
    return edit


def outside_copy(folder, work):
    """A copy of the norm's shard outside the folder, and a symlink to it inside."""
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][NORM]
    shutil.copy(shard, work / "outside.safetensors")
    os.symlink(work / "outside.safetensors", folder / "evil.safetensors")
    return "evil.safetensors"


def inside_alias(folder, work):
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][NORM]
    os.symlink(shard, folder / "alias.safetensors")
    return "alias.safetensors"


def outside_plain(folder, work):
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][NORM]
    shutil.copy(shard, work / "outside.safetensors")
    return "../outside.safetensors"


def other_shard(folder, work):
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted(set(weight_map.values()) - {weight_map[NORM]})[0]


INDEX_EDITS = [
    ("../ to a copy outside", remap(outside_plain), LIE),
    ("../x.safetensors", remap("../x.safetensors"), LIE),
    ("/etc/passwd", remap("/etc/passwd"), LIE),
    ("absolute path to a shard", remap(lambda f, w: str(shard_of(f, NORM))), LIE),
    ("sub/../../x.safetensors", remap("sub/../../x.safetensors"), LIE),
    ("backslash ..\\x.safetensors", remap("..\\x.safetensors"), LIE),
    ("NUL in the name", remap("model\x00.safetensors"), LIE),
    ("empty name", remap(""), LIE),
    ("name 5", remap(5), LIE),
    ("name null", remap(None), LIE),
    ("./ prefix", remap(lambda f, w: "./" + shard_of(f, NORM).name), LIE),
    ("x.bin (not safetensors)", remap("pytorch_model.bin"), LIE),
    ("symlink to a copy outside", remap(outside_copy), LIE),
    ("unused entry pointing outside", remap("../../etc/shadow.safetensors", "my.unused.tensor"), LIE),
    ("missing file", remap("model-99999-of-99999.safetensors"), LIE),
    ("shard without the tensor", remap(other_shard), LIE),
    ("weight_map a list", lambda i, f, w: i.update(weight_map=[NORM]), LIE),
    ("weight_map missing", lambda i, f, w: i.pop("weight_map"), LIE),
    ("weight_map null", lambda i, f, w: i.update(weight_map=None), LIE),
    ("index a list", lambda i, f, w: b"[1]", LIE),
    ("index not JSON", lambda i, f, w: b"{weight_map", LIE),
    ("index nested 100000 deep", lambda i, f, w: DEEP, LIE),
    ("a tensor missing", lambda i, f, w: i["weight_map"].pop(WQ), LIE),
    ("symlink inside the folder", remap(inside_alias), HARMLESS),
    ("metadata changed", lambda i, f, w: i.update(metadata={"total_size": 1, "note": "x"}), HARMLESS),
    ("unused entry to a real shard", remap(lambda f, w: shard_of(f, NORM).name, "my.unused.tensor"), HARMLESS),
    ("entries reversed", lambda i, f, w: i.update(weight_map=dict(reversed(list(i["weight_map"].items())))),
     HARMLESS),
]
for name, edit, kind in INDEX_EDITS:
    add("index file", name, kind, index_edit(edit), hf_checks(kind))


# -- manifests -------------------------------------------------------------------------------------

EXPERT = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
EXPERT_FILE = "experts/L000-E001.bin"
WO = "model.layers.1.self_attn.o_proj.weight"
DENSE_NORM = "model.layers.1.post_attention_layernorm.weight"


def tensor_set(name=EXPERT, **values):
    def edit(m, folder):
        m["tensors"][name].update(values)
    return edit


def tensor_shift(delta, name=EXPERT, key="offset"):
    def edit(m, folder):
        m["tensors"][name][key] += delta
    return edit


def fake_experts(n):
    """The known attack: thousands of listed expert files make the model look huge, so the expert
    cache turns itself on and sizes its slots by them."""
    def edit(m, folder):
        for i in range(n):
            m["files"][f"experts/L{900 + i // 100:03d}-E{i % 100:03d}.bin"] = {"size": 10 ** 9, "sha256": "0" * 64}
    return edit


def file_set(file=EXPERT_FILE, **values):
    def edit(m, folder):
        m["files"][file].update(values)
    return edit


def top(**values):
    def edit(m, folder):
        m.update(values)
    return edit


def top_del(key):
    def edit(m, folder):
        m.pop(key)
    return edit


def swap_files(m, folder):
    """Two experts' tensors pointed at each other's files (offsets kept)."""
    a = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    b = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    m["tensors"][a]["file"], m["tensors"][b]["file"] = m["tensors"][b]["file"], m["tensors"][a]["file"]


def rename_tensor(m, folder):
    m["tensors"][EXPERT.replace("experts.1", "experts.9")] = m["tensors"].pop(EXPERT)


def add_tensor(m, folder):
    m["tensors"]["model.layers.5.self_attn.q_proj.weight"] = dict(m["tensors"][WO])


def requantized(m, folder):
    """q8 written where q4 is, with nbytes and every later offset in the file recomputed: a
    manifest consistent with itself but not with its file's bytes or size."""
    t = m["tensors"][EXPERT]
    t["dtype"] = "q8"
    t["nbytes"] = t["nbytes"] * 2


def transposed(m, folder):
    m["tensors"][EXPERT]["shape"] = m["tensors"][EXPERT]["shape"][::-1]


def doubled_rows(m, folder):
    rows, cols = m["tensors"][EXPERT]["shape"]
    m["tensors"][EXPERT]["shape"] = [2 * rows, cols]


def size_doubled(m, folder):
    m["files"][EXPERT_FILE]["size"] *= 2


def size_one_page_less(m, folder):
    m["files"][EXPERT_FILE]["size"] -= 4096


def keys_reversed(m, folder):
    for key in list(m)[::-1]:
        m[key] = m.pop(key)


MANIFEST_EDITS = [
    # tensors
    ("offset +64 (moved)", tensor_shift(64), LIE),
    ("offset -64", tensor_shift(-64), LIE),
    ("offset 2^62", tensor_set(offset=2 ** 62), LIE),
    ("offset 2^64-1", tensor_set(offset=2 ** 64 - 1), LIE),
    ("offset -2^63", tensor_set(offset=-2 ** 63), LIE),
    ("offset '0'", tensor_set(offset="0"), LIE),
    ("offset 1.5", tensor_set(offset=1.5), LIE),
    ("offset null", tensor_set(offset=None), LIE),
    ("offset of a dense tensor +4096", tensor_shift(4096, WO), LIE),
    ("offset of a norm +4", tensor_shift(4, DENSE_NORM), LIE),
    ("offset true", tensor_set(name="model.layers.0.block_sparse_moe.experts.1.w1.weight", offset=False), LIE),
    ("nbytes +1", tensor_shift(1, key="nbytes"), LIE),
    ("nbytes -1", tensor_shift(-1, key="nbytes"), LIE),
    ("nbytes 2^62", tensor_set(nbytes=2 ** 62), LIE),
    ("nbytes '27648'", lambda m, f: m["tensors"][EXPERT].update(nbytes=str(m["tensors"][EXPERT]["nbytes"])), LIE),
    ("shape transposed", transposed, LIE),
    ("shape doubled rows", doubled_rows, LIE),
    ("shape [1, 1]", tensor_set(shape=[1, 1]), LIE),
    ("shape 3 dims", tensor_set(shape=[64, 2, 64]), LIE),
    ("shape strings", tensor_set(shape=["64", "128"]), LIE),
    ("shape 2^40 rows", tensor_set(shape=[2 ** 40, 128]), LIE),
    ("shape null", tensor_set(shape=None), LIE),
    ("shape of the embeddings [64, 32000]", tensor_set(name=EMBED, shape=[64, 32000]), LIE),
    ("dtype q2", tensor_set(dtype="q2"), LIE),
    ("dtype q3", tensor_set(dtype="q3"), LIE),
    ("dtype q16", tensor_set(dtype="q16"), LIE),
    ("dtype q0", tensor_set(dtype="q0"), LIE),
    ("dtype f16", tensor_set(dtype="f16"), LIE),
    ("dtype 'q4 '", tensor_set(dtype="q4 "), LIE),
    ("dtype 4", tensor_set(dtype=4), LIE),
    ("dtype f32 for a quantized matrix", tensor_set(dtype="f32", group_size=None), LIE),
    ("dtype q8 where q4 (nbytes doubled)", requantized, LIE),
    ("dtype q4 for a norm", tensor_set(name=DENSE_NORM, dtype="q4", group_size=64), LIE),
    ("group size 32 where 64", tensor_set(group_size=32), LIE),
    ("group size 0", tensor_set(group_size=0), LIE),
    ("group size 7", tensor_set(group_size=7), LIE),
    ("group size 256", tensor_set(group_size=256), LIE),
    ("group size null on a quantized matrix", tensor_set(group_size=None), LIE),
    ("group size '64'", tensor_set(group_size="64"), LIE),
    ("group size true", tensor_set(group_size=True), LIE),
    ("group size 64.0", tensor_set(group_size=64.0), LIE),
    ("shape floats", lambda m, f: m["tensors"][EXPERT].update(shape=[float(n) for n in m["tensors"][EXPERT]["shape"]]),
     LIE),
    ("offset as a float of the right value", lambda m, f: m["tensors"][EXPERT].update(
        offset=float(m["tensors"][EXPERT]["offset"])), LIE),
    ("group size 64 on a norm", tensor_set(name=DENSE_NORM, group_size=64), LIE),
    ("file of another expert", tensor_set(file="experts/L000-E002.bin"), LIE),
    ("two experts' files swapped", swap_files, LIE),
    ("file dense.bin for an expert", tensor_set(file="dense.bin"), LIE),
    ("file ../x", tensor_set(file="../x"), LIE),
    ("file /etc/passwd", tensor_set(file="/etc/passwd"), LIE),
    ("file 5", tensor_set(file=5), LIE),
    ("sha256 not hex", tensor_set(sha256="z" * 64), LIE),
    ("sha256 5", tensor_set(sha256=5), LIE),
    ("tensor entry a list", lambda m, f: m["tensors"].update({EXPERT: [1, 2]}), LIE),
    ("tensor removed", lambda m, f: m["tensors"].pop(EXPERT), LIE),
    ("tensor renamed", rename_tensor, LIE),
    ("tensor added", add_tensor, LIE),
    ("tensors a list", top(tensors=[]), LIE),
    ("tensors empty", top(tensors={}), LIE),
    # files
    ("5000 fake expert files", fake_experts(5000), LIE),
    ("one fake expert file", fake_experts(1), LIE),
    ("file entry removed", lambda m, f: m["files"].pop(EXPERT_FILE), LIE),
    ("tokenizer entry removed", lambda m, f: m["files"].pop("tokenizer.model"), LIE),
    ("expert file size doubled", size_doubled, LIE),
    ("expert file size 4096 less", size_one_page_less, LIE),
    ("dense size 2^62", file_set("dense.bin", size=2 ** 62), LIE),
    ("tokenizer size 10^12", file_set("tokenizer.model", size=10 ** 12), LIE),
    ("size -1", file_set(size=-1), LIE),
    ("size '86016'", lambda m, f: m["files"][EXPERT_FILE].update(size=str(m["files"][EXPERT_FILE]["size"])), LIE),
    ("size 1.5", file_set(size=1.5), LIE),
    ("file sha256 missing", lambda m, f: m["files"][EXPERT_FILE].pop("sha256"), LIE),
    ("file entry a string", lambda m, f: m["files"].update({EXPERT_FILE: "x"}), LIE),
    ("file ../../etc/passwd listed", lambda m, f: m["files"].update(
        {"../../etc/passwd": {"size": 4096, "sha256": "0" * 64}}), LIE),
    ("files a list", top(files=[]), LIE),
    # the rest
    ("format_version 0", top(format_version=0), LIE),
    ("format_version 2", top(format_version=2), LIE),
    ("format_version '1'", top(format_version="1"), LIE),
    ("format_version true", top(format_version=True), LIE),
    ("format_version 1.0", top(format_version=1.0), LIE),
    ("format_version missing", top_del("format_version"), LIE),
    ("format gguf", top(format="gguf"), LIE),
    ("config missing", top_del("config"), LIE),
    ("config a list", top(config=[1]), LIE),
    ("config a string", top(config="mixtral"), LIE),
    ("quantization a list", top(quantization=[4]), LIE),
    ("quantization missing", top_del("quantization"), LIE),
    ("quantization.group_size 'x'", lambda m, f: m["quantization"].update(group_size="x"), LIE),
    ("created 5", top(created=5), LIE),
    ("source a string", top(source="acme"), LIE),
    ("tokenizer other.model", top(tokenizer="other.model"), LIE),
    ("a list", lambda m, f: b"[1, 2]", LIE),
    ("truncated", lambda m, f: dumps(m)[:1000], LIE),
    ("empty", lambda m, f: b"", LIE),
    ("NaN somewhere", lambda m, f: m.update(extra=NAN), LIE),
    ("nested 100000 deep", lambda m, f: DEEP, LIE),
    ("invalid UTF-8", lambda m, f: dumps(m).replace(b'"localmix"', b'"\xff\xfe"', 1), LIE),
    # harmless
    ("keys reversed", keys_reversed, HARMLESS),
    ("tensors reversed", lambda m, f: m.update(tensors=dict(reversed(list(m["tensors"].items())))), HARMLESS),
    ("unknown key", top(my_note={"why": "testing"}), HARMLESS),
    ("created changed", top(created="1999-01-01T00:00:00+00:00"), HARMLESS),
    ("source changed", top(source={"repo": "elsewhere/x", "revision": "abc"}), HARMLESS),
    ("quantization.method changed", lambda m, f: m["quantization"].update(method="by hand"), HARMLESS),
    ("compact JSON", lambda m, f: json.dumps(m, separators=(",", ":")).encode(), HARMLESS),
    ("format key missing", top_del("format"), HARMLESS),
]
for name, edit, kind in MANIFEST_EDITS:
    add("manifest", name, kind, manifest_edit(edit), lm_checks(kind))

# The lies that reached the Numba kernels and the expert cache before manifests were checked.
NUMBA_EDITS = [
    ("5000 fake expert files (numba, memory chosen)", fake_experts(5000), LIE, dict(numba=True)),
    ("5000 fake expert files (numba, cache)", fake_experts(5000), LIE, dict(numba=True, cache=True)),
    ("expert shape doubled rows (numba, cache)", doubled_rows, LIE, dict(numba=True, cache=True)),
    ("expert shape transposed (numba)", transposed, LIE, dict(numba=True)),
    ("offset +64 (numba, cache)", tensor_shift(64), LIE, dict(numba=True, cache=True)),
    ("offset 2^62 (numba)", tensor_set(offset=2 ** 62), LIE, dict(numba=True)),
    ("expert file size doubled (numba, cache)", size_doubled, LIE, dict(numba=True, cache=True)),
    ("dtype q8 where q4 (numba, cache)", requantized, LIE, dict(numba=True, cache=True)),
    ("group size 32 where 64 (numba)", tensor_set(group_size=32), LIE, dict(numba=True)),
    ("unchanged (numba, cache)", lambda m, f: None, HARMLESS, dict(numba=True, cache=True)),
    ("keys reversed (numba)", keys_reversed, HARMLESS, dict(numba=True)),
]
for name, edit, kind, options in NUMBA_EDITS:
    add("manifest", name, kind, manifest_edit(edit), lm_checks(kind, **options))


# -- expert files and the dense file (payload under an intact manifest) ----------------------------

def payload(edit, file=EXPERT_FILE):
    """edit(path, folder, work) changes a file of the localmix model."""
    def mutate(ctx, work):
        folder = clone(ctx["lm"], work)
        edit(folder / file, folder, work)
        return folder
    return mutate


def rewrite_bytes(f):
    def edit(path, folder, work):
        replace(path, f(bytearray(path.read_bytes()), folder))
    return edit


def flip(offset):
    def f(data, folder):
        data[offset] ^= 0xFF
        return bytes(data)
    return f


def part_of(name, part, value: bytes):
    """Fill a tensor's part (scales or biases) with a repeated float16 value."""
    def f(data, folder):
        t = json.loads((folder / "manifest.json").read_text())["tensors"][name]
        rows, cols = t["shape"]
        words = rows * cols * int(t["dtype"][1:]) // 8
        at = t["offset"] + -(-words // 64) * 64
        n = rows * cols // t["group_size"] * 2
        if part == "biases":
            at += -(-n // 64) * 64
        data[at:at + n] = value * (n // 2)
        return bytes(data)
    return f


def symlink_to(target):
    def edit(path, folder, work):
        dest = target(folder, work)
        path.unlink()
        os.symlink(dest, path)
    return edit


def outside_expert(folder, work):
    shutil.copy(folder / EXPERT_FILE, work / "outside.bin")
    return work / "outside.bin"


def as_directory(path, folder, work):
    path.unlink()
    path.mkdir()


def as_fifo(path, folder, work):
    path.unlink()
    os.mkfifo(path)


def truncate_layer(layer, size):
    def mutate(ctx, work):
        folder = clone(ctx["lm"], work)
        for path in sorted((folder / "experts").glob(f"L{layer:03d}-E*.bin")):
            replace(path, path.read_bytes()[:size])
        return folder
    return mutate


F16_NAN, F16_INF, F16_MAX = b"\x00\x7e", b"\x00\x7c", b"\xff\x7b"
PAYLOAD_EDITS = [
    ("expert word flipped", payload(rewrite_bytes(flip(100))), "payload", {}),
    ("expert word flipped (numba, cache)", payload(rewrite_bytes(flip(100))), "payload", dict(numba=True, cache=True)),
    ("expert zero-filled", payload(rewrite_bytes(lambda d, f: bytes(len(d)))), "payload", {}),
    ("expert scales NaN", payload(rewrite_bytes(part_of(EXPERT, "scales", F16_NAN))), "payload", {}),
    ("expert scales NaN (numba)", payload(rewrite_bytes(part_of(EXPERT, "scales", F16_NAN))), "payload",
     dict(numba=True)),
    ("expert scales Inf (numba, cache)", payload(rewrite_bytes(part_of(EXPERT, "scales", F16_INF))), "payload",
     dict(numba=True, cache=True)),
    ("expert biases 65504", payload(rewrite_bytes(part_of(EXPERT, "biases", F16_MAX))), "payload", {}),
    ("embeddings scales NaN", payload(rewrite_bytes(part_of(EMBED, "scales", F16_NAN)), "dense.bin"), "payload", {}),
    ("embeddings scales NaN (numba)", payload(rewrite_bytes(part_of(EMBED, "scales", F16_NAN)), "dense.bin"),
     "payload", dict(numba=True)),
    ("dense.bin byte flipped", payload(rewrite_bytes(flip(5000)), "dense.bin"), "payload", {}),
    ("dense.bin all 0xFF", payload(rewrite_bytes(lambda d, f: b"\xff" * len(d)), "dense.bin"), "payload", {}),
    ("dense.bin all 0xFF (numba)", payload(rewrite_bytes(lambda d, f: b"\xff" * len(d)), "dense.bin"), "payload",
     dict(numba=True)),
    ("symlink to another expert's file", payload(symlink_to(lambda f, w: "L000-E002.bin")), "payload", {}),
    ("expert truncated to 1000 bytes", payload(rewrite_bytes(lambda d, f: bytes(d[:1000]))), LIE, {}),
    ("expert truncated to 1000 bytes (numba, cache)", payload(rewrite_bytes(lambda d, f: bytes(d[:1000]))), LIE,
     dict(numba=True, cache=True)),
    ("layer 0's experts truncated (cache: mid-answer)", truncate_layer(0, 1000), LIE, dict(numba=True, cache=True)),
    ("layer 1's experts truncated by a page (cache)", truncate_layer(1, -4096), LIE, dict(numba=True, cache=True)),
    ("expert emptied", payload(rewrite_bytes(lambda d, f: b"")), LIE, {}),
    ("expert 4 KiB longer", payload(rewrite_bytes(lambda d, f: bytes(d) + bytes(4096))), LIE, {}),
    ("expert deleted", payload(lambda p, f, w: p.unlink()), LIE, {}),
    ("expert deleted (numba, cache)", payload(lambda p, f, w: p.unlink()), LIE, dict(numba=True, cache=True)),
    ("expert a directory", payload(as_directory), LIE, {}),
    ("expert a FIFO", payload(as_fifo), LIE, {}),
    ("expert a FIFO (numba, cache)", payload(as_fifo), LIE, dict(numba=True, cache=True)),
    ("dense.bin a FIFO", payload(as_fifo, "dense.bin"), LIE, {}),
    ("expert a symlink out (same bytes)", payload(symlink_to(outside_expert)), LIE, {}),
    ("expert a symlink to /dev/zero", payload(symlink_to(lambda f, w: "/dev/zero")), LIE, {}),
    ("dense.bin truncated by a page", payload(rewrite_bytes(lambda d, f: bytes(d[:-4096])), "dense.bin"), LIE, {}),
    ("dense.bin deleted", payload(lambda p, f, w: p.unlink(), "dense.bin"), LIE, {}),
    ("dense.bin a symlink to /dev/zero", payload(symlink_to(lambda f, w: "/dev/zero"), "dense.bin"), LIE, {}),
    ("experts folder a symlink out", lambda ctx, work: _experts_out(ctx, work), LIE, {}),
]


def _experts_out(ctx, work):
    folder = clone(ctx["lm"], work)
    shutil.move(folder / "experts", work / "experts-outside")
    os.symlink(work / "experts-outside", folder / "experts")
    return folder


for name, mutate, kind, options in PAYLOAD_EDITS:
    add("model files", name, kind, mutate, lm_checks(kind, **options))


# -- tokenizers ------------------------------------------------------------------------------------

def proto_edit(edit):
    """A sentencepiece model, parsed and edited as protobuf (a crafted but well-formed file)."""
    def make(data: bytes, work: Path) -> bytes:
        from sentencepiece import sentencepiece_model_pb2 as pb
        model = pb.ModelProto()
        model.ParseFromString(data)
        edit(model)
        return model.SerializeToString()
    return make


def set_spec(**values):
    def edit(model):
        for key, value in values.items():
            setattr(model.trainer_spec, key, value)
    return edit


def byte_piece_renamed(model):
    from sentencepiece import sentencepiece_model_pb2 as pb
    for piece in model.pieces:
        if piece.type == pb.ModelProto.SentencePiece.BYTE:
            piece.piece = "<0xZZ>"
            return
    raise AssertionError("no byte piece")


def normal_bos(model):
    model.pieces[1].type = model.pieces[1].NORMAL


def drop_last_pieces(model):
    del model.pieces[-500:]


def score_changed(model):
    model.pieces[1000].score = -1.5


TOKENIZER_EDITS = [
    ("random bytes", lambda d, w: random.Random(2).randbytes(5000), LIE),
    ("truncated to half", lambda d, w: d[:len(d) // 2], LIE),
    ("truncated to 10 bytes", lambda d, w: d[:10], LIE),
    ("empty", lambda d, w: b"", LIE),
    ("zeros", lambda d, w: bytes(1000), LIE),
    ("a JSON file", lambda d, w: b'{"model": {"type": "BPE"}}', LIE),
    ("a larger vocabulary (32768 for 32000)", lambda d, w: _v3(), LIE),
    ("no BOS piece", proto_edit(set_spec(bos_piece="<none>")), LIE),
    ("no EOS piece", proto_edit(set_spec(eos_piece="<none>")), LIE),
    ("BOS a normal piece", proto_edit(normal_bos), LIE),
    # sentencepiece takes the ids from the pieces, not from these numbers
    ("trainer_spec.bos_id 99999", proto_edit(set_spec(bos_id=99999)), HARMLESS),
    ("trainer_spec.eos_id -1", proto_edit(set_spec(eos_id=-1)), HARMLESS),
    ("byte piece named <0xZZ>", proto_edit(byte_piece_renamed), LIE),
    ("reserialized", proto_edit(lambda m: None), HARMLESS),
    ("a piece's score changed", proto_edit(score_changed), HARMLESS),
    ("500 pieces fewer than the model's vocabulary", proto_edit(drop_last_pieces), HARMLESS),
]


def _v3() -> bytes:
    from conftest import TOKENIZER_V3
    return Path(TOKENIZER_V3).read_bytes()


def hf_tokenizer(make):
    def mutate(ctx, work):
        folder = clone(ctx["hf"], work)
        path = folder / "tokenizer.model"
        replace(path, make(path.read_bytes(), work))
        return folder
    return mutate


def lm_tokenizer(make):
    """The localmix model's tokenizer replaced and the manifest's hash and size updated to match, as a
    pull of a hub that served a broken tokenizer would have listed it: only loading it can tell."""
    def mutate(ctx, work):
        import hashlib
        folder = clone(ctx["lm"], work)
        path = folder / "tokenizer.model"
        data = make(path.read_bytes(), work)
        replace(path, data)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["tokenizer.model"] = {"size": max(1, len(data)), "sha256": hashlib.sha256(data).hexdigest()}
        replace(folder / "manifest.json", dumps(manifest))
        return folder
    return mutate


def check_tokenizer_only(kind):
    def run(folder):
        from localmix.tokenizer import check_tokenizer
        call = named(lambda: check_tokenizer(folder / "tokenizer.model", 32000, "hub acme/x"), "check_tokenizer")
        if kind == LIE:
            return refused_by_all(call)
        call()
    return run


for name, make, kind in TOKENIZER_EDITS:
    add("tokenizer", name, kind, hf_tokenizer(make), hf_checks(kind))
    add("tokenizer (check_tokenizer)", name, kind, hf_tokenizer(make), check_tokenizer_only(kind))
    if name != "empty":  # a listed file of size 0 is a manifest lie of its own (covered above)
        add("tokenizer (localmix model)", name, kind, lm_tokenizer(make), lm_checks(kind))


def tokenizer_special(what):
    def mutate(ctx, work):
        folder = clone(ctx["hf"], work)
        path = folder / "tokenizer.model"
        path.unlink()
        if what == "directory":
            path.mkdir()
        elif what == "dev/zero":
            os.symlink("/dev/zero", path)
        elif what == "fifo":
            os.mkfifo(path)
        elif what == "huge":
            with open(path, "wb") as f:
                f.truncate(65 * 1024 * 1024)
        return folder
    return mutate


for what in ("missing", "directory", "dev/zero", "fifo", "huge"):
    add("tokenizer", what, LIE, tokenizer_special(what), hf_checks(LIE))


# -- the test --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from conftest import make_hf_model
    from localmix.quant.convert import LocalSource, convert

    root = tmp_path_factory.mktemp("fuzz-base")
    hf = root / "hf"
    make_hf_model(hf, dtype=torch.bfloat16, shard="300KB", intermediate_size=128)
    lm = convert(LocalSource(hf), root / "lm", bits="4")
    # Compile the Numba kernels here (or load them from Numba's cache), once: a child compiling them
    # on a cold cache would take most of a case's timeout.
    generate(lm, backend="numba")
    generate(lm, backend="numba", memory=budget(str(lm)))
    return {"hf": str(hf), "lm": str(lm)}


def test_the_base_models_are_honest(models):
    """The cases' premise: unchanged, both models load, generate and verify."""
    from localmix.store import verify
    import localmix
    for folder in models.values():
        localmix.load(folder, backend="numpy").generate(PROMPT, max_tokens=2)
    assert verify(models["lm"]) == []


def test_crafted_files(models, tmp_path):
    assert len(CASES) >= 250
    report = run_cases("test_fuzz_files", CASES, context=models, workdir=tmp_path, timeout_s=60,
                       memory_mb=4096, workers=2, env={"FUZZ_LM_BASE": models["lm"]})
    counts = report.counts()
    print()
    print(report.summary("crafted model files"))
    groups: dict[str, Counter] = {}
    for name, (outcome, _) in report.outcomes.items():
        groups.setdefault(name.split(":")[0], Counter())[outcome] += 1
    for group, outcomes in sorted(groups.items()):
        print(f"  {group}: {sum(outcomes.values())} ({', '.join(f'{o} {n}' for o, n in sorted(outcomes.items()))})")
    report.assert_clean()
    assert counts["refused"] + counts["accepted"] == len(CASES)
