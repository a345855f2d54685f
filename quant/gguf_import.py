"""Import a mixture-of-experts GGUF file (llama.cpp's format): Mixtral (architecture `llama` with
experts), Qwen2-MoE (`qwen2moe`), Qwen3-MoE (`qwen3moe`) and OLMoE (`olmoe`).

llama.cpp's common 4- and 8-bit types are affine in groups of 32, as localmix's format is, so
they are copied, not quantized again:
- Q4_0: x = d (q - 8), q in [0, 16): scale d, bias -8d;
- Q4_1: x = d q + m: scale d, bias m;
- Q8_0: x = d q, q in [-128, 128): stored as q + 128 with scale d, bias -128d;
- Q4_K: super-blocks of 256 whose sub-blocks of 32 are x = (d sc) q - (dmin m): scale d*sc and bias
  -dmin*m, rounded to float16 (the only change).
The multiplications by 8 and 128 are exact in float16. Other types (Q6_K, Q5_*, F16, ...) are
dequantized (by the `gguf` package llama.cpp maintains) and quantized again at 8 bits, and the
import says so. llama.cpp's converter stores q and k rows in its own rotary order for `llama`
only (the others use NEOX rotation, transformers' order); they are put back in transformers'
(rows move, values do not). What llama.cpp's graph hard-codes per architecture rather than reads
from the file is taken as it does: top-k weights renormalized for llama and qwen3moe, not for
qwen2moe and olmoe; softmax routing. The tokenizer is rebuilt from the GGUF vocabulary: a
sentencepiece model (`tokenizer.ggml.model = "llama"`), or a tokenizer.json with its
tokenizer_config.json and chat template (`"gpt2"`, byte-level BPE: gguf_bpe.py).

A GGUF file is untrusted input, and `gguf.GGUFReader` trusts it: it reads every array eagerly, one
numpy object per element, sized by counts the file states (a patched count grows it to gigabytes),
and takes tensor types and offsets as they come. So the header is parsed here (GGUFFile), every
count bounded by the bytes left in the file, only the metadata the import uses kept, and the tensor
table checked as a whole (known types, sizes computed in Python ints, offsets aligned, tensors
packed one after the other as llama.cpp writes them, nothing past the end) before any data is read.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from localmix import validate
from localmix.checkpoint import tensor_table
from localmix.config import FAMILIES, ModelArgs
from localmix.errors import LocalmixError
from localmix.quant.affine import pack, quantize
from localmix.quant.convert import check_disk, write_arrays, write_model
from localmix.quant.gguf_bpe import tokenizer_config, tokenizer_json
from localmix.store import expert_matrix, plan_layout, stays_float
from localmix.tokenizer import HF_TOKENIZER, SENTENCEPIECE, check_tokenizer

GROUP = 32
COPIED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q4_K": 4}
# llama.cpp architecture -> transformers model_type, and its class.
ARCHITECTURES = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "olmoe": "OlmoeForCausalLM"}
# Whether llama.cpp's graph renormalizes the chosen experts' weights (build_moe_ffn's norm_w): a
# constant of each architecture, not read from the file.
NORM_TOPK = {"qwen3_moe": True, "qwen2_moe": False, "olmoe": False}
# A layer's transformers module -> its llama.cpp tensor (gguf's tensor_mapping.py)
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
               "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp",
               "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
               "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
               "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down", "mlp.up_proj": "ffn_up"}
EXPERT_NAMES = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

# Far above any real file (a Mixtral GGUF has ~40 keys and ~300 tensors), low enough that a lying
# count is refused before a loop runs for it.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_NAME = 1024          # a key or tensor name, in bytes (llama.cpp's tensor names are under 64)
MAX_STRING = 1 << 20     # a string value kept (chat templates are a few KB)
MAX_ALIGNMENT = 1 << 16
# Array values kept; every other array is bounds-checked and skipped, never materialized.
KEPT_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
               "tokenizer.ggml.merges"}

# GGUF's value types (gguf.GGUFValueType): struct format of each scalar.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}
FLOATS = {6, 12}
BOOL, STRING, ARRAY = 7, 8, 9
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
              8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
# Token types as llama.cpp writes them, which are sentencepiece's (normal, unknown, control,
# user-defined, unused, byte).
TOKEN_TYPES = range(1, 7)
REQUIRED = object()  # no default: a missing key is an error


def _gguf():
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise LocalmixError("reading or writing GGUF needs the gguf package: pip install 'localmix[gguf]'") from None
    return gguf


class Tensor(NamedTuple):
    name: str
    kind: str                 # the GGML type's name: "Q4_0", "F16", ...
    dims: tuple[int, ...]     # GGUF order: columns first
    start: int                # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata and tensor table, checked; tensors' data read only on demand.

    Every failure is one LocalmixError naming the file: a count larger than the bytes left could
    hold, an unknown value or tensor type, a string that is not UTF-8, duplicate names, a tensor
    whose size (from its type and shape) is not the space it has in the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, tuple[int, object]] = {}  # key -> (value type, value; None if skipped)
        self.tensors: dict[str, Tensor] = {}
        self._map = None
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < 24:
                    self._fail(f"not a readable GGUF file ({self.size} bytes, too short for a header)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise LocalmixError(f"{self.path}: not a readable GGUF file ({e.strerror or e})") from None
        try:
            self._parse()
        finally:
            self._mm.close()

    def _fail(self, message: str):
        raise LocalmixError(f"{self.path}: {message}")

    # -- the header, read with a cursor that never passes the end of the file --

    def _take(self, n: int, what: str) -> int:
        at = self.pos
        if n > self.size - at:
            self._fail(f"truncated or corrupt GGUF header: {what} at byte {at} needs {n} bytes, "
                       f"{self.size - at} are left")
        self.pos += n
        return at

    def _scalar(self, kind: int, what: str):
        fmt = SCALARS[kind]
        (value,) = struct.unpack_from(fmt, self._mm, self._take(struct.calcsize(fmt), what))
        if kind == BOOL:
            if value > 1:
                self._fail(f"{what}: bool value {value}")
            return bool(value)
        return value

    def _string(self, what: str, limit: int | None = None, keep: int = MAX_STRING) -> str | None:
        """A string; None (skipped, only bounds-checked) when it is longer than `keep` bytes."""
        n = self._scalar(10, f"length of {what}")
        if limit is not None and n > limit:
            self._fail(f"{what} is {n} bytes long (at most {limit})")
        at = self._take(n, what)
        if n > keep:
            return None
        try:
            return self._mm[at:at + n].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"{what} is not UTF-8")

    def _value_type(self, what: str) -> int:
        kind = self._scalar(4, f"type of {what}")
        if kind not in TYPE_NAMES:
            self._fail(f"{what!r:.80} has unknown value type {kind}")
        return kind

    def _value(self, key: str, kind: int):
        if kind == STRING:
            return self._string(key)
        if kind != ARRAY:
            return self._scalar(kind, key)
        item = self._value_type(f"{key}'s items")
        count = self._scalar(10, f"{key}'s length")
        keep = key in KEPT_ARRAYS
        if item == ARRAY:
            self._fail(f"{key}: arrays of arrays are not supported")
        if item == STRING:
            if count > (self.size - self.pos) // 8:  # each string takes its 8-byte length at least
                self._fail(f"{key}: {count} strings cannot fit in the {self.size - self.pos} bytes left")
            if keep and count > validate.MAX_DIM:
                self._fail(f"{key}: {count} strings, more than {validate.MAX_DIM}")
            values = [self._string(f"{key}[{i}]", keep=MAX_STRING if keep else -1) for i in range(count)]
            if keep and any(v is None for v in values):
                self._fail(f"{key}: a string longer than {MAX_STRING} bytes")
            return values if keep else None
        itemsize = struct.calcsize(SCALARS[item])
        if count > (self.size - self.pos) // itemsize:
            self._fail(f"{key}: {count} {TYPE_NAMES[item]} values cannot fit in the {self.size - self.pos} bytes left")
        at = self._take(count * itemsize, key)
        if not keep:
            return None
        return item, np.frombuffer(self._mm, np.dtype(SCALARS[item]), count, at).copy()

    def _parse(self) -> None:
        self.pos = 0
        if self._mm[:4] != b"GGUF":
            self._fail("not a readable GGUF file (no GGUF magic)")
        self.pos = 4
        version = self._scalar(4, "version")
        if version & 0xFFFF == 0 and version:
            self._fail("a big-endian GGUF file; localmix reads little-endian ones (as llama.cpp writes them)")
        if version not in (2, 3):
            self._fail(f"not a readable GGUF file (version {version}; localmix reads versions 2 and 3)")
        n_tensors, n_keys = self._scalar(10, "tensor count"), self._scalar(10, "key count")
        # A key takes 13 bytes at least (length, type, a byte of value), a tensor 24 (length, dims, type, offset).
        for count, what, most, least in ((n_keys, "keys", MAX_KEYS, 13), (n_tensors, "tensors", MAX_TENSORS, 24)):
            if count > most or count * least > self.size - self.pos:
                self._fail(f"not a readable GGUF file ({count} {what} stated; the file cannot hold them)")
        for _ in range(n_keys):
            key = self._string("a metadata key", MAX_NAME)
            if not key:
                self._fail(f"an empty metadata key at byte {self.pos - 8}")
            kind = self._value_type(key)
            if key in self.metadata:
                self._fail(f"metadata key {key} appears twice")
            self.metadata[key] = (kind, self._value(key, kind))
        infos = []
        for _ in range(n_tensors):
            name = self._string("a tensor name", MAX_NAME)
            if not name:
                self._fail(f"an empty tensor name at byte {self.pos - 8}")
            n_dims = self._scalar(4, f"{name}'s dimension count")
            if not 1 <= n_dims <= 4:
                self._fail(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to 4)")
            dims = tuple(self._scalar(10, f"{name}'s dimensions") for _ in range(n_dims))
            kind = self._scalar(4, f"{name}'s type")
            offset = self._scalar(10, f"{name}'s offset")
            infos.append((name, dims, kind, offset))
        alignment = self.metadata.get("general.alignment", (4, 32))
        if alignment[0] != 4 or not 0 < alignment[1] <= MAX_ALIGNMENT or alignment[1] & (alignment[1] - 1):
            self._fail(f"general.alignment must be a uint32 power of two up to {MAX_ALIGNMENT}, got {alignment[1]!r}")
        self.alignment = alignment[1]
        self.data_start = -(-self.pos // self.alignment) * self.alignment
        self._check_tensors(infos)

    def _check_tensors(self, infos) -> None:
        sizes = _gguf().GGML_QUANT_SIZES
        types = _gguf().GGMLQuantizationType
        for name, dims, kind, offset in infos:
            if name in self.tensors:
                self._fail(f"tensor {name} appears twice")
            try:
                ggml_type = types(kind)
                block, type_size = sizes[ggml_type]
            except (ValueError, KeyError):
                self._fail(f"tensor {name} has unknown type {kind}")
            if any(d == 0 for d in dims) or dims[0] % block:
                self._fail(f"tensor {name} has dimensions {list(dims)}, impossible for {ggml_type.name} "
                           f"(blocks of {block})")
            n = 1
            for d in dims:  # Python ints: a product of four 64-bit dimensions does not wrap
                n *= d
            nbytes = n // block * type_size
            if offset % self.alignment:
                self._fail(f"tensor {name}'s offset {offset} is not a multiple of the alignment {self.alignment}")
            start = self.data_start + offset
            if start + nbytes > self.size:
                self._fail(f"tensor {name} ({ggml_type.name}, {list(dims)}) needs bytes {start} to {start + nbytes}, "
                           f"past the end of the file ({self.size} bytes): truncated or corrupt")
            self.tensors[name] = Tensor(name, ggml_type.name, dims, start, nbytes)
        # llama.cpp writes tensors one after the other, each padded to the alignment. A tensor whose
        # size does not fill exactly its space up to the next one (or the end) has a type or shape
        # that is not what its data holds: relabelled, or tensors that overlap.
        at = self.data_start
        for t in sorted(self.tensors.values(), key=lambda t: t.start):
            if t.start != at:
                self._fail(f"tensor {t.name} starts at byte {t.start}, but the tensor before it ends at byte {at}: "
                           f"a type or shape that does not match the data, or overlapping tensors")
            at = t.start + -(-t.nbytes // self.alignment) * self.alignment
        if self.tensors and not at - self.alignment < self.size <= at:
            self._fail(f"the file has {self.size} bytes, but its tensors end at byte {at}: a type or shape that "
                       f"does not match the data, or a truncated file")

    # -- typed metadata --

    def get(self, key: str, kinds: set[int], what: str, default=REQUIRED):
        if key not in self.metadata:
            if default is REQUIRED:
                self._fail(f"missing metadata {key}")
            return default
        kind, value = self.metadata[key]
        if kind not in kinds:
            self._fail(f"metadata {key} must be {what}, got a {TYPE_NAMES[kind]}")
        return value

    def integer(self, key: str, low: int, high: int, default=REQUIRED) -> int:
        """The key's integer, bounded; the default (as it is) where the file leaves the key out."""
        if key not in self.metadata and default is not REQUIRED:
            return default
        return validate.integer(self.get(key, INTEGERS, "an integer"), key, str(self.path), low, high)

    def number(self, key: str, low: float, high: float, default=REQUIRED) -> float:
        if key not in self.metadata and default is not REQUIRED:
            return default
        return validate.number(self.get(key, FLOATS | INTEGERS, "a number"), key, str(self.path),
                               low, high, low_open=True)

    def string(self, key: str, default=REQUIRED) -> str:
        value = self.get(key, {STRING}, "a string", default)
        if value is None and key in self.metadata:
            self._fail(f"metadata {key} is longer than {MAX_STRING} bytes")
        return value

    def array(self, key: str, items: set[int], what: str, count: int | None = None, default=REQUIRED):
        """A kept array's values: a list of str, or a numpy array of numbers of the given item types."""
        value = self.get(key, {ARRAY}, f"an array of {what}", default)
        if value is default:
            return value
        if isinstance(value, list):
            kind = STRING
        else:
            kind, value = value
        if kind not in items:
            self._fail(f"metadata {key} must be an array of {what}, got {TYPE_NAMES[kind]} items")
        if count is not None and len(value) != count:
            self._fail(f"metadata {key} has {len(value)} values, expected {count} (one per token)")
        return value

    # -- tensor data --

    def data(self, t: Tensor) -> np.ndarray:
        """A read-only view of a tensor's data, shaped as GGUFReader shapes it (numpy order; the
        quantized types as rows of block bytes). Its bounds were checked with the table."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._map[t.start:t.start + t.nbytes]
        shape = tuple(reversed(t.dims))
        if t.kind in ("F32", "F16"):
            return raw.view(np.float32 if t.kind == "F32" else np.float16).reshape(shape)
        block, type_size = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType[t.kind]]
        return raw.reshape(*shape[:-1], shape[-1] // block * type_size)


def hf_config(g: GGUFFile) -> dict:
    """A transformers config.json of the GGUF's metadata, every value typed and bounded; it then goes
    through ModelArgs.from_hf_config like any other config. What llama.cpp reads from tensors'
    presence is read so too: q/k/v biases, a separate output matrix."""
    arch = g.string("general.architecture", None)
    model_type = ARCHITECTURES.get(arch)
    experts = g.metadata.get(f"{arch}.expert_count", (None, None))[1]
    if model_type is None or not experts:
        raise LocalmixError(f"{g.path}: not a mixture-of-experts GGUF localmix imports (architecture {arch!r:.40}, "
                            f"expert count {experts!r:.20}); localmix imports Mixtral (llama with experts), "
                            f"Qwen2-MoE (qwen2moe), Qwen3-MoE (qwen3moe) and OLMoE (olmoe)")
    p = arch + "."
    heads = g.integer(p + "attention.head_count", 1, validate.MAX_HEADS)
    hidden = g.integer(p + "embedding_length", 1, validate.MAX_DIM)
    layers = g.integer(p + "block_count", 1, validate.MAX_LAYERS)
    head_dim = g.integer(p + "attention.key_length", 1, validate.MAX_DIM, max(hidden // heads, 1))
    if g.integer(p + "attention.value_length", 1, validate.MAX_DIM, head_dim) != head_dim:
        raise LocalmixError(f"{g.path}: {p}attention.value_length differs from key_length ({head_dim})")
    rope_dims = g.integer(p + "rope.dimension_count", 1, validate.MAX_DIM, head_dim)
    if rope_dims != head_dim:  # partial rotary: other math than these families'
        raise LocalmixError(f"{g.path}: {p}rope.dimension_count is {rope_dims}, not the head size {head_dim}")
    if g.string(p + "rope.scaling.type", "none") not in ("none", ""):
        raise LocalmixError(f"{g.path}: scaled RoPE ({g.string(p + 'rope.scaling.type')}) is not supported")
    n_experts = g.integer(p + "expert_count", 1, validate.MAX_EXPERTS)
    used = g.integer(p + "expert_used_count", 1, n_experts)
    width = g.integer(p + "feed_forward_length", 1, validate.MAX_DIM)
    # llama.cpp's routing options, where a file sets them: localmix routes by softmax, unscaled.
    if g.integer(p + "expert_gating_func", 0, 1 << 32, 1) not in (0, 1):  # 0: unset, 1: softmax
        raise LocalmixError(f"{g.path}: {p}expert_gating_func is not softmax; localmix routes by softmax")
    if g.number(p + "expert_weights_scale", -1, 1e9, 1.0) not in (0.0, 1.0):  # 0: unset
        raise LocalmixError(f"{g.path}: {p}expert_weights_scale scales the experts' weights; localmix does not")
    model = g.string("tokenizer.ggml.model", None)
    if model not in ("llama", "gpt2"):
        raise LocalmixError(f"{g.path}: tokenizer.ggml.model is {model!r:.40}; localmix rebuilds sentencepiece "
                            f"('llama') and byte-level BPE ('gpt2') vocabularies")
    vocab = len(g.array("tokenizer.ggml.tokens", {STRING}, "strings"))
    if vocab == 0:
        raise LocalmixError(f"{g.path}: tokenizer.ggml.tokens is empty")
    sentencepiece = model == "llama"
    config = {"architectures": [CLASSES[model_type]], "model_type": model_type, "hidden_size": hidden,
              "intermediate_size": width, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": g.integer(p + "attention.head_count_kv", 1, validate.MAX_HEADS, heads),
              "head_dim": head_dim, "num_experts_per_tok": used, "vocab_size": vocab, "hidden_act": "silu",
              "max_position_embeddings": g.integer(p + "context_length", 1, validate.MAX_CONTEXT, 32768),
              # llama.cpp requires it of the others; Mixtral files have it too, older ones not always
              "rms_norm_eps": g.number(p + "attention.layer_norm_rms_epsilon", 0, 1,
                                       1e-5 if model_type == "mixtral" else REQUIRED),
              "rope_theta": g.number(p + "rope.freq_base", 0, 1e12, 1e6 if model_type == "mixtral" else 1e4),
              "tie_word_embeddings": "output.weight" not in g.tensors,
              "bos_token_id": g.integer("tokenizer.ggml.bos_token_id", 0, vocab - 1, 1 if sentencepiece else None),
              "eos_token_id": g.integer("tokenizer.ggml.eos_token_id", 0, vocab - 1, 2 if sentencepiece else None),
              "torch_dtype": "float16"}
    bias = "blk.0.attn_q.bias" in g.tensors
    if model_type == "mixtral":
        config.update(num_local_experts=n_experts, sliding_window=None)
    else:
        config.update(num_experts=n_experts, norm_topk_prob=NORM_TOPK[model_type], use_sliding_window=False)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        # llama.cpp's own fallback where the expert width is not stated
        config["moe_intermediate_size"] = g.integer(p + "expert_feed_forward_length", 1, validate.MAX_DIM,
                                                    max(width // used, 1))
        config.update(decoder_sparse_step=1, mlp_only_layers=[])  # llama.cpp's graph: experts in every layer
    if model_type == "qwen2_moe":
        config["shared_expert_intermediate_size"] = g.integer(p + "expert_shared_feed_forward_length", 1,
                                                              validate.MAX_DIM, width)
    if FAMILIES[model_type].qkv_bias_key:  # the family's own key for q/k/v biases (Mixtral has none)
        config[FAMILIES[model_type].qkv_bias_key] = bias
    if model_type == "olmoe" and p + "attention.clamp_kqv" in g.metadata:
        config["clip_qkv"] = g.number(p + "attention.clamp_kqv", 0, 1e9)
    return config


def same_dims(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Equal as ggml compares shapes: trailing dimensions of 1 left out or not (a shared expert's
    gate is [hidden] or [hidden, 1])."""
    def strip(d):
        while len(d) > 1 and d[-1] == 1:
            d = d[:-1]
        return d
    return strip(tuple(a)) == strip(tuple(b))


