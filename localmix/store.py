"""The localmix model folder: one file per expert, one for everything dense, and a manifest.

    NAME/manifest.json          format version, source, config, and for every tensor its file,
                                offset, shape, dtype, group size, byte size and SHA-256
    NAME/dense.bin              embeddings, attention, norms, routers, lm_head
    NAME/experts/L000-E000.bin  one routed expert's w1, w2, w3 (gate, down, up), and their float32
                                biases where it has them (gpt-oss); a dense model's MLP is
                                expert 0 of its layer
    NAME/tokenizer.model, NAME/config.json

A quantized tensor is its packed uint32 words, then its float16 scales, then its float16 biases
(MLX's three arrays). Every part starts on a 64-byte boundary and every file is padded to a
multiple of 4 KiB, so one aligned read brings a whole expert in. Norms and routers stay float32.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localmix import validate
from localmix.checkpoint import tensor_table
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.quant.affine import GROUP_SIZES, dequantize
from localmix.tokenizer import HF_SIDE_FILES, HF_TOKENIZER, SENTENCEPIECE, TOKENIZER_FILE_LIMITS, load_tokenizer
from localmix.validate import MAX_DIM

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DENSE_FILE = "dense.bin"
PART_ALIGN = 64
FILE_ALIGN = 4096

# A routed expert's matrix: Mixtral's block_sparse_moe.experts.E.w1/w2/w3, or the other families'
# mlp.experts.E.gate_proj/down_proj/up_proj. w1, w2, w3 below mean gate, down, up; b1, b2, b3 their
# biases (gpt-oss's experts have them: float32 in the expert's own file).
_EXPERT_MATRIX = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                            r"(w[123]\.weight|(?:gate_proj|down_proj|up_proj)\.(?:weight|bias))$")
_PART = {"w1.weight": "w1", "w2.weight": "w2", "w3.weight": "w3", "gate_proj.weight": "w1",
         "down_proj.weight": "w2", "up_proj.weight": "w3", "gate_proj.bias": "b1", "down_proj.bias": "b2",
         "up_proj.bias": "b3"}
_DENSE_MLP = re.compile(r"model\.layers\.(\d+)\.mlp\.(?:gate|down|up)_proj\.weight$")


def expert_matrix(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, "w1", "w2" or "w3") of a routed expert's matrix, (layer, expert, "b1", "b2" or
    "b3") of its bias; None otherwise."""
    m = _EXPERT_MATRIX.match(name)
    return (int(m[1]), int(m[2]), _PART[m[3]]) if m else None


def tensor_file(name: str, args: ModelArgs) -> str:
    """The file a tensor lives in: its expert's own, or the dense file. A dense model's MLP is expert
    0 of its layer; in a mixture, dense layers' MLPs and shared experts serve every token and stay in
    the dense file with the attention."""
    matrix = expert_matrix(name)
    if matrix:
        return f"experts/L{matrix[0]:03d}-E{matrix[1]:03d}.bin"
    dense_mlp = _DENSE_MLP.match(name)
    if dense_mlp and not args.is_moe:
        return f"experts/L{int(dense_mlp[1]):03d}-E000.bin"
    return DENSE_FILE


def stays_float(name: str) -> bool:
    """Norms, routers (and the shared expert's gate), biases and attention sinks are small and
    sensitive: they are kept in float32."""
    return name.endswith(("norm.weight", ".gate.weight", "shared_expert_gate.weight", "router.layer.weight",
                          "mlp.router.weight", ".bias", "self_attn.sinks"))


