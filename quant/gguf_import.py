"""Import a Mixtral GGUF file (llama.cpp's format), read with the `gguf` package llama.cpp maintains.

llama.cpp's common 4- and 8-bit types are affine in groups of 32, as localmix's format is, so
they are copied, not quantized again:
- Q4_0: x = d (q - 8), q in [0, 16): scale d, bias -8d;
- Q4_1: x = d q + m: scale d, bias m;
- Q8_0: x = d q, q in [-128, 128): stored as q + 128 with scale d, bias -128d;
- Q4_K: super-blocks of 256 whose sub-blocks of 32 are x = (d sc) q - (dmin m): scale d*sc and bias
  -dmin*m, rounded to float16 (the only change).
The multiplications by 8 and 128 are exact in float16. Other types (Q6_K, Q5_*, F16, ...) are
dequantized and quantized again at 8 bits, and the import says so. llama.cpp stores q and k
rows in its own rotary order; they are put back in transformers' (rows move, values do not).
The tokenizer is rebuilt from the GGUF vocabulary as a sentencepiece model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from localmix.checkpoint import tensor_table
from localmix.config import ModelArgs
from localmix.errors import LocalmixError
from localmix.quant.affine import pack, quantize
from localmix.quant.convert import check_disk, write_arrays, write_model
from localmix.store import expert_matrix, plan_layout

GROUP = 32
COPIED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q4_K": 4}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate_inp": "block_sparse_moe.gate"}
EXPERT_NAMES = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]
    return value


def hf_config(reader) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama" or field(reader, f"{arch}.expert_count") in (None, 0):
        raise LocalmixError(f"not a Mixtral GGUF (architecture {arch!r}, expert count "
                            f"{field(reader, f'{arch}.expert_count')}); localmix imports Mixtral")
    get = lambda key, default=None: field(reader, f"{arch}.{key}", default)  # noqa: E731
    tokens = field(reader, "tokenizer.ggml.tokens")
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": int(get("embedding_length")),
            "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
            "num_attention_heads": int(get("attention.head_count")),
            "num_key_value_heads": int(get("attention.head_count_kv", get("attention.head_count"))),
            "num_local_experts": int(get("expert_count")), "num_experts_per_tok": int(get("expert_used_count")),
            "vocab_size": len(tokens), "max_position_embeddings": int(get("context_length", 32768)),
            "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(get("rope.freq_base", 1e6)), "sliding_window": None,
            "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
            "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id", 1)),
            "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id", 2)), "torch_dtype": "float16"}


def gguf_name(name: str) -> tuple[str, int | None]:
    """The GGUF tensor holding a localmix (transformers) tensor, and the expert's index in it."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name], None
    matrix = expert_matrix(name)
    if matrix:
        layer, expert, part = matrix
        return f"blk.{layer}.{ {v: k for k, v in EXPERT_NAMES.items()}[part] }_exps.weight", expert
    parts = name.split(".")
    layer, module = int(parts[2]), ".".join(parts[3:-1])
    return f"blk.{layer}.{ {v: k for k, v in LAYER_NAMES.items()}[module] }.weight", None


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


def sentencepiece_model(reader) -> bytes:
    """A sentencepiece BPE model with the GGUF's pieces, scores and types (Mistral's settings:
    byte fallback, a dummy prefix, whitespace kept)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise LocalmixError("importing a GGUF's tokenizer needs protobuf: pip install 'localmix[gguf]'") from None
    model = pb.ModelProto()
    tokens = field(reader, "tokenizer.ggml.tokens")
    scores = field(reader, "tokenizer.ggml.scores", [0.0] * len(tokens))
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    for token, score, kind in zip(tokens, scores, types):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(tokens)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.unk_id = int(field(reader, "tokenizer.ggml.unknown_token_id", 0))
    model.trainer_spec.bos_id = int(field(reader, "tokenizer.ggml.bos_token_id", 1))
    model.trainer_spec.eos_id = int(field(reader, "tokenizer.ggml.eos_token_id", 2))
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    return model.SerializeToString()


def import_gguf(path: Path, out_dir: Path, on_progress=None, say=print) -> Path:
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise LocalmixError("importing GGUF needs the gguf package: pip install 'localmix[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise LocalmixError(f"{path}: not a readable GGUF file ({e})") from None
    raw_config = hf_config(reader)
    args = ModelArgs.from_hf_config(raw_config, str(path))
    tensors = {t.name: t for t in reader.tensors}
    table = tensor_table(args)

    def tensor(name: str):
        source, _ = gguf_name(name)
        if source not in tensors:
            raise LocalmixError(f"{path}: no tensor {source} (for {name})")
        return tensors[source]

    kinds = {name: tensor(name).tensor_type.name for name, _ in table}
    again = sorted({kind for name, kind in kinds.items() if kind not in COPIED and len(dict(table)[name]) == 2
                    and not name.endswith("block_sparse_moe.gate.weight")})
    if again:
        say(f"{', '.join(again)} tensors are dequantized and quantized again at 8 bits (localmix copies only "
            f"{', '.join(COPIED)})")
    layouts, sizes = plan_layout(table, lambda name: COPIED.get(kinds[name], 8), GROUP)
    check_disk(Path(out_dir).parent, sum(sizes.values()))

    def arrays_of(layout) -> list:
        t = tensor(layout.name)
        _, expert = gguf_name(layout.name)
        kind = t.tensor_type.name
        data = t.data[expert] if expert is not None else t.data
        if layout.bits is None:  # norms and routers: float32
            values = data if kind in ("F32", "F16") else dequantize(data, t.tensor_type)
            return [np.asarray(values, np.float32).reshape(layout.shape)]
        heads = {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}.get(
            layout.name.split(".")[-2])
        if kind in COPIED:
            arrays = affine_blocks(kind, np.asarray(data))
            q, scales, biases = (unpermute(a, heads) for a in arrays) if heads else arrays
            return [pack(q, layout.bits), scales, biases]
        values = (np.asarray(data) if kind in ("F32", "F16") else dequantize(data, t.tensor_type))
        values = values.astype(np.float32).reshape(layout.shape)
        return list(quantize(unpermute(values, heads) if heads else values, 8, GROUP))

    tokenizer = Path(out_dir).parent / f".{Path(out_dir).name}.tokenizer.model"
    tokenizer.write_bytes(sentencepiece_model(reader))
    try:
        return write_model(Path(out_dir), sizes, lambda tmp: write_arrays(tmp, layouts, arrays_of, on_progress),
                           tokenizer, raw_config, {"repo": str(Path(path).resolve()), "revision": None,
                                                   "format": "gguf"},
                           {"bits": "/".join(sorted({str(COPIED.get(k, 8)) for k in kinds.values()})),
                            "group_size": GROUP, "method": "gguf (imported)", "gguf_types": sorted(set(kinds.values()))})
    finally:
        tokenizer.unlink(missing_ok=True)