def gguf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every GGUF tensor a model of these args has, with its dimensions (GGUF order, columns
    first; experts stacked). The table it is made from is bounded by the config's checks (layers
    x experts at most MAX_TOTAL_EXPERTS)."""
    shapes = {}
    for name, shape in tensor_table(args):
        source, expert = gguf_name(name)
        if expert is None:
            shapes[source] = tuple(reversed(shape))
        else:  # the layer's experts in one stack
            rows, cols = shape
            shapes[source] = (cols, rows, args.num_local_experts)
    return shapes


def gguf_name(name: str) -> tuple[str, int | None]:
    """The GGUF tensor holding a localmix (transformers) tensor, and the expert's index in it."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name], None
    matrix = expert_matrix(name)
    if matrix:
        layer, expert, part = matrix
        return f"blk.{layer}.{EXPERT_NAMES[part]}.weight", expert
    m = _LAYER_TENSOR.match(name)
    return f"blk.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}", None


_readable: dict[str, bool] = {}


def readable(kind: str) -> bool:
    """Whether the gguf package can dequantize this type (asked once, on one zero block)."""
    if kind not in _readable:
        gguf = _gguf()
        t = gguf.GGMLQuantizationType[kind]
        block, size = gguf.GGML_QUANT_SIZES[t]
        try:
            gguf.quants.dequantize(np.zeros((1, block if kind in ("F32", "F16") else size),
                                            np.float32 if kind == "F32" else np.float16 if kind == "F16" else np.uint8), t)
            _readable[kind] = True
        except Exception:  # NotImplementedError for types it does not know; anything else: not usable either
            _readable[kind] = False
    return _readable[kind]