def align(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class TensorLayout:
    """Where a tensor's bytes lie in its file, and how to read them."""
    name: str
    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: str              # "f32", or "q2" / "q3" / "q4" / "q8" for quantized
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


def plan_layout(table: list[tuple[str, tuple[int, ...]]], bits_for, group_size: int,
                args: ModelArgs, fixed: dict[str, tuple[str, int]] | None = None
                ) -> tuple[list[TensorLayout], dict[str, int]]:
    """Place every tensor of the table in its file. bits_for(name) gives 4 or 8 for a quantized
    tensor; fixed: the (dtype, group size) of tensors whose format is given (MXFP4 experts: 8 bits
    in groups of 32, which hold them exactly). Returns the layouts and each file's (4 KiB-padded) size."""
    def format_of(name, shape):
        if fixed and name in fixed:
            return fixed[name]
        if stays_float(name):
            return "f32", None
        if shape[1] % group_size:
            raise LocalmixError(f"tensor {name} has {shape[1]} columns, not a multiple of the group "
                                f"size {group_size}; try --group-size 32")
        return f"q{bits_for(name)}", group_size
    return place(table, format_of, args)


def place(table: list[tuple[str, tuple[int, ...]]], format_of,
          args: ModelArgs) -> tuple[list[TensorLayout], dict[str, int]]:
    """The layout rule: each tensor in its file (tensor_file), in table order, on the 64-byte boundary
    after the one before; format_of(name, shape) gives its (dtype, group size). Writers place tensors
    with it and readers check a manifest's offsets against it, so an offset that was moved is caught."""
    layouts, ends = [], {}
    for name, shape in table:
        file = tensor_file(name, args)
        dtype, gs = format_of(name, shape)
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


def is_quantized(m) -> bool:
    """Whether a weight is a packed QuantizedMatrix (else a float numpy array)."""
    return isinstance(m, QuantizedMatrix)


def nbytes(m) -> int:
    """The bytes of a float or quantized weight."""
    return m.nbytes if isinstance(m, np.ndarray) else m.words.nbytes + m.scales.nbytes + m.biases.nbytes


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


def read_manifest(folder: Path, source: str | None = None) -> dict:
    """manifest.json, checked whole (check_manifest) before anything reads a tensor by it."""
    path = Path(folder) / MANIFEST
    manifest, _, _ = open_manifest(folder, source or str(path))
    return manifest


def open_manifest(folder: Path, source: str) -> tuple[dict, ModelArgs, dict[str, TensorLayout]]:
    """(manifest, config, tensor layouts by name), the manifest read with a size bound and checked."""
    path = Path(folder) / MANIFEST
    try:
        manifest = validate.read_json(path, "manifest")
    except LocalmixError as e:
        raise LocalmixError(f"{source}: unreadable manifest ({str(e).removeprefix(f'{path}: ')}); "
                            f"run `localmix verify` or pull the model again") from None
    args, layouts = check_manifest(manifest, Path(folder), source)
    return manifest, args, layouts


SHA256 = re.compile(r"[0-9a-f]{64}")
TENSOR_DTYPES = {"f32": None, "q2": 2, "q3": 3, "q4": 4, "q8": 8}  # what the backends read
MAX_FILE_BYTES = 1 << 50


def check_manifest(manifest, folder: Path, source: str) -> tuple[ModelArgs, dict[str, TensorLayout]]:
    """A manifest is untrusted: it sizes the kernels' buffers, the expert cache's slots and every view
    of the files. Checked here, once, before any of them: the config typed and bounded (ModelArgs),
    the tensors exactly those the config implies with the shapes it implies, each in the file, at the
    offset and with the byte count the layout rule (`place`) gives for its dtype and group size, the
    files exactly those the tensors fill (plus the tokenizer) with the sizes the rule gives, every name
    confined to the folder. All arithmetic is on Python ints. Returns (config, layouts by name)."""
    validate.json_object(manifest, source, "manifest")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise LocalmixError(f"{source}: format version {version} is newer than this localmix reads "
                            f"({FORMAT_VERSION}); upgrade localmix")
    validate.integer(version, "format_version", source, 1, FORMAT_VERSION)
    if manifest.get("format", "localmix") != "localmix":
        raise LocalmixError(f"{source}: format must be 'localmix', got {manifest['format']!r:.60}")
    if "config" not in manifest:
        raise LocalmixError(f"{source}: no config")
    args = ModelArgs.from_hf_config(manifest["config"], source)
    for key, kind in (("quantization", dict), ("source", dict), ("created", str)):
        if not isinstance(manifest.get(key), kind):
            raise LocalmixError(f"{source}: {key} must be a JSON {'object' if kind is dict else 'string'}")
    quantization = manifest["quantization"]
    if not isinstance(quantization.get("bits"), (str, int)) or isinstance(quantization.get("bits"), bool):
        raise LocalmixError(f"{source}: quantization.bits must be a string or an integer")
    validate.integer(quantization.get("group_size"), "quantization.group_size", source, 1, MAX_DIM)
    tokenizer = manifest.get("tokenizer", SENTENCEPIECE)  # older manifests say nothing: tokenizer.model
    if tokenizer not in (SENTENCEPIECE, HF_TOKENIZER):
        raise LocalmixError(f"{source}: tokenizer must be 'tokenizer.model' or 'tokenizer.json', "
                            f"got {manifest['tokenizer']!r:.60}")

    files = validate.json_object(manifest.get("files"), source, "files")
    tensors = validate.json_object(manifest.get("tensors"), source, "tensors")
    table = tensor_table(args)
    expected = {name for name, _ in table}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        what = (f"tensor {missing[0]} is missing" if missing else
                f"lists {len(extra)} tensor(s) the config does not have, such as {extra[0]!r:.100}")
        raise LocalmixError(f"{source}: {what}")

    def format_of(name: str, shape: tuple[int, ...]) -> tuple[str, int | None]:
        where = f"{source}: tensor {name}"
        entry = validate.json_object(tensors[name], where, "entry")
        if validate.shape(entry.get("shape"), "shape", where) != shape:
            raise LocalmixError(f"{where} has shape {entry.get('shape')!r:.60}, expected {list(shape)} from the config")
        dtype, group_size = entry.get("dtype"), entry.get("group_size")
        if stays_float(name):
            if dtype != "f32" or group_size is not None:
                raise LocalmixError(f"{where}: dtype must be f32 with no group size, got {dtype!r:.20}, "
                                    f"group size {group_size!r:.20}")
        else:
            if not isinstance(dtype, str) or TENSOR_DTYPES.get(dtype) is None:
                quantized = ", ".join(name for name, bits in TENSOR_DTYPES.items() if bits)
                raise LocalmixError(f"{where}: dtype must be one of {quantized}, got {dtype!r:.20}")
            if type(group_size) is not int or group_size not in GROUP_SIZES or shape[1] % group_size:
                raise LocalmixError(f"{where}: group size {group_size!r:.20} does not divide its {shape[1]} "
                                    f"columns or is not one of {', '.join(map(str, GROUP_SIZES))}")
        return dtype, group_size

    placed, sizes = place(table, format_of, args)
    layouts = {}
    for layout in placed:
        where = f"{source}: tensor {layout.name}"
        entry = tensors[layout.name]
        for key, want in (("file", layout.file), ("offset", layout.offset), ("nbytes", layout.nbytes)):
            value = entry.get(key)
            if value != want or isinstance(value, bool) or type(value) is not type(want):
                raise LocalmixError(f"{where}: {key} is {value!r:.60}, but the layout puts it at {want!r}")
        if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
            raise LocalmixError(f"{where}: sha256 must be 64 hexadecimal digits")
        layouts[layout.name] = layout

    wanted = set(sizes) | {tokenizer}
    optional = set(HF_SIDE_FILES) if tokenizer == HF_TOKENIZER else set()  # a tokenizer.json's, where it had them
    extra, missing = sorted(set(files) - wanted - optional), sorted(wanted - set(files))
    if extra or missing:
        what = (f"file {missing[0]} is not listed" if missing else
                f"lists {len(extra)} file(s) no tensor is in, such as {extra[0]!r:.100}")
        raise LocalmixError(f"{source}: {what}")
    for file, entry in files.items():
        where = f"{source}: file {file}"
        validate.confined(folder, file, source)
        entry = validate.json_object(entry, where, "entry")
        size = validate.integer(entry.get("size"), "size", where, 1, MAX_FILE_BYTES)
        if file in sizes and size != sizes[file]:
            raise LocalmixError(f"{where}: size {size}, but its tensors fill {sizes[file]} bytes")
        if file in TOKENIZER_FILE_LIMITS and size > TOKENIZER_FILE_LIMITS[file]:
            raise LocalmixError(f"{where}: size {size}, larger than a tokenizer file can be "
                                f"({TOKENIZER_FILE_LIMITS[file]})")
        if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
            raise LocalmixError(f"{where}: sha256 must be 64 hexadecimal digits")
    return args, layouts


class ModelFolder:
    """A localmix model folder, opened without reading its weights: tensors are views of
    memory-mapped files, so opening costs no time proportional to the model's size."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest, self.config, self.layouts = open_manifest(self.folder, str(self.folder / MANIFEST))
        self._maps: dict[str, np.memmap] = {}

    @property
    def tokenizer_files(self) -> dict[str, Path]:
        """The tokenizer files the manifest lists (tokenizer.model, or tokenizer.json and its side files)."""
        return {name: self.folder / name for name in self.manifest["files"] if name in TOKENIZER_FILE_LIMITS}

    def _map(self, file: str) -> np.memmap:
        """The file, mapped once its size on disk is the manifest's (which the layout was checked against)."""
        if file not in self._maps:
            path = self.folder / file
            expected = self.manifest["files"][file]["size"]
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                state = ("not a regular file" if path.exists() else "missing") if size is None else \
                    f"truncated or corrupt ({size} bytes, expected {expected})"
                raise LocalmixError(f"{path}: {state}; run `localmix verify` or pull the model again")
            self._maps[file] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[file]

    def tensor(self, name: str, shape: tuple[int, ...]):
        layout = self.layouts.get(name)
        if layout is None:
            raise LocalmixError(f"{self.folder / MANIFEST}: tensor {name} is missing")
        if layout.shape != tuple(shape):  # the manifest was checked against self.config; another config asks
            raise LocalmixError(f"{self.folder / MANIFEST}: tensor {name} has shape {list(layout.shape)}, "
                                f"expected {list(shape)}")
        data = self._map(layout.file)
        views = {part: data[offset:offset + size] for part, offset, size in layout.parts}
        if layout.bits is None:
            return views["data"].view(np.float32).reshape(shape)
        rows = shape[0]
        return QuantizedMatrix(views["words"].view(np.uint32).reshape(rows, -1),
                               views["scales"].view(np.float16).reshape(rows, -1),
                               views["biases"].view(np.float16).reshape(rows, -1),
                               layout.bits, layout.group_size, str(self.folder / layout.file))


def verify(folder: str | Path) -> list[str]:
    """The problems found (none: intact): the manifest's own consistency and its config (check_manifest),
    every file and tensor re-hashed against it, and the tokenizer loaded and checked against the config."""
    folder = Path(folder)
    if not is_localmix_model(folder):
        raise LocalmixError(f"{folder}: not a localmix model (no {MANIFEST})")
    try:
        manifest, args, layouts = open_manifest(folder, MANIFEST)
    except LocalmixError as e:  # nothing else can be trusted: its file names and sizes are what lied
        return [str(e)]
    problems = []
    for file, entry in manifest["files"].items():
        path = folder / file
        if not path.is_file():
            problems.append(f"{file}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{file}: {path.stat().st_size} bytes, expected {entry['size']}")
        elif sha256_of(path) != entry["sha256"]:
            bad = [name for name, t in layouts.items()
                   if t.file == file and sha256_of(path, t.offset, t.nbytes) != manifest["tensors"][name]["sha256"]]
            problems.append(f"{file}: checksum mismatch" + (f" (tensors {', '.join(bad)})" if bad else ""))
    names = [name for name in manifest["files"] if name in TOKENIZER_FILE_LIMITS]
    if not any(p.split(":")[0] in names for p in problems):
        try:
            load_tokenizer(folder, args.vocab_size, manifest.get("tokenizer", SENTENCEPIECE),
                           {name: folder / name for name in names})
        except LocalmixError as e:
            problems.append(str(e))
    return problems


def model_summary(folder: str | Path) -> dict:
    """What `localmix show` and `list` print: architecture, parameters, quantization, bytes."""
    folder = Path(folder)
    manifest, args, _ = open_manifest(folder, str(folder / MANIFEST))
    return summarize(folder, manifest, args)


def summarize(folder: Path, manifest: dict, args: ModelArgs) -> dict:
    """model_summary's figures from a manifest open_manifest has read and checked."""
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
        "dense_layers": args.num_hidden_layers - len(args.moe_layers) if args.is_moe else 0,
        "shared_expert": args.shared_expert_intermediate_size > 0,
        "context": args.max_position_embeddings, "vocab_size": args.vocab_size,
        "parameters": dense_params + expert_params,
        "active_parameters": int(dense_params + expert_params * share),
        "bits": manifest["quantization"]["bits"], "group_size": manifest["quantization"]["group_size"],
        "dense_bytes": dense_bytes, "expert_bytes": expert_bytes,
        "disk_bytes": sum(f["size"] for f in manifest["files"].values()),
        "source": manifest["source"], "created": manifest["created"],
    }
