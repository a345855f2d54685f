"""Read a Hugging Face checkpoint folder: config.json, tokenizer.model and safetensors shards.

Tensors are memory-mapped, not read. We parse the safetensors header ourselves (8-byte length, a
JSON table of dtype, shape and byte range, then the raw data) instead of going through the
`safetensors` package: its numpy API cannot represent bf16, the dtype nearly every checkpoint ships
in, and it copies each tensor out of the file. A memory map gives zero-copy fp32 tensors, and bf16
becomes fp32 with one 16-bit shift.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from localmix import validate
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.tokenizer import tokenizer_files

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
RAW_DTYPES = {**_DTYPES, "U32": np.dtype("<u4")}  # also packed words (mlx-lm's quantized tensors)
_MAX_HEADER = 100 * 1024 * 1024


# Item sizes of every safetensors dtype whose elements are whole bytes: a tensor's byte range must
# hold exactly its shape's elements. localmix reads only _DTYPES (and RAW_DTYPES); the others may sit
# in a file beside them and are checked but never read.
_ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


class SafetensorsFile:
    """One .safetensors file: its table of tensors, and views into a read-only memory map.

    The header is untrusted and checked whole when the file is opened, so nothing later can be
    sized or placed by a lie: a JSON object whose entries each have a dtype, a shape of
    non-negative ints and a byte range [begin, end] inside the data section, exactly as long as the
    shape needs (Python ints: no overflow), with no two tensors overlapping."""

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
                header = f.read(n)
        except OSError as e:
            raise LocalmixError(f"{path}: cannot read ({e.strerror})") from None
        try:
            table = validate.parse_json(header, str(path), "JSON")
        except LocalmixError as e:
            raise LocalmixError(f"{path}: corrupt safetensors header ({str(e).removeprefix(f'{path}: ')})") from None
        if not isinstance(table, dict):
            raise LocalmixError(f"{path}: corrupt safetensors header (not a JSON object)")
        metadata = table.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
            raise LocalmixError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
        self.data_start = 8 + n
        self.size = size
        self.tensors = {name: self._entry(name, info) for name, info in table.items()}
        last_end, last = 0, None
        for (begin, end), name in sorted((info["data_offsets"], name) for name, info in self.tensors.items()):
            if begin < last_end and end > begin:  # an empty tensor takes no bytes from anyone
                raise LocalmixError(f"{path}: corrupt safetensors header (tensors {last} and {name} overlap)")
            if end > last_end:
                last_end, last = end, name
        self._map = None

    def _entry(self, name: str, info) -> dict:
        where = f"{self.path}: tensor {name!r:.80}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise LocalmixError(f"{where}: corrupt safetensors header (needs dtype, shape and data_offsets)")
        dtype = validate.string(info["dtype"], "dtype", where, 32)
        shape = validate.shape(info["shape"], "shape", where)
        offsets = info["data_offsets"]
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise LocalmixError(f"{where}: data_offsets must be [begin, end]")
        data_bytes = self.size - self.data_start
        begin = validate.integer(offsets[0], "data_offsets", where, 0)
        end = validate.integer(offsets[1], "data_offsets", where, begin)
        if end > data_bytes:
            raise LocalmixError(f"{where}: truncated file, the tensor ends at byte {self.data_start + end} "
                                f"but the file has {self.size} bytes")
        if dtype in _ITEM_SIZES and end - begin != math.prod(shape) * _ITEM_SIZES[dtype]:
            raise LocalmixError(f"{where}: {end - begin} bytes for shape {list(shape)} of {dtype}")
        return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}

    def locate(self, name: str, dtypes: dict = _DTYPES) -> tuple[str, tuple[int, ...], int]:
        """(dtype, shape, byte offset in the file) of a tensor (its range was checked at open)."""
        info = self.tensors[name]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype not in dtypes:
            raise LocalmixError(f"{self.path}: tensor {name} has dtype {dtype}; "
                                f"localmix reads {', '.join(dtypes)}")
        return dtype, shape, self.data_start + info["data_offsets"][0]

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

    def read_rows(self, name: str, start: int, stop: int, cols: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32, read with pread rather than mapped: a converter
        streaming through a whole checkpoint then holds no more than these rows in memory. cols: read
        the tensor as rows of that many values (a block of a stacked tensor, see source_of)."""
        return to_float32(*self.read_raw_rows(name, start, stop, cols))

    def read_raw_rows(self, name: str, start: int, stop: int, cols: int | None = None,
                      dtypes: dict = _DTYPES) -> tuple[np.ndarray, str]:
        """read_rows' rows as stored (BF16 as uint16, MXFP4's U8 bytes as uint8), and their dtype."""
        dtype, shape, offset = self.locate(name, dtypes)
        if cols is not None:
            shape = (math.prod(shape) // cols, cols)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtypes[dtype].itemsize
        raw = np.empty((stop - start,) + shape[1:], dtypes[dtype])
        with open(self.path, "rb") as f:
            f.seek(offset + start * row_bytes)
            if f.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise LocalmixError(f"{self.path}: truncated file while reading {name}")
        return raw, dtype


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return raw
    if dtype == "F16":
        return raw.astype(np.float32)
    return bf16_to_f32(raw)


def tokenizer_files_in(folder: Path, advice: str) -> dict[str, Path]:
    """The folder's tokenizer files by name (tokenizer.tokenizer_files: tokenizer.model, or
    tokenizer.json and its side files); when it has none, an error with the advice."""
    files = tokenizer_files(folder)
    if not files:
        raise LocalmixError(f"{folder}: no tokenizer.model or tokenizer.json ({advice})")
    return files


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
    def tokenizer_files(self) -> dict[str, Path]:
        return tokenizer_files_in(self.folder, "localmix reads a sentencepiece or Hugging Face tokenizer")

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            path = validate.confined(self.folder, name, str(self.folder))
            if not path.is_file():
                raise LocalmixError(f"{path}: missing weights file")
            self._files[name] = SafetensorsFile(path)
        return self._files[name]

    def _find_tensors(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return read_index(index)
        names = sorted(p.name for p in self.folder.glob("*.safetensors"))
        for name in names:
            validate.confined(self.folder, name, str(self.folder))  # no symlink out of the folder
        if not names:
            raise LocalmixError(f"{self.folder}: no .safetensors weights found")
        return {tensor: name for name in names for tensor in self._file(name).tensors}

    def file_of(self, name: str, shape: tuple[int, ...]) -> SafetensorsFile:
        """The file holding the named checkpoint tensor, checked to hold it with the shape the config implies."""
        if name not in self.weight_map:
            raise LocalmixError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        file = self._file(self.weight_map[name])
        check_tensor(file, name, shape)
        return file

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """One of the model's tensors (see source_of) as float32, checked against the shape the
        config implies: a view of the file for float32, a converted copy of its rows otherwise."""
        source = source_of(name, shape, self.config)
        if source.whole:
            return self.file_of(source.name, source.shape).load(name)
        return source.read(self.file_of).reshape(shape)


# MXFP4 (OCP microscaling FP4, as gpt-oss ships its experts): 4-bit E2M1 codes, two per byte (the
# low nibble first), and one 8-bit power-of-two exponent (biased by 127) per 32 values.
MXFP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                        np.float32)
MXFP4_GROUP = 32
_U8 = {"U8": np.dtype("u1")}


def mxfp4_to_float32(codes: np.ndarray, exponents: np.ndarray) -> np.ndarray:
    """[rows, cols] E2M1 codes and [rows, cols / 32] exponents -> float32 [rows, cols], exactly
    (float32's range holds every E2M1 value times 2^-127 .. 2^127 but the largest, which overflow
    as they do in transformers' bfloat16)."""
    rows = codes.shape[0]
    values = MXFP4_VALUES[codes].reshape(rows, -1, MXFP4_GROUP)
    with np.errstate(over="ignore"):
        return np.ldexp(values, exponents[..., None].astype(np.int32)).astype(np.float32).reshape(rows, -1)


class Source(NamedTuple):
    """Where one of the model's tensors lies in a checkpoint tensor (`name`, of `shape`): seen as
    rows of `cols` values, its rows [first, first + rows); transposed where `transpose` says, then
    every `step`-th row from `offset` on is ours. One expert's matrix of a stacked tensor is such a
    block (GraniteMoE's rows, gpt-oss's transposed and interleaved columns, or MXFP4 blocks of
    interleaved rows): a reader brings in that block, never the whole stacked tensor. `scales`: the
    tensor is MXFP4 blocks (uint8 [..., cols / 32, 16]) whose exponents are this tensor
    (uint8 [..., cols / 32], of scales_shape)."""
    name: str
    shape: tuple[int, ...]
    first: int = 0
    rows: int = 0
    cols: int = 0
    offset: int = 0
    step: int = 1
    transpose: bool = False
    scales: str = ""
    scales_shape: tuple[int, ...] = ()

    @property
    def whole(self) -> bool:
        return self.rows == 0

    def take(self, block: np.ndarray) -> np.ndarray:
        """Ours, out of the block of rows (a copy: contiguous)."""
        block = block.T if self.transpose else block
        return np.ascontiguousarray(block[self.offset::self.step] if self.step != 1 else block)

    def read(self, file_of) -> np.ndarray:
        """Ours as float32 (not reshaped), read with pread. file_of(name, shape): the file that
        holds a checkpoint tensor, checked to hold it with that shape."""
        if self.scales:
            return mxfp4_to_float32(*self.read_mxfp4(file_of))
        stop = self.first + self.rows
        return self.take(file_of(self.name, self.shape).read_rows(self.name, self.first, stop, self.cols))

    def read_mxfp4(self, file_of) -> tuple[np.ndarray, np.ndarray]:
        """Ours as MXFP4: E2M1 codes [rows, cols] (uint8) and exponents [rows, cols / 32] (int32,
        unbiased)."""
        stop, groups = self.first + self.rows, self.cols // MXFP4_GROUP
        blocks, _ = file_of(self.name, self.shape).read_raw_rows(self.name, self.first, stop, groups * 16, _U8)
        scales, _ = file_of(self.scales, self.scales_shape).read_raw_rows(self.scales, self.first, stop, groups, _U8)
        codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(self.rows, self.cols)
        return self.take(codes), self.take(scales.astype(np.int32) - 127)


_STACKED_EXPERT = re.compile(r"(model\.layers\.\d+\.block_sparse_moe\.)experts\.(\d+)\.(w[123])\.weight$")
_GPT_OSS_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.(weight|bias)$")


def source_of(name: str, shape: tuple[int, ...], args: ModelArgs) -> Source:
    """Where one of the model's tensors lies in a checkpoint (see Source). Most tensors are a
    checkpoint tensor whole. GraniteMoE stacks a layer's experts in two tensors, input_linear
    [experts, gate rows then up rows, hidden] and output_linear [experts, hidden, width], of which an
    expert's w1, w3 or w2 is a block of rows. gpt-oss (as transformers saves it) stacks them
    transposed, gate and up interleaved: gate_up_proj [experts, hidden, 2 x width] (gate the even
    columns, up the odd), down_proj [experts, width, hidden], and their biases gate_up_proj_bias
    [experts, 2 x width], down_proj_bias [experts, hidden]. As published (MXFP4, config.json's
    quantization_config), its matrices are [experts, out, in] blocks and scales, gate and up
    interleaved by rows: gate_up_proj_blocks [experts, 2 x width, hidden / 32, 16], gate_up_proj_scales
    [experts, 2 x width, hidden / 32], down_proj_blocks and down_proj_scales likewise."""
    E, F, H = args.num_local_experts, args.moe_intermediate_size, args.hidden_size
    stacked = _STACKED_EXPERT.match(name) if args.model_type == "granitemoe" else None
    if stacked:
        prefix, expert, part = stacked[1], int(stacked[2]), stacked[3]
        if part == "w2":
            return Source(prefix + "output_linear.weight", (E, H, F), expert * H, H, F)
        return Source(prefix + "input_linear.weight", (E, 2 * F, H), expert * 2 * F + (F if part == "w3" else 0), F, H)
    stacked = _GPT_OSS_EXPERT.match(name) if args.model_type == "gpt_oss" else None
    if stacked:
        prefix, expert, part, kind = stacked[1], int(stacked[2]), stacked[3], stacked[4]
        bias = "_bias" if kind == "bias" else ""
        if part == "down":
            if bias:
                return Source(prefix + "down_proj_bias", (E, H), expert, 1, H)
            if args.mxfp4_experts:  # as published: [experts, out, in], not transposed
                return Source(prefix + "down_proj_blocks", (E, H, F // MXFP4_GROUP, 16), expert * H, H, F,
                              scales=prefix + "down_proj_scales", scales_shape=(E, H, F // MXFP4_GROUP))
            return Source(prefix + "down_proj", (E, F, H), expert * F, F, H, transpose=True)
        offset = 0 if part == "gate" else 1
        if bias:
            return Source(prefix + "gate_up_proj_bias", (E, 2 * F), expert, 1, 2 * F, offset, 2, transpose=True)
        if args.mxfp4_experts:
            return Source(prefix + "gate_up_proj_blocks", (E, 2 * F, H // MXFP4_GROUP, 16), expert * 2 * F, 2 * F, H,
                          offset, 2, scales=prefix + "gate_up_proj_scales", scales_shape=(E, 2 * F, H // MXFP4_GROUP))
        return Source(prefix + "gate_up_proj", (E, H, 2 * F), expert * H, H, 2 * F, offset, 2, transpose=True)
    return Source(name, tuple(shape))


def checkpoint_tensor_floor(args: ModelArgs) -> int:
    """The fewest tensors a checkpoint of this config can list (its MLPs' alone), counted without
    listing them: a config that describes more than a checkpoint holds is refused before its table
    is built."""
    if args.model_type == "granitemoe":
        return 2 * len(args.moe_layers)
    if args.model_type == "gpt_oss":
        return 4 * len(args.moe_layers)
    return 3 * len(args.mlp_widths)


def read_index(path: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor name -> file name), every file name a
    .safetensors file inside the index's folder (no `..`, no absolute path, no symlink out)."""
    index = validate.read_json(path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise LocalmixError(f"{path}: not a valid safetensors index (no weight_map object)")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors"):
            raise LocalmixError(f"{path}: weight_map maps {tensor!r:.80} to {file!r:.80}, not a .safetensors file")
        validate.confined(path.parent, file, str(path))
    return dict(weight_map)


def check_tensor(file: SafetensorsFile, name: str, shape: tuple[int, ...]) -> None:
    if name not in file.tensors:
        raise LocalmixError(f"{file.path}: tensor {name} is missing (the index lists it here)")
    found = tuple(file.tensors[name]["shape"])
    if found != tuple(shape):
        raise LocalmixError(f"{file.path}: tensor {name} has shape {list(found)}, "
                            f"expected {list(shape)} from config.json")


def read_weights(checkpoint: Checkpoint, args: ModelArgs | None = None, experts: bool = True):
    """All tensors of the model, named as Hugging Face names them, checked against the config: the
    one place that maps a family's checkpoint names. experts=False leaves the routed experts out (an
    expert cache brings them in on demand)."""
    # Imported here: localmix.experts imports localmix.store, which imports this module.
    from localmix.experts.resident import ResidentExperts
    from localmix.model import Expert, Layer, Weights, expert_activation

    args = args or checkpoint.config
    H, V = args.hidden_size, args.vocab_size
    q_rows, kv_rows = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    get = checkpoint.tensor

    glu = expert_activation(args)

    def mlp(prefix: str, width: int, names=("gate_proj", "down_proj", "up_proj"), biased: bool = False) -> Expert:
        gate, down, up = names
        biases = {}
        if biased:  # gpt-oss's (named as our unstacked experts are: see source_of)
            biases = dict(b1=get(f"{prefix}{gate}.bias", (width,)), b2=get(f"{prefix}{down}.bias", (H,)),
                          b3=get(f"{prefix}{up}.bias", (width,)))
        return Expert(w1=get(f"{prefix}{gate}.weight", (width, H)), w2=get(f"{prefix}{down}.weight", (H, width)),
                      w3=get(f"{prefix}{up}.weight", (width, H)), **biases, glu=glu)

    def bias(name: str, rows: int, present: bool):
        return get(name, (rows,)) if present else None

    layers = []
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        # Mixtral's experts sit in block_sparse_moe with w1 (gate), w2 (down), w3 (up), as GraniteMoE's
        # do once unstacked (source_of); the other families' in mlp, named as their dense MLPs are.
        moe, names = (p + "block_sparse_moe.", ("w1", "w2", "w3")) if args.model_type in ("mixtral", "granitemoe") \
            else (p + "mlp.", ("gate_proj", "down_proj", "up_proj"))
        router, router_bias, shared, shared_gate = None, None, None, None
        if args.sparse_layers[i]:
            router_name = moe + {"granitemoe": "router.layer", "gpt_oss": "router"}.get(args.model_type, "gate")
            router = get(router_name + ".weight", (args.num_local_experts, H))
            router_bias = bias(router_name + ".bias", args.num_local_experts, args.router_bias)
            layer_experts = [mlp(f"{moe}experts.{e}.", args.moe_intermediate_size, names, args.expert_bias)
                             for e in range(args.num_local_experts)] if experts else []
            if args.shared_expert_intermediate_size:
                shared = mlp(moe + "shared_expert.", args.shared_expert_intermediate_size)
                shared_gate = get(moe + "shared_expert_gate.weight", (1, H))
        else:  # a dense MLP: the one expert every token uses
            layer_experts = [mlp(p + "mlp.", args.intermediate_size)]
        q_norm = k_norm = None
        if args.qk_norm == "head":
            q_norm, k_norm = get(a + "q_norm.weight", (args.head_dim,)), get(a + "k_norm.weight", (args.head_dim,))
        elif args.qk_norm == "projection":
            q_norm, k_norm = get(a + "q_norm.weight", (q_rows,)), get(a + "k_norm.weight", (kv_rows,))
        layers.append(Layer(
            attention_norm=get(p + "input_layernorm.weight", (H,)),
            wq=get(a + "q_proj.weight", (q_rows, H)),
            wk=get(a + "k_proj.weight", (kv_rows, H)),
            wv=get(a + "v_proj.weight", (kv_rows, H)),
            wo=get(a + "o_proj.weight", (H, q_rows)),
            bq=bias(a + "q_proj.bias", q_rows, args.qkv_bias),
            bk=bias(a + "k_proj.bias", kv_rows, args.qkv_bias),
            bv=bias(a + "v_proj.bias", kv_rows, args.qkv_bias),
            bo=bias(a + "o_proj.bias", H, args.o_bias),
            q_norm=q_norm, k_norm=k_norm,
            sinks=get(a + "sinks", (args.num_attention_heads,)) if args.attention_sinks else None,
            ffn_norm=get(p + "post_attention_layernorm.weight", (H,)),
            router=router, router_bias=router_bias, experts=ResidentExperts(layer_experts),
            shared_expert=shared, shared_expert_gate=shared_gate))

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
