"""Read a Hugging Face checkpoint folder: config.json, tokenizer.model and safetensors shards.

Tensors are memory-mapped, not read. We parse the safetensors header ourselves (8-byte length, a
JSON table of dtype, shape and byte range, then the raw data) instead of going through the
`safetensors` package: its numpy API cannot represent bf16, the dtype nearly every checkpoint ships
in, and it copies each tensor out of the file. A memory map gives zero-copy fp32 tensors, and bf16
becomes fp32 with one 16-bit shift.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from localmix.config import ModelArgs
from localmix.errors import LocalmixError

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
RAW_DTYPES = {**_DTYPES, "U32": np.dtype("<u4")}  # also packed words (mlx-lm's quantized tensors)
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: its table of tensors, and views into a read-only memory map."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise LocalmixError(f"{path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise LocalmixError(f"{path}: truncated or corrupt safetensors header")
                table = json.loads(f.read(n))
        except OSError as e:
            raise LocalmixError(f"{path}: cannot read ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError):
            raise LocalmixError(f"{path}: corrupt safetensors header") from None
        table.pop("__metadata__", None)
        self.tensors = table
        self.data_start = 8 + n
        self.size = size
        self._map = None

    def locate(self, name: str, dtypes: dict = _DTYPES) -> tuple[str, tuple[int, ...], int]:
        """(dtype, shape, byte offset in the file) of a tensor, checked against the file's size."""
        info = self.tensors[name]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype not in dtypes:
            raise LocalmixError(f"{self.path}: tensor {name} has dtype {dtype}; "
                                f"localmix reads {', '.join(dtypes)}")
        start, end = (self.data_start + o for o in info["data_offsets"])
        if end > self.size:
            raise LocalmixError(f"{self.path}: truncated file, tensor {name} ends at byte {end} "
                                f"but the file has {self.size} bytes")
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dtypes[dtype].itemsize:
            raise LocalmixError(f"{self.path}: tensor {name} has {end - start} bytes for shape {list(shape)}")
        return dtype, shape, start

    def raw(self, name: str, dtypes: dict = _DTYPES) -> tuple[np.ndarray, str]:
        """The tensor as stored (a view of the file; BF16 as uint16) and its dtype."""
        dtype, shape, start = self.locate(name, dtypes)
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        return self._map[start:start + count * dtypes[dtype].itemsize].view(dtypes[dtype]).reshape(shape), dtype

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32: a view of the file for F32, a converted copy for F16/BF16."""
        return to_float32(*self.raw(name))

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32, read with pread rather than mapped: a converter
        streaming through a whole checkpoint then holds no more than these rows in memory."""
        dtype, shape, offset = self.locate(name)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * _DTYPES[dtype].itemsize
        raw = np.empty((stop - start,) + shape[1:], _DTYPES[dtype])
        with open(self.path, "rb") as f:
            f.seek(offset + start * row_bytes)
            if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise LocalmixError(f"{self.path}: truncated file while reading {name}")
        return to_float32(raw, dtype)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return raw
    if dtype == "F16":
        return raw.astype(np.float32)
    return bf16_to_f32(raw)


def tokenizer_file(folder: Path, advice: str) -> Path:
    """The folder's sentencepiece tokenizer.model; when it is missing, an error with the advice."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise LocalmixError(f"{folder}: no tokenizer.model ({advice})")
    return path


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shifting its 16 bits up is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Checkpoint:
    """A Hugging Face model folder. Tensors are found through model.safetensors.index.json when the
    weights are sharded, else through the one model.safetensors (or every *.safetensors file)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise LocalmixError(f"{self.folder}: no such model folder")
        self.config = ModelArgs.from_file(self.folder / "config.json")
        self._files: dict[str, SafetensorsFile] = {}
        self.weight_map = self._find_tensors()

    @property
    def tokenizer_path(self) -> Path:
        return tokenizer_file(self.folder, "localmix needs the sentencepiece tokenizer")

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            path = self.folder / name
            if not path.is_file():
                raise LocalmixError(f"{path}: missing weights file")
            self._files[name] = SafetensorsFile(path)
        return self._files[name]

    def _find_tensors(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise LocalmixError(f"{index}: not a valid safetensors index") from None
            return dict(weight_map)
        names = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not names:
            raise LocalmixError(f"{self.folder}: no .safetensors weights found")
        return {tensor: name for name in names for tensor in self._file(name).tensors}

    def file_of(self, name: str, shape: tuple[int, ...]) -> SafetensorsFile:
        """The file holding the named tensor, checked to hold it with the shape the config implies."""
        if name not in self.weight_map:
            raise LocalmixError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        file = self._file(self.weight_map[name])
        check_tensor(file, name, shape)
        return file

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The named tensor as float32, checked against the shape the config implies."""
        return self.file_of(name, shape).load(name)


def check_tensor(file: SafetensorsFile, name: str, shape: tuple[int, ...]) -> None:
    if name not in file.tensors:
        raise LocalmixError(f"{file.path}: tensor {name} is missing (the index lists it here)")
    found = tuple(file.tensors[name]["shape"])
    if found != tuple(shape):
        raise LocalmixError(f"{file.path}: tensor {name} has shape {list(found)}, "
                            f"expected {list(shape)} from config.json")


def read_weights(checkpoint: Checkpoint, args: ModelArgs | None = None, experts: bool = True):
    """All tensors of the model, named as Hugging Face names them, checked against the config.
    experts=False leaves a mixture's experts out (an expert cache brings them in on demand)."""
    from localmix.model import Expert, Layer, Weights

    args = args or checkpoint.config
    H, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    q_rows, kv_rows = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    get = checkpoint.tensor

    layers = []
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        if args.is_moe:
            moe = p + "block_sparse_moe."
            router = get(moe + "gate.weight", (args.num_local_experts, H))
            layer_experts = [Expert(w1=get(f"{moe}experts.{e}.w1.weight", (F, H)),
                                    w2=get(f"{moe}experts.{e}.w2.weight", (H, F)),
                                    w3=get(f"{moe}experts.{e}.w3.weight", (F, H)))
                             for e in range(args.num_local_experts)] if experts else []
        else:
            router = None
            layer_experts = [Expert(w1=get(p + "mlp.gate_proj.weight", (F, H)),
                                    w2=get(p + "mlp.down_proj.weight", (H, F)),
                                    w3=get(p + "mlp.up_proj.weight", (F, H)))]
        layers.append(Layer(
            attention_norm=get(p + "input_layernorm.weight", (H,)),
            wq=get(p + "self_attn.q_proj.weight", (q_rows, H)),
            wk=get(p + "self_attn.k_proj.weight", (kv_rows, H)),
            wv=get(p + "self_attn.v_proj.weight", (kv_rows, H)),
            wo=get(p + "self_attn.o_proj.weight", (H, q_rows)),
            ffn_norm=get(p + "post_attention_layernorm.weight", (H,)),
            router=router, experts=layer_experts))

    embed = get("model.embed_tokens.weight", (V, H))
    lm_head = embed if args.tie_word_embeddings else get("lm_head.weight", (V, H))
    return Weights(embed=embed, layers=layers, norm=get("model.norm.weight", (H,)), lm_head=lm_head)


def tensor_table(args: ModelArgs) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the model reads, with its shape, in model order. read_weights is the one place
    that names tensors; here it runs against a recorder instead of a checkpoint."""
    table = []

    class Recorder:
        def tensor(self, name, shape):
            table.append((name, tuple(shape)))

    read_weights(Recorder(), args)
    return table