def affine_blocks(kind: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [rows, cols] uint8, scales, biases [rows, cols / 32] float16) of a row-major block array."""
    rows = raw.shape[0]
    if kind == "Q4_K":
        b = raw.reshape(-1, 144)
        from gguf.quants import Q4_K
        d, dmin = b[:, 0:2].copy().view(np.float16).astype(np.float32), b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 256)
        scales = (d * sc.astype(np.float32)).astype(np.float16)
        biases = (-dmin * m.astype(np.float32)).astype(np.float16)
    else:
        size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind]
        b = raw.reshape(-1, size)
        d = b[:, 0:2].copy().view(np.float16)
        if kind == "Q8_0":
            q = (b[:, 2:].copy().view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            biases = (d.astype(np.float32) * -128).astype(np.float16)
        else:
            nibbles = b[:, 4 if kind == "Q4_1" else 2:]
            q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # byte j: values j and j + 16
            biases = b[:, 2:4].copy().view(np.float16) if kind == "Q4_1" else (d.astype(np.float32) * -8).astype(np.float16)
        scales = d
    return q.reshape(rows, -1), scales.reshape(rows, -1), biases.reshape(rows, -1)


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (the two halves of each head interleaved) back to transformers'."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, per_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def sentencepiece_model(g: GGUFFile, vocab: int) -> bytes:
    """A sentencepiece BPE model with the GGUF's pieces, scores and types (Mistral's settings:
    byte fallback, a dummy prefix, whitespace kept)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise LocalmixError("importing a GGUF's tokenizer needs protobuf: pip install 'localmix[gguf]'") from None
    tokens = g.array("tokenizer.ggml.tokens", {STRING}, "strings")
    scores = g.array("tokenizer.ggml.scores", FLOATS, "floats", vocab, None)
    # Required: without them the byte pieces are not known as bytes, and byte fallback cannot work.
    types = g.array("tokenizer.ggml.token_type", INTEGERS, "integers", vocab).astype(np.int64)
    scores = np.zeros(vocab, np.float32) if scores is None else scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise LocalmixError(f"{g.path}: tokenizer.ggml.scores holds values that are not finite")
    if not np.isin(types, TOKEN_TYPES).all():
        raise LocalmixError(f"{g.path}: tokenizer.ggml.token_type holds types outside 1-6 "
                            f"(normal, unknown, control, user-defined, unused, byte)")
    model = pb.ModelProto()
    for token, score, kind in zip(tokens, scores.tolist(), types.tolist()):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token, score, kind
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = vocab
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id = g.integer("tokenizer.ggml.unknown_token_id", 0, vocab - 1, 0)
    model.trainer_spec.bos_id = g.integer("tokenizer.ggml.bos_token_id", 0, vocab - 1, 1)
    model.trainer_spec.eos_id = g.integer("tokenizer.ggml.eos_token_id", 0, vocab - 1, 2)
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    try:
        return model.SerializeToString()
    except Exception as e:  # protobuf's EncodeError: a piece it cannot encode
        raise LocalmixError(f"{g.path}: the vocabulary does not make a sentencepiece model ({str(e)[:200]})") from None


