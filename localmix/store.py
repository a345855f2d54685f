"""The localmix model folder: one file per expert, one for everything dense, and a manifest.

    NAME/manifest.json          format version, source, config, and for every tensor its file,
                                offset, shape, dtype, group size, byte size and SHA-256
    NAME/dense.bin              embeddings, attention, norms, routers, lm_head
    NAME/experts/L000-E000.bin  one expert's w1, w2, w3 (a dense MLP is expert 0 of its layer)
    NAME/tokenizer.model, NAME/config.json

A quantized tensor is its packed uint32 words, then its float16 scales, then its float16 biases
(MLX's three arrays). Every part starts on a 64-byte boundary and every file is padded to a
multiple of 4 KiB, so one aligned read brings a whole expert in. Norms and routers stay float32.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localmix.checkpoint import tokenizer_file
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.quant.affine import dequantize

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.bin"
PART_ALIGN = 64
FILE_ALIGN = 4096

_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe\.experts\.(\d+)\.|mlp\.)")


def expert_file(name: str) -> str:
    """The file a tensor lives in: its expert's own, or the dense file."""
    m = _EXPERT.match(name)
    return f"experts/L{int(m[1]):03d}-E{int(m[2] or 0):03d}.bin" if m else DENSE_FILE


_EXPERT_MATRIX = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def expert_matrix(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, "w1", "w2" or "w3") of a mixture-of-experts expert's matrix; None otherwise."""
    m = _EXPERT_MATRIX.match(name)
    return (int(m[1]), int(m[2]), m[3]) if m else None


def stays_float(name: str) -> bool:
    """Norms and routers are small and sensitive: they are kept in float32."""
    return name.endswith("norm.weight") or name.endswith("block_sparse_moe.gate.weight")


