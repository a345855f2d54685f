"""The edge between untrusted input and everything else.

Every file localmix reads (configs, safetensors headers and indexes, manifests, GGUF, mlx-lm
folders, tokenizers) and every request the server takes is untrusted. The checks that recur are
here, once: paths confined to their folder, JSON read with a size bound, and typed, bounded
values. Each failure is a LocalmixError naming the source and the key, so the CLI prints one
`error:` line and the server answers 4xx. Integers are Python ints (no overflow); a value that is
not exactly the type asked for (a bool for an int, a string for a bool, NaN for a float) is refused
rather than coerced, because coercion is how lies get accepted (`"false"` is truthy).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath

from localmix.errors import LocalmixError

# Bounds no real model comes near, but that keep a lying file from sizing an allocation.
MAX_JSON_BYTES = 64 * 1024 * 1024     # config.json, manifest.json, index files, tokenizer.json
MAX_DIM = 1 << 20                     # hidden, intermediate, vocab, head_dim, ...
MAX_LAYERS = 1024
MAX_HEADS = 4096
MAX_EXPERTS = 1 << 14
MAX_CONTEXT = 1 << 24


def confined(root: str | os.PathLike, relative: str, source: str) -> Path:
    """root/relative, refused unless it stays inside root: no absolute paths, no `..`, no
    backslashes or NUL, and no symlink that resolves outside root. `relative` comes from a file
    or a server (an index's weight_map, a manifest's file names, a hub's commit header)."""
    if not isinstance(relative, str) or not relative or len(relative) > 4096:
        raise LocalmixError(f"{source}: invalid file name {relative!r}")
    if "\\" in relative or "\x00" in relative or relative.startswith("/"):
        raise LocalmixError(f"{source}: file name {relative!r} is not a relative path inside the folder")
    parts = PurePosixPath(relative).parts
    if any(p in ("..", ".", "") for p in parts) or relative != "/".join(parts):
        raise LocalmixError(f"{source}: file name {relative!r} is not a relative path inside the folder")
    root = Path(root)
    path = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise LocalmixError(f"{source}: file name {relative!r} leads outside {root}")
    return path


def read_json(path: str | os.PathLike, what: str = "JSON file", max_bytes: int = MAX_JSON_BYTES):
    """A JSON file's value, read with a size bound; deep nesting and bad encodings are errors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise LocalmixError(f"{path}: no such file") from None
    except OSError as e:
        raise LocalmixError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise LocalmixError(f"{path}: {what} larger than {max_bytes} bytes")
    return parse_json(data, f"{path}", what)


def parse_json(data: bytes | str, source: str, what: str = "JSON"):
    """JSON as the standard has it: no NaN or Infinity, no number too large for a float (1e999)."""
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise LocalmixError(f"{source}: {what} nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LocalmixError(f"{source}: not valid {what} ({str(e)[:120]})") from None


def json_depth(value, limit: int, what: str) -> None:
    """Refuses a parsed JSON value nested more than `limit` levels of objects and lists (walked without
    recursion: what is done with it later, json.dumps or a template, recurses)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                raise LocalmixError(f"{what} is nested more than {limit} levels deep")
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large a number")
    return value


def json_object(value, source: str, what: str = "value") -> dict:
    if not isinstance(value, dict):
        raise LocalmixError(f"{source}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def integer(value, key: str, source: str, low: int = 0, high: int = 1 << 62) -> int:
    """An int (not a bool, not a float) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LocalmixError(f"{source}: {key} must be an integer, got {value!r:.60}")
    if not low <= value <= high:
        raise LocalmixError(f"{source}: {key} must be between {low} and {high}, got {value}")
    return value


def number(value, key: str, source: str, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite int or float within [low, high] (excluding low with low_open, high with high_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LocalmixError(f"{source}: {key} must be a number, got {value!r:.60}")
    value = float(value)
    if (not math.isfinite(value) or value < low or value > high or (low_open and value == low)
            or (high_open and value == high)):
        bound = f"{'above' if low_open else 'at least'} {low:g}" + (
            f" and {'below' if high_open else 'at most'} {high:g}" if high < math.inf else "")
        raise LocalmixError(f"{source}: {key} must be a finite number {bound}, got {value}")
    return value


def boolean(value, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise LocalmixError(f"{source}: {key} must be true or false, got {value!r:.60}")
    return value


def string(value, key: str, source: str, max_len: int = 1024) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise LocalmixError(f"{source}: {key} must be a string of at most {max_len} characters")
    return value


def shape(value, key: str, source: str, ndim: int | None = None, high: int = 1 << 40) -> tuple[int, ...]:
    """A list of non-negative ints (a tensor's shape), each at most `high`."""
    if not isinstance(value, list) or (ndim is not None and len(value) != ndim) or len(value) > 8:
        raise LocalmixError(f"{source}: {key} must be a list of {ndim or 'at most 8'} integers, got {value!r:.60}")
    return tuple(integer(v, key, source, 0, high) for v in value)