def import_gguf(path: Path, out_dir: Path, on_progress=None, say=print) -> Path:
    """A localmix model from a mixture-of-experts GGUF file. The header, the metadata (as a config
    through ModelArgs) and every tensor's type, shape and place are checked before any tensor is
    read."""
    gguf = _gguf()
    g = GGUFFile(path)
    raw_config = hf_config(g)
    args = ModelArgs.from_hf_config(raw_config, str(path))
    shapes = gguf_shapes(args)
    extra = sorted(set(g.tensors) - set(shapes))
    if extra:  # as llama.cpp refuses them: a file with more tensors than its metadata describes is not what it says
        raise LocalmixError(f"{path}: tensor {extra[0]} is not part of the {args.model_type} model its metadata "
                            f"describes"
                            + (f" ({len(extra)} such tensors)" if len(extra) > 1 else ""))
    for source, dims in shapes.items():
        if source not in g.tensors:
            raise LocalmixError(f"{path}: no tensor {source}")
        t = g.tensors[source]
        if not same_dims(t.dims, dims):
            raise LocalmixError(f"{path}: tensor {source} has dimensions {list(t.dims)}, expected {list(dims)} "
                                f"from the file's metadata")
        if not readable(t.kind):
            raise LocalmixError(f"{path}: tensor {source} has type {t.kind}, which localmix cannot read")
    table = tensor_table(args)
    kinds = {name: g.tensors[gguf_name(name)[0]].kind for name, _ in table}
    again = sorted({kind for name, kind in kinds.items() if kind not in COPIED and len(dict(table)[name]) == 2
                    and not stays_float(name)})
    if again:
        say(f"{', '.join(again)} tensors are dequantized and quantized again at 8 bits (localmix copies only "
            f"{', '.join(COPIED)})")
    layouts, sizes = plan_layout(table, lambda name: COPIED.get(kinds[name], 8), GROUP, args)
    check_disk(Path(out_dir).parent, sum(sizes.values()))

    def finite(arrays: list, name: str) -> list:
        # Values read as they are stored: a NaN or infinite weight (or scale) would poison every answer.
        if not all(np.isfinite(a).all() for a in arrays if a.dtype.kind == "f"):
            raise LocalmixError(f"{path}: tensor {name} holds values that are not finite")
        return arrays

    def arrays_of(layout) -> list:
        source, expert = gguf_name(layout.name)
        t = g.tensors[source]
        data = g.data(t)
        data = data[expert] if expert is not None else data
        ggml_type = gguf.GGMLQuantizationType[t.kind]
        try:
            if layout.bits is None:  # norms and routers: float32
                values = data if t.kind in ("F32", "F16") else gguf.quants.dequantize(data, ggml_type)
                return finite([np.asarray(values, np.float32).reshape(layout.shape)], source)
            heads = None
            if args.model_type == "mixtral":  # only llama's q and k rows are in llama.cpp's rotary order
                heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}.get(
                    layout.name.split(".")[-2])
            if t.kind in COPIED:
                arrays = affine_blocks(t.kind, np.asarray(data))
                q, scales, biases = (unpermute(a, heads) for a in arrays) if heads else arrays
                return [pack(q, layout.bits)] + finite([scales, biases], source)
            values = (np.asarray(data) if t.kind in ("F32", "F16") else gguf.quants.dequantize(data, ggml_type))
            values = finite([values.astype(np.float32).reshape(layout.shape)], source)[0]
            return list(quantize(unpermute(values, heads) if heads else values, 8, GROUP))
        except LocalmixError:
            raise
        except Exception as e:  # the gguf package's decoders on data they did not expect: one error, not a traceback
            raise LocalmixError(f"{path}: cannot decode tensor {source} ({t.kind}): {str(e)[:200]}") from None

    folder = Path(tempfile.mkdtemp(prefix=f".{Path(out_dir).name}.tokenizer.", dir=Path(out_dir).parent))
    try:
        tokenizer = write_tokenizer(g, args.vocab_size, folder)
        return write_model(Path(out_dir), sizes, lambda tmp: write_arrays(tmp, layouts, arrays_of, on_progress),
                           tokenizer, raw_config,
                           {"repo": str(Path(path).resolve()), "revision": None, "format": "gguf"},
                           {"bits": "/".join(sorted({str(COPIED.get(k, 8)) for k in kinds.values()})),
                            "group_size": GROUP, "method": "gguf (imported)", "gguf_types": sorted(set(kinds.values()))})
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_tokenizer(g: GGUFFile, vocab: int, folder: Path) -> dict[str, Path]:
    """The GGUF's tokenizer as files in folder (as tokenizer.tokenizer_files names them): a
    sentencepiece tokenizer.model, or tokenizer.json and tokenizer_config.json (its chat template,
    BOS and EOS) for a byte-level BPE vocabulary. write_model checks them again as it copies them."""
    if g.string("tokenizer.ggml.model") == "llama":
        path = folder / SENTENCEPIECE
        path.write_bytes(sentencepiece_model(g, vocab))
        check_tokenizer(path, vocab, f"{g.path} (its vocabulary)")
        return {SENTENCEPIECE: path}
    tokens = g.array("tokenizer.ggml.tokens", {STRING}, "strings")
    types = g.array("tokenizer.ggml.token_type", INTEGERS, "integers", vocab).astype(np.int64)
    if not np.isin(types, TOKEN_TYPES).all():
        raise LocalmixError(f"{g.path}: tokenizer.ggml.token_type holds types outside 1-6 "
                            f"(normal, unknown, control, user-defined, unused, byte)")
    merges = g.array("tokenizer.ggml.merges", {STRING}, "strings")
    special = {what: g.integer(f"tokenizer.ggml.{what}_token_id", 0, vocab - 1, None)
               for what in ("bos", "eos", "padding")}
    add_bos = g.get("tokenizer.ggml.add_bos_token", {BOOL}, "a bool", False)
    if g.get("tokenizer.ggml.add_eos_token", {BOOL}, "a bool", False):
        raise LocalmixError(f"{g.path}: tokenizer.ggml.add_eos_token is true; localmix does not end prompts with EOS")
    chat_template = g.string("tokenizer.chat_template", None)
    files = {HF_TOKENIZER: folder / HF_TOKENIZER, "tokenizer_config.json": folder / "tokenizer_config.json"}
    files[HF_TOKENIZER].write_text(tokenizer_json(g.path, tokens, types, merges, g.string("tokenizer.ggml.pre"),
                                                  special["bos"], add_bos), encoding="utf-8")
    files["tokenizer_config.json"].write_text(tokenizer_config(tokens, special["bos"], special["eos"],
                                                               special["padding"], add_bos, chat_template),
                                              encoding="utf-8")
    return files
