"""Export a localmix model as a GGUF file, which llama.cpp (and Ollama) load: the way out to the
engines that take GGUF (llama.cpp's RPC backend across machines, Ollama's server).

llama.cpp's Q4_1 is the rule localmix's 4-bit groups follow, x = d q + m in blocks of 32, so 4-bit
groups of 64 (or 32, 128) become Q4_1 blocks exactly: a group's scale and bias serve each of its
blocks as d and m, and only the nibbles move (MLX packs value k of a word at bits 4k; a Q4_1 block's
byte j holds values j and j + 16). 3- and 2-bit groups become Q4_1 exactly too (their values are 4-bit
ones below 4; GGUF has no affine 2-bit type, and Q2_K is not affine in groups), at 1.8 times their
bytes. GGUF has no affine 8-bit type, so 8-bit tensors (the output head of a `--bits 4` model, say)
are dequantized and stored as F16, the closest GGUF allows, and the export says so. Norms and routers stay F32. llama.cpp keeps Mixtral's q and k
rows in its own rotary order (the import puts them back, gguf_import.unpermute): they are permuted
here as its converter does. The tokenizer goes in as llama.cpp's `llama` vocabulary (sentencepiece
pieces, scores and types) or, for a tokenizer.json (Qwen3-MoE, Qwen2-MoE, OLMoE), as its `gpt2` one: tokens by id
(rows no token has as UNUSED `[PAD<id>]`, as llama.cpp's converter writes them), merges, the
pre-tokenizer's name (one of those gguf_bpe rebuilds, compared as a whole), BOS/EOS and the chat
template.

Memory stays bounded: a tensor is converted a block of rows at a time, and a layer's stacked
experts one expert at a time, written straight after the header. The file is written beside its
final name and renamed into place at the end: an interrupted export leaves no half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from localmix import validate
from localmix.checkpoint import tensor_table
from localmix.errors import LocalmixError
from localmix.quant.affine import unpack
from localmix.quant.convert import check_disk
from localmix.quant.gguf_bpe import CONTROL, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED
from localmix.quant.gguf_import import NORM_TOPK, _gguf, gguf_name, gguf_shapes
from localmix.store import ModelFolder, is_localmix_model
from localmix.tokenizer import HF_TOKENIZER, MAX_TOKENIZER_BYTES, SENTENCEPIECE, read_tokenizer

ARCHITECTURES = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe",
                 "olmoe": "olmoe"}  # transformers model_type -> llama.cpp's
Q4_1_BYTES = 20  # a block of 32: float16 d, float16 m, 16 bytes of nibbles
ROWS_AT_ONCE = 4096  # rows converted together: a few tens of MB at Mixtral's widths


def q4_1_blocks(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """4- or 2-bit affine rows (MLX-packed words, a float16 scale and bias per group) as Q4_1
    blocks: [rows, cols / 32 * 20] bytes, the same numbers (2-bit values are 4-bit ones below 4)."""
    q = unpack(words, bits)
    rows, cols = q.shape
    repeat = group_size // 32  # blocks per group, each with the group's scale and bias
    blocks = np.empty((rows, cols // 32, Q4_1_BYTES), np.uint8)
    blocks[:, :, 0:2] = np.repeat(scales, repeat, axis=1).view(np.uint8).reshape(rows, -1, 2)
    blocks[:, :, 2:4] = np.repeat(biases, repeat, axis=1).view(np.uint8).reshape(rows, -1, 2)
    q = q.reshape(rows, cols // 32, 32)
    blocks[:, :, 4:] = q[:, :, :16] | (q[:, :, 16:] << 4)
    return blocks.reshape(rows, -1)


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k row order to llama.cpp's (each head's two halves interleaved): the inverse
    of gguf_import.unpermute."""
    per_head = rows.shape[0] // heads
    return rows.reshape(heads, 2, per_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_kind(matrix) -> str:
    """The GGUF type a stored tensor becomes: Q4_1 for 4-, 3- and 2-bit groups (exact), F16 for 8-bit
    ones (dequantized), F32 for float tensors."""
    if isinstance(matrix, np.ndarray):
        return "F32"
    return "Q4_1" if matrix.bits in (2, 3, 4) and matrix.group_size % 32 == 0 else "F16"


def stack_kind(matrices: list) -> str:
    """One GGUF type for a tensor made of these (a layer's experts stacked): theirs where they
    share it, else F16."""
    kinds = {gguf_kind(m) for m in matrices}
    return kinds.pop() if len(kinds) == 1 else "F16"


def as_rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a stored tensor; a vector (a norm) is one row."""
    return (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])


def row_bytes(kind: str, cols: int) -> int:
    return {"Q4_1": cols // 32 * Q4_1_BYTES, "F16": 2 * cols, "F32": 4 * cols}[kind]


def converted_rows(matrix, kind: str, rows: slice) -> np.ndarray:
    """Rows of a stored tensor in its GGUF type, as bytes or float arrays."""
    if kind == "F32":
        return np.ascontiguousarray(matrix[rows], np.float32)
    if kind == "Q4_1":
        return q4_1_blocks(matrix.words[rows], matrix.scales[rows], matrix.biases[rows], matrix.bits, matrix.group_size)
    return matrix.dequantize(rows).astype(np.float16)


def rope_heads(name: str, args) -> int | None:
    """The heads whose rows llama.cpp wants in its rotary order (llama's q and k only)."""
    if args.model_type != "mixtral":
        return None
    return {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}.get(name.split(".")[-2])


def sentencepiece_vocabulary(path: Path) -> tuple[list[str], list[float], list[int], dict]:
    """(pieces, scores, types, special ids) of a sentencepiece model; its types are GGUF's."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise LocalmixError("exporting a tokenizer to GGUF needs protobuf: pip install 'localmix[gguf]'") from None
    model = pb.ModelProto()
    model.ParseFromString(path.read_bytes())
    spec = model.trainer_spec
    special = {"bos": spec.bos_id, "eos": spec.eos_id, "unk": spec.unk_id}
    return ([p.piece for p in model.pieces], [p.score for p in model.pieces], [p.type for p in model.pieces],
            {k: v for k, v in special.items() if v >= 0})


def splitting(pre_tokenizer):
    """A tokenizer.json pre-tokenizer without what does not change the ids (offsets' trimming)."""
    if isinstance(pre_tokenizer, dict):
        return {k: splitting(v) for k, v in pre_tokenizer.items() if k != "trim_offsets"}
    if isinstance(pre_tokenizer, list):
        return [splitting(v) for v in pre_tokenizer]
    return pre_tokenizer


def bpe_vocabulary(files: dict[str, Path], vocab_size: int, config: dict, source: str) -> dict:
    """A byte-level BPE tokenizer.json as GGUF's `gpt2` vocabulary. Its special tokens, chat
    template and whether prompts start with BOS come from the tokenizer as localmix reads it
    (read_tokenizer: tokenizer_config.json, chat_template.jinja, the class's defaults, checked);
    tokens, merges and pre-tokenizer from tokenizer.json, read with a size bound."""
    tokenizer = read_tokenizer(files, vocab_size, source, config)
    where = f"{source}: {HF_TOKENIZER}"
    data = validate.json_object(validate.read_json(files[HF_TOKENIZER], HF_TOKENIZER, MAX_TOKENIZER_BYTES), where)
    model = validate.json_object(data.get("model"), where, "model")
    if model.get("type") != "BPE":
        raise LocalmixError(f"{where}: the GGUF export takes byte-level BPE tokenizers, not {model.get('type')!r:.40}")
    pre = next((name for name, (normalizer, pre_tokenizer) in PRE_TOKENIZERS.items()
                if data.get("normalizer") == normalizer
                and splitting(data.get("pre_tokenizer")) == splitting(pre_tokenizer)), None)
    if pre is None:
        raise LocalmixError(f"{where}: its pre-tokenizer is none of those llama.cpp names and localmix knows "
                            f"({', '.join(PRE_TOKENIZERS)}); another name would split text otherwise")
    # (read_tokenizer checked every id against vocab_size)
    tokens, types = [None] * vocab_size, [NORMAL] * vocab_size
    for token, i in validate.json_object(model.get("vocab"), where, "model.vocab").items():
        tokens[i] = token
    for added in data.get("added_tokens") or []:
        tokens[added["id"]], types[added["id"]] = added["content"], CONTROL if added.get("special") else USER_DEFINED
    for i, token in enumerate(tokens):
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pad = tokenizer.special_tokens.get("pad_token")
    bos = tokenizer.bos_id
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre, "bos": bos, "eos": tokenizer.eos_id,
            "pad": None if pad is None else tokens.index(pad),
            "add_bos": bos is not None and tokenizer.encode("a", bos=True)[:1] == [bos],
            "chat_template": tokenizer.template.text if tokenizer.template else None}


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, on_progress=None, say=print) -> Path:
    """Write the localmix model in `folder` as the GGUF file `out` (which must not exist).
    on_progress(done, total) counts bytes written; say() gets what was not copied exactly."""
    gguf = _gguf()
    folder, out = Path(folder), Path(out)
    if not is_localmix_model(folder):
        raise LocalmixError(f"{folder} is not a localmix model (no manifest.json); `localmix pull` makes one")
    if out.exists():
        raise LocalmixError(f"{out} exists; remove it or choose another name")
    model = ModelFolder(folder)
    args = model.config
    arch = ARCHITECTURES.get(args.model_type)
    if arch is None:
        raise LocalmixError(f"exporting {args.model_type} models to GGUF is not supported yet; localmix exports "
                            f"{', '.join(ARCHITECTURES)}")
    if arch == "olmoe" and args.num_key_value_heads != args.num_attention_heads:
        raise LocalmixError(f"{folder}: llama.cpp's olmoe takes no grouped-query attention (its k norm is the "
                            f"width of the hidden state), and this model has {args.num_key_value_heads} kv heads "
                            f"for {args.num_attention_heads}")
    if args.clip_qkv is not None:  # llama.cpp reads clamp_kqv, and computes another model with it (67% of
        # the largest logit away from transformers' on a random OLMoE with clip_qkv 0.3; 0.18% without)
        raise LocalmixError(f"{folder}: llama.cpp's {arch} clamps q, k and v otherwise than transformers "
                            f"(clip_qkv {args.clip_qkv}): a GGUF of it would compute another model")
    if arch != "llama" and not all(args.sparse_layers):  # llama.cpp's graphs have experts in every layer
        raise LocalmixError(f"{folder}: its dense layers among sparse ones have no place in llama.cpp's {arch}")
    if args.model_type in NORM_TOPK and NORM_TOPK[args.model_type] != args.norm_topk_prob:
        raise LocalmixError(f"llama.cpp's {arch} {'renormalizes' if NORM_TOPK[args.model_type] else 'does not renormalize'}"
                            f" the chosen experts' weights and this model's config says norm_topk_prob "
                            f"{args.norm_topk_prob}: a GGUF of it would compute another model")
    # Every GGUF tensor: its localmix tensors (one, or a layer's experts in order) and its type.
    parts: dict[str, list] = {}
    for name, shape in tensor_table(args):
        parts.setdefault(gguf_name(name)[0], []).append((name, shape))
    shapes = gguf_shapes(args)
    tensors = {source: [model.tensor(name, shape) for name, shape in members] for source, members in parts.items()}
    kinds = {source: stack_kind(ms) for source, ms in tensors.items()}
    again = sorted({f"{m.bits}-bit" for source, ms in tensors.items() for m in ms if kinds[source] == "F16"})
    if again:
        say(f"{', '.join(again)} tensors become F16 (dequantized: GGUF has no affine type for them); "
            f"4-bit ones are copied as Q4_1 exactly")
    small = sorted({f"{m.bits}-bit" for ms in tensors.values() for m in ms
                    if not isinstance(m, np.ndarray) and m.bits in (2, 3)})
    if small:
        say(f"{' and '.join(small)} tensors become Q4_1 exactly (their values fit 4 bits; GGUF has no affine "
            f"type of fewer bits), so the file is larger than the model")

    def nbytes(source):
        rows, cols = as_rows(parts[source][0][1])
        return len(parts[source]) * rows * row_bytes(kinds[source], cols)

    total = sum(nbytes(source) for source in parts)
    check_disk(out.parent, total)

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(folder.name)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size if arch != "llama" else
                                   args.moe_intermediate_size or args.intermediate_size)
    if arch != "llama":
        writer.add_expert_feed_forward_length(args.moe_intermediate_size)
    if args.shared_expert_intermediate_size:  # Qwen2-MoE's shared expert
        writer.add_expert_shared_feed_forward_length(args.shared_expert_intermediate_size)

    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_expert_count(args.num_local_experts)
    writer.add_expert_used_count(args.num_experts_per_tok)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    files = model.tokenizer_files
    if SENTENCEPIECE in files:
        pieces, scores, types, special = sentencepiece_vocabulary(files[SENTENCEPIECE])
        if len(pieces) > args.vocab_size:
            raise LocalmixError(f"{folder}: the tokenizer has {len(pieces)} pieces, more than the model's "
                                f"{args.vocab_size} embeddings")
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(special.get("bos", 1))
        writer.add_eos_token_id(special.get("eos", 2))
        if "unk" in special:
            writer.add_unk_token_id(special["unk"])
        writer.add_add_bos_token(True)
    else:
        bpe = bpe_vocabulary(files, args.vocab_size, model.manifest["config"], str(folder))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe["pre"])
        writer.add_token_list(bpe["tokens"])
        writer.add_token_types(bpe["types"])
        writer.add_token_merges(bpe["merges"])
        for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                         ("pad", writer.add_pad_token_id)):
            if bpe[key] is not None:
                add(bpe[key])
        writer.add_add_bos_token(bpe["add_bos"])
        if bpe["chat_template"]:
            writer.add_chat_template(bpe["chat_template"])
    writer.add_add_eos_token(False)
    for source in parts:
        dims = shapes[source]
        kind = kinds[source]
        raw = gguf.GGMLQuantizationType[kind]
        shape = tuple(reversed(dims))  # numpy's order: [experts,] rows, columns
        if kind == "Q4_1":  # as gguf takes quantized tensors: the bytes of a row
            shape = shape[:-1] + (row_bytes(kind, shape[-1]),)
        writer.add_tensor_info(source, shape, np.dtype({"F32": np.float32, "F16": np.float16, "Q4_1": np.uint8}[kind]),
                               nbytes(source), raw_dtype=raw if kind == "Q4_1" else None)

    partial = out.with_name(f".{out.name}.partial")
    written = 0
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        for source, members in parts.items():  # in the order of the tensor infos
            writer.write_padding(f, f.tell())
            for (name, shape), matrix in zip(members, tensors[source]):
                rows, _ = as_rows(shape)
                if isinstance(matrix, np.ndarray):
                    matrix = matrix.reshape(rows, -1)
                heads = rope_heads(name, args)
                # q and k whole, their rows reordered (they are small); the rest a block of rows at a time
                step = rows if heads else ROWS_AT_ONCE
                for start in range(0, rows, step):
                    block = converted_rows(matrix, kinds[source], slice(start, min(rows, start + step)))
                    block = permute(block, heads) if heads else block
                    block.tofile(f)
                    written += block.nbytes
                    if on_progress:
                        on_progress(written, total)
            writer.write_padding(f, nbytes(source))
        writer.close()
        if written != total:
            raise LocalmixError(f"{out}: wrote {written} bytes of tensors, expected {total}")
        os.replace(partial, out)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out