def align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class TensorLayout:
    """Where a tensor's bytes lie in its file, and how to read them."""
    name: str
    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str              # "f32", or "q4" / "q8" for quantized
    group_size: int | None

    @property
    def bits(self) -> int | None:
        return int(self.dtype[1:]) if self.dtype.startswith("q") else None

    @property
    def parts(self) -> list[tuple[str, int, int]]:
        """(part, offset, bytes) of each array, in file order."""
        if self.bits is None:
            return [("data", self.offset, 4 * int(np.prod(self.shape)))]
        rows, cols = self.shape
        sizes = [("words", rows * cols * self.bits // 8), ("scales", rows * cols // self.group_size * 2),
                 ("biases", rows * cols // self.group_size * 2)]
        parts, at = [], self.offset
        for part, size in sizes:
            parts.append((part, at, size))
            at = align(at + size, PART_ALIGN)
        return parts

    @property
    def nbytes(self) -> int:
        _, offset, size = self.parts[-1]
        return offset + size - self.offset

    def to_json(self, sha256: str) -> dict:
        return {"file": self.file, "offset": self.offset, "shape": list(self.shape), "dtype": self.dtype,
                "group_size": self.group_size, "nbytes": self.nbytes, "sha256": sha256}


def plan_layout(table: list[tuple[str, tuple[int, ...]]], bits_for, group_size: int) -> tuple[list[TensorLayout], dict[str, int]]:
    """Place every tensor of the table in its file. bits_for(name) gives 4 or 8 for a quantized
    tensor. Returns the layouts and each file's (4 KiB-padded) size."""
    layouts, ends = [], {}
    for name, shape in table:
        file = expert_file(name)
        if stays_float(name):
            dtype, gs = "f32", None
        else:
            if shape[1] % group_size:
                raise LocalmixError(f"tensor {name} has {shape[1]} columns, not a multiple of the group "
                                    f"size {group_size}; try --group-size 32")
            dtype, gs = f"q{bits_for(name)}", group_size
        layout = TensorLayout(name, file, ends.get(file, 0), shape, dtype, gs)
        layouts.append(layout)
        ends[file] = align(layout.offset + layout.nbytes, PART_ALIGN)
    return layouts, {file: align(end, FILE_ALIGN) for file, end in ends.items()}


@dataclass
class QuantizedMatrix:
    """A [rows, cols] matrix as MLX-layout packed words, float16 scales and biases (views of the
    model's files). `linear` is the reference product (dequantize, then BLAS); the Numba backend
    multiplies on the packed words instead (localmix.kernels)."""
    words: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int
    group_size: int
    source: str  # the file, named in errors
    addresses: list | None = None  # where words, scales and biases lie, once the kernels have asked
    transient: bool = False  # in an expert cache's slot: backends must not keep copies of it

    def linear(self, x: np.ndarray) -> np.ndarray:
        """x @ W.T for x [T, cols]."""
        return x @ self.dequantize().T

    @property
    def shape(self) -> tuple[int, int]:
        return self.words.shape[0], self.words.shape[1] * 32 // self.bits

    def dequantize(self, rows=slice(None)) -> np.ndarray:
        scales, biases = self.scales[rows], self.biases[rows]
        if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
            raise LocalmixError(f"{self.source}: corrupt quantized weights (non-finite scales); "
                                f"run `localmix verify` on this model")
        return dequantize(self.words[rows], scales, biases, self.bits, self.group_size)


def sha256_of(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = path.stat().st_size - offset if size is None else size
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 22))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def is_localmix_model(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LocalmixError(f"{path}: unreadable manifest; run `localmix verify` or pull the model again") from None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LocalmixError(f"{path}: format version {version} is newer than this localmix reads "
                            f"({FORMAT_VERSION}); upgrade localmix")
    return manifest


class ModelFolder:
    """A localmix model folder, opened without reading its weights: tensors are views of
    memory-mapped files, so opening costs no time proportional to the model's size."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.config = ModelArgs.from_hf_config(self.manifest["config"], source=str(self.folder / MANIFEST))
        self._maps: dict[str, np.memmap] = {}

    @property
    def tokenizer_path(self) -> Path:
        return tokenizer_file(self.folder, "run `localmix verify`")

    def _map(self, file: str, end: int) -> np.memmap:
        if file not in self._maps:
            path = self.folder / file
            expected = self.manifest["files"].get(file, {}).get("size")
            size = path.stat().st_size if path.is_file() else None
            if size is None or (expected is not None and size != expected) or size < end:
                state = "missing" if size is None else f"truncated or corrupt ({size} bytes, expected {expected})"
                raise LocalmixError(f"{path}: {state}; run `localmix verify` or pull the model again")
            self._maps[file] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[file]

    def tensor(self, name: str, shape: tuple[int, ...]):
        entry = self.manifest["tensors"].get(name)
        if entry is None:
            raise LocalmixError(f"{self.folder / MANIFEST}: tensor {name} is missing")
        layout = TensorLayout(name, entry["file"], entry["offset"], tuple(entry["shape"]), entry["dtype"],
                              entry["group_size"])
        if layout.shape != tuple(shape):
            raise LocalmixError(f"{self.folder / MANIFEST}: tensor {name} has shape {list(layout.shape)}, "
                                f"expected {list(shape)}")
        data = self._map(layout.file, layout.offset + layout.nbytes)
        views = {part: data[offset:offset + size] for part, offset, size in layout.parts}
        if layout.bits is None:
            return views["data"].view(np.float32).reshape(shape)
        rows = shape[0]
        return QuantizedMatrix(views["words"].view(np.uint32).reshape(rows, -1),
                               views["scales"].view(np.float16).reshape(rows, -1),
                               views["biases"].view(np.float16).reshape(rows, -1),
                               layout.bits, layout.group_size, str(self.folder / layout.file))


def verify(folder: str | Path) -> list[str]:
    """Re-hash every file and tensor against the manifest; the problems found (none: intact)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = []
    for file, entry in manifest["files"].items():
        path = folder / file
        if not path.is_file():
            problems.append(f"{file}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{file}: {path.stat().st_size} bytes, expected {entry['size']}")
        elif sha256_of(path) != entry["sha256"]:
            bad = [name for name, t in manifest["tensors"].items()
                   if t["file"] == file and sha256_of(path, t["offset"], t["nbytes"]) != t["sha256"]]
            problems.append(f"{file}: checksum mismatch" + (f" (tensors {', '.join(bad)})" if bad else ""))
    return problems


def model_summary(folder: str | Path) -> dict:
    """What `localmix show` and `list` print: architecture, parameters, quantization, bytes."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    args = ModelArgs.from_hf_config(manifest["config"])
    tensors = manifest["tensors"]
    params = {name: int(np.prod(t["shape"])) for name, t in tensors.items()}
    is_expert = {name: t["file"] != DENSE_FILE for name, t in tensors.items()}
    expert_params = sum(n for name, n in params.items() if is_expert[name])
    dense_params = sum(params.values()) - expert_params
    share = args.num_experts_per_tok / args.num_local_experts if args.is_moe else 1.0
    dense_bytes = manifest["files"][DENSE_FILE]["size"]
    expert_bytes = sum(f["size"] for file, f in manifest["files"].items() if file.startswith("experts/"))
    layers = args.num_hidden_layers
    return {
        "name": folder.name,
        "architecture": args.model_type,
        "layers": layers, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "attention_heads": args.num_attention_heads, "kv_heads": args.num_key_value_heads,
        "experts": args.num_local_experts, "experts_per_token": args.num_experts_per_tok,
        "context": args.max_position_embeddings, "vocab_size": args.vocab_size,
        "parameters": dense_params + expert_params,
        "active_parameters": int(dense_params + expert_params * share),
        "bits": manifest["quantization"]["bits"], "group_size": manifest["quantization"]["group_size"],
        "dense_bytes": dense_bytes, "expert_bytes": expert_bytes,
        "disk_bytes": sum(f["size"] for f in manifest["files"].values()),
        "source": manifest["source"], "created": manifest["created"],
    }
