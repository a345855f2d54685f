"""GGUF import: llama.cpp's affine types copied exactly, others quantized again, the tokenizer rebuilt.

The GGUF files are made here with the gguf package's writer and quantizers, from a small random
Mixtral, with llama.cpp's q/k row order (as its converter writes them); Q4_K blocks, which the
gguf package cannot make, are drawn at random."""

import json
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is in the test extra")

import localmix  # noqa: E402
from localmix.checkpoint import Checkpoint  # noqa: E402
from localmix.quality import kl_divergence, top1_agreement  # noqa: E402
from localmix.tokenizer import Tokenizer  # noqa: E402

from conftest import TOKENIZER_V1, make_hf_model  # noqa: E402
from test_cli import assert_one_line_error, localmix_cli  # noqa: E402

T = gguf.GGMLQuantizationType
IDS = [1, 415, 2936, 9060, 285, 1142, 754, 28705, 12, 99]


def permute(w, heads):
    """llama.cpp's converter: each head's two rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_k_blocks(rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_K super-blocks: d, dmin, 8 six-bit scales and mins packed as llama.cpp packs them, 4-bit values."""
    n = rows * cols // 256
    d = (rng.random(n) * 0.002 + 0.001).astype(np.float16).view(np.uint8).reshape(n, 2)
    dmin = (rng.random(n) * 0.002).astype(np.float16).view(np.uint8).reshape(n, 2)
    sc, m = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    qs = rng.integers(0, 256, (n, 128), dtype=np.uint8)
    return np.concatenate([d, dmin, packed, qs], axis=1).reshape(rows, -1)


def shape_header(w, c):
    """The model's shape in a GGUF writer's metadata, as llama.cpp's converter writes it."""
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    return w


def write_gguf(hf, path, embed=T.Q4_0, attention=T.Q8_0, experts=T.Q4_0, output=T.F16, q4_k=False, seed=0):
    """A Mixtral GGUF of the HF folder's weights, as llama.cpp's converter lays it out."""
    checkpoint = Checkpoint(hf)
    c = checkpoint.config
    state = {name: checkpoint._file(shard).load(name) for name, shard in checkpoint.weight_map.items()}
    rng = np.random.default_rng(seed)
    w = shape_header(gguf.GGUFWriter(str(path), "llama"), c)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    from sentencepiece import sentencepiece_model_pb2 as pb
    model = pb.ModelProto()
    model.ParseFromString(TOKENIZER_V1.read_bytes())
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in model.pieces])
    w.add_token_scores([p.score for p in model.pieces])
    w.add_token_types([int(p.type) for p in model.pieces])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, value, kind):
        if kind in (T.F32, T.F16):
            w.add_tensor(name, value.astype(np.float32 if kind == T.F32 else np.float16))
        elif kind == T.Q4_K:
            w.add_tensor(name, q4_k_blocks(int(np.prod(value.shape[:-1])), value.shape[-1], rng).reshape(
                *value.shape[:-1], -1), raw_dtype=T.Q4_K)
        else:
            w.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)

    add("token_embd.weight", state["model.embed_tokens.weight"], embed)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], T.F32)
        add(f"blk.{i}.attn_q.weight", permute(state[p + "self_attn.q_proj.weight"], c.num_attention_heads), attention)
        add(f"blk.{i}.attn_k.weight", permute(state[p + "self_attn.k_proj.weight"], c.num_key_value_heads), attention)
        add(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"], attention)
        add(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"], attention)
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], T.F32)
        add(f"blk.{i}.ffn_gate_inp.weight", state[p + "block_sparse_moe.gate.weight"], T.F32)
        for kind, part in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
            stacked = np.stack([state[f"{p}block_sparse_moe.experts.{e}.{part}.weight"]
                                for e in range(c.num_local_experts)])
            add(f"blk.{i}.ffn_{kind}_exps.weight", stacked, T.Q4_K if q4_k else experts)
    add("output_norm.weight", state["model.norm.weight"], T.F32)
    add("output.weight", state["lm_head.weight"], output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_hf_model(folder, dtype=torch.bfloat16, intermediate_size=256, hidden_size=256, num_key_value_heads=2)
    return folder


def pull(path, tmp_path, *args):
    result = localmix_cli("pull", path, *args, env={"LOCALMIX_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    return result, tmp_path / "home" / "models" / path.stem


def gguf_matrix(reader, name, expert=None):
    t = next(t for t in reader.tensors if t.name == name)
    data = t.data[expert] if expert is not None else t.data
    return gguf.quants.dequantize(np.asarray(data), t.tensor_type)


@pytest.mark.parametrize("experts", [T.Q4_0, T.Q4_1])
def test_affine_types_are_copied_exactly(hf, tmp_path, experts):
    path = write_gguf(hf, tmp_path / "tiny.gguf", experts=experts)
    result, folder = pull(path, tmp_path)
    assert "F16 tensors are dequantized and quantized again at 8 bits" in result.stdout + result.stderr
    model = localmix.load(folder, backend="numpy")
    reader = gguf.GGUFReader(str(path))
    layer = model.transformer.weights.layers[1]
    heads = model.config.num_attention_heads
    np.testing.assert_array_equal(layer.experts[3].w2.dequantize(), gguf_matrix(reader, "blk.1.ffn_down_exps.weight", 3))
    np.testing.assert_array_equal(layer.experts[0].w1.dequantize(), gguf_matrix(reader, "blk.1.ffn_gate_exps.weight", 0))
    np.testing.assert_array_equal(layer.wv.dequantize(), gguf_matrix(reader, "blk.1.attn_v.weight"))  # Q8_0
    np.testing.assert_array_equal(layer.wq.dequantize(), permute_back(gguf_matrix(reader, "blk.1.attn_q.weight"), heads))
    np.testing.assert_array_equal(model.transformer.weights.embed.dequantize(np.arange(50)),
                                  gguf_matrix(reader, "token_embd.weight")[:50])
    # The whole model: close to the float original (only quantization apart), so q and k rows are in place.
    exact = localmix.load(hf).logits(IDS)
    ours = model.logits(IDS)
    assert kl_divergence(exact, ours) < 0.05 and top1_agreement(exact, ours) >= 0.8
    assert localmix_cli("verify", folder).returncode == 0


def permute_back(w, heads):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_q4_k_sub_blocks_become_groups_of_32(hf, tmp_path):
    path = write_gguf(hf, tmp_path / "tiny-k.gguf", q4_k=True)
    _, folder = pull(path, tmp_path)
    model = localmix.load(folder, backend="numpy")
    reader = gguf.GGUFReader(str(path))
    for e in (0, 2):
        got = model.transformer.weights.layers[0].experts[e].w3.dequantize()
        expected = gguf_matrix(reader, "blk.0.ffn_up_exps.weight", e)
        # Only the folded scale d*sc and bias dmin*m are rounded to float16: 2^-11 of each.
        bound = (np.abs(expected) + 0.0021 * 64) * 2.0 ** -10
        assert (np.abs(got - expected) <= bound).all()
        assert model.transformer.weights.layers[0].experts[e].w3.group_size == 32


def test_the_tokenizer_comes_from_the_gguf_vocabulary(hf, tmp_path):
    _, folder = pull(write_gguf(hf, tmp_path / "tok.gguf"), tmp_path)
    rebuilt, original = Tokenizer(folder / "tokenizer.model"), Tokenizer(TOKENIZER_V1)
    for text in ["Hello world", "  Two spaces,\ttabs\nand newlines", "日本語 and emoji 🙂", "[INST] not control [/INST]"]:
        assert rebuilt.encode(text, bos=True) == original.encode(text, bos=True)
        assert rebuilt.decode(original.encode(text)) == text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Why?"}]
    assert rebuilt.apply_chat_template(messages) == original.apply_chat_template(messages)


def test_bad_gguf_files(hf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)
    assert_one_line_error(localmix_cli("pull", broken, env={"LOCALMIX_HOME": str(tmp_path / "home")}),
                          "not a readable GGUF file")
    w = gguf.GGUFWriter(str(tmp_path / "dense.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(localmix_cli("pull", tmp_path / "dense.gguf", env={"LOCALMIX_HOME": str(tmp_path / "home")}),
                          "not a mixture-of-experts GGUF localmix imports (architecture 'llama'")


def test_pull_a_gguf_file_of_a_hub_repository(hf, tmp_path):
    from fake_hub import FakeHub
    folder = tmp_path / "repo"
    folder.mkdir()
    write_gguf(hf, folder / "tiny-Q8_0.gguf", embed=T.Q8_0, experts=T.Q8_0, output=T.Q8_0)
    hub = FakeHub()
    hub.add_folder("someone/tiny-GGUF", folder)
    env = {"LOCALMIX_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    try:
        result = localmix_cli("pull", "someone/tiny-GGUF", "--file", "tiny-Q8_0.gguf", env=env)
        missing = localmix_cli("pull", "someone/tiny-GGUF", "--file", "other.gguf", env=env)
    finally:
        hub.close()
    assert result.returncode == 0, result.stderr
    model = localmix.load(tmp_path / "home" / "models" / "tiny-Q8_0", backend="numpy")
    assert model.transformer.weights.lm_head.bits == 8 and "quantized again" not in result.stderr
    assert_one_line_error(missing, "no other.gguf in the repository")


def patched(path, out, edits):
    """A copy of a GGUF file with bytes replaced: edits are (offset, struct format, value)."""
    data = bytearray(path.read_bytes())
    for offset, fmt, value in edits:
        raw = struct.pack(fmt, value)
        data[offset:offset + len(raw)] = raw
    out.write_bytes(bytes(data))
    return out


def test_lying_gguf_files_are_one_error_line_and_list_nothing(hf, tmp_path):
    """The issue's hostile files: block_count 10^9 (which ran pull into an 8 GiB limit), an expert
    stack's type relabelled Q4_0 -> Q4_1, a tensor offset of 2^64-1 (wrapping around in C)."""
    path = write_gguf(hf, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(path))
    block_count = reader.fields["llama.block_count"]
    value_at = block_count.offset + sum(int(p.nbytes) for p in block_count.parts[:3])
    info = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight").field
    type_at = info.offset + sum(int(p.nbytes) for p in info.parts[:4])
    env = {"LOCALMIX_HOME": str(tmp_path / "home")}
    for edits, message in [([(value_at, "<I", 10**9)], "llama.block_count must be between 1 and 1024"),
                           ([(type_at, "<I", int(T.Q4_1))], "a type or shape that does not match the data"),
                           ([(type_at + 4, "<Q", 2**64 - 1)], "is not a multiple of the alignment"),
                           ([(type_at + 4, "<Q", 2**64 - 32)], "past the end of the file")]:
        result = localmix_cli("pull", patched(path, tmp_path / "lie.gguf", edits), env=env)
        assert_one_line_error(result, message)
        assert "lie.gguf" in result.stderr  # the file is named
        assert not [p for p in (tmp_path / "home" / "models").iterdir() if not p.name.endswith(".lock")]


def test_array_counts_and_skipped_arrays_cost_no_more_than_the_file(tmp_path):
    """GGUFReader makes a numpy object per array element and believes the count a file states; the
    importer's header parse keeps only the arrays it uses and bounds every count by the bytes left."""
    import tracemalloc

    from localmix.errors import LocalmixError
    from localmix.quant.gguf_import import GGUFFile

    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["<unk>", "<s>", "</s>"])
    w.add_key_value("fuzz.bytes", [0] * 2_000_000, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tracemalloc.start()
    parsed = GGUFFile(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert parsed.metadata["fuzz.bytes"] == (gguf.GGUFValueType.ARRAY, None)  # bounds-checked, not kept
    assert parsed.metadata["tokenizer.ggml.tokens"][1] == ["<unk>", "<s>", "</s>"]
    assert peak < path.stat().st_size // 10, peak

    # header (24 bytes), general.architecture = "llama" (45), the tokens' key length, key, type, item type
    count_at = 24 + 45 + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    assert struct.unpack("<Q", path.read_bytes()[count_at:count_at + 8]) == (3,)
    for count in (2**20, 2**40, 2**64 - 1):
        with pytest.raises(LocalmixError, match="tokenizer.ggml.tokens"):
            GGUFFile(patched(path, tmp_path / "count.gguf", [(count_at, "<Q", count)]))


# -- Qwen2-MoE, Qwen3-MoE, OLMoE: llama.cpp's qwen2moe, qwen3moe and olmoe, with byte-level BPE ----------

ARCHES = {"qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "olmoe": gguf.MODEL_ARCH.OLMOE}
# Expert and shared widths a multiple of 32 (GGUF's blocks); the routing llama.cpp hard-codes for
# each architecture (norm_topk_prob: Qwen3-MoE renormalizes, the others do not); OLMoE's q, k and v
# clamped (clip_qkv, llama.cpp's attention.clamp_kqv) where the values reach it.
NEW_FAMILIES = {
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=32, num_hidden_layers=3, num_local_experts=8,
                      num_experts_per_tok=3, norm_topk_prob=True, moe_intermediate_size=64),
    "qwen2_moe": dict(model_type="qwen2_moe", num_local_experts=6, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=96),
    "olmoe": dict(model_type="olmoe", num_local_experts=8, num_experts_per_tok=2, intermediate_size=64,
                  eos_token_id=2, clip_qkv=0.3, num_key_value_heads=4),  # llama.cpp's olmoe: no GQA
}
EXPERT_TYPES = {"qwen3_moe": T.Q8_0, "qwen2_moe": T.Q4_1, "olmoe": T.Q4_0}


def original_tokenizer(folder, pre: str, bos: bool = False, cls: str | None = None):
    """A byte-level BPE tokenizer folder as the hub has them: Qwen2's split (Qwen2Tokenizer, ChatML)
    or GPT-2's (OLMoE's GPTNeoXTokenizer, its template writing <|endoftext|> as bos_token). The
    classes are the hub's: transformers 5 builds their normalizer and pre-tokenizer itself, not
    from tokenizer.json, so the reference ids are those of Qwen's and OLMoE's real tokenizers.
    bos: instead, a tokenizer.json taken as it is whose post-processor puts BOS before each text.
    cls: another class (GPT2Tokenizer: GPT-2's split without NFC)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, \
        trainers
    from test_hf_tokenizer import CHATML, CORPUS, OLMOE, PATTERN

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
                         if pre == "qwen2" else pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if pre == "qwen2":
        specials, extra = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"]
        config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                  "pad_token": "<|endoftext|>", "chat_template": CHATML}
    else:
        specials, extra = ["<|endoftext|>", "<|padding|>"], ["<|system|>", "<|user|>", "<|assistant|>"]
        config = {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                  "pad_token": "<|padding|>", "chat_template": OLMOE}
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in extra])
    if bos:
        first = (config["bos_token"], tok.token_to_id(config["bos_token"]))
        tok.post_processor = processors.TemplateProcessing(single=f"{first[0]} $A", pair=f"{first[0]} $A $B",
                                                           special_tokens=[first])
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["tokenizer_class"] = cls or config["tokenizer_class"]
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": False, **config}))
    return folder


def bpe_vocabulary(folder, vocab_size: int) -> tuple[list[str], list[int]]:
    """The tokens and their types as llama.cpp's convert_hf_to_gguf writes them (_set_vocab_gpt2):
    every id up to the embeddings' rows ([PAD<i>] unused where the tokenizer has none), added
    tokens as CONTROL when special or when they look special (<|...|>), else USER_DEFINED."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            looks_special = by_id[i].startswith("<|") and by_id[i].endswith("|>")
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_bpe_vocabulary(w, folder, vocab_size: int, pre: str):
    """The tokenizer metadata as the converter writes it: the vocabulary, then the gguf package's own
    SpecialVocab (merges, special ids, add_bos/add_eos, the chat template)."""
    tokens, types = bpe_vocabulary(folder, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def write_family_gguf(hf, path, tokenizer, experts=T.Q4_0, pre=None):
    """A qwen2moe / qwen3moe / olmoe GGUF of the HF folder's weights, named by gguf's own tensor map
    (convert_hf_to_gguf's), rows in transformers' order (llama.cpp permutes llama's q/k only);
    vectors and routers F32, other matrices Q8_0, experts stacked in `experts`. Returns the path and
    the weights as the file holds them (dequantized by the gguf package), by transformers name."""
    checkpoint = Checkpoint(hf)
    c = checkpoint.config
    arch = ARCHES[c.model_type]
    names = gguf.get_tensor_name_map(arch, c.num_hidden_layers)
    state = {name: checkpoint._file(shard).load(name) for name, shard in checkpoint.weight_map.items()}
    w = shape_header(gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch]), c)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    if c.model_type != "olmoe":
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    if c.clip_qkv is not None:
        w.add_clamp_kqv(c.clip_qkv)
    add_bpe_vocabulary(w, tokenizer, c.vocab_size, pre or ("olmo" if c.model_type == "olmoe" else "qwen2"))
    held = {}

    def add(name, value, kind):
        if kind == T.F32:
            w.add_tensor(name, value.astype(np.float32))
            return value.astype(np.float32)
        data = gguf.quants.quantize(value, kind)
        w.add_tensor(name, data, raw_dtype=kind)
        return gguf.quants.dequantize(data, kind)

    stacks = {}
    for name, value in state.items():
        if ".experts." in name:
            parts = name.split(".")
            stacks.setdefault((int(parts[2]), parts[-2]), {})[int(parts[5])] = value
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        small = value.ndim == 1 or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
        held[name] = add(target, value, T.F32 if small else T.Q8_0)
    for (layer, part), by_expert in stacks.items():
        stacked = add(f"blk.{layer}.ffn_{part.removesuffix('_proj')}_exps.weight",
                      np.stack([by_expert[e] for e in range(len(by_expert))]), experts)
        for e in range(len(by_expert)):
            held[f"model.layers.{layer}.mlp.experts.{e}.{part}.weight"] = stacked[e]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, held


@pytest.fixture(scope="module", params=list(NEW_FAMILIES))
def family_gguf(request, tmp_path_factory):
    """(family, the float HF folder, the same model holding the GGUF's values as floats, the GGUF,
    its original tokenizer folder, the pulled model)."""
    from safetensors.numpy import save_file
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = root / "hf"
    make_hf_model(hf, dtype=torch.bfloat16, **NEW_FAMILIES[family])
    tokenizer = original_tokenizer(root / "tokenizer", "olmo" if family == "olmoe" else "qwen2")
    path, held = write_family_gguf(hf, root / f"tiny-{family}.gguf", tokenizer, EXPERT_TYPES[family])
    as_held = root / "as-held"
    as_held.mkdir()
    save_file(held, str(as_held / "model.safetensors"))
    for name in ("config.json", "tokenizer.model"):
        (as_held / name).write_bytes((hf / name).read_bytes())
    _, folder = pull(path, root)
    return family, hf, as_held, path, tokenizer, folder


def test_new_families_import_the_files_values(family_gguf):
    """The pulled model computes what the file holds: its logits are those of the float model
    holding the GGUF's values (every type here is copied, not quantized again), and near the
    original float model's (so no tensor went to the wrong place on both sides)."""
    family, hf, as_held, path, _, folder = family_gguf
    model = localmix.load(folder, backend="numpy")
    assert model.config.model_type == family
    assert model.config.norm_topk_prob == {"qwen3_moe": True, "qwen2_moe": False, "olmoe": False}[family]
    ours, held = model.logits(IDS), localmix.load(as_held).logits(IDS)
    assert np.abs(ours - held).max() <= 1e-4 * np.abs(held).max()
    exact = localmix.load(hf).logits(IDS)
    assert kl_divergence(exact, ours) < 0.05 and top1_agreement(exact, ours) >= 0.8
    layer = model.transformer.weights.layers[0]
    reader = gguf.GGUFReader(str(path))
    np.testing.assert_array_equal(layer.experts[1].w3.dequantize(), gguf_matrix(reader, "blk.0.ffn_up_exps.weight", 1))
    np.testing.assert_array_equal(layer.wq.dequantize(), gguf_matrix(reader, "blk.0.attn_q.weight"))  # not permuted
    assert localmix_cli("verify", folder).returncode == 0


def test_the_byte_level_bpe_tokenizer_gives_the_originals_ids(family_gguf):
    """The tokenizer rebuilt from the GGUF's vocabulary, merges and pre-tokenizer name gives the
    original tokenizer.json's ids (transformers on the original folder) on text and chats."""
    import transformers
    from test_hf_tokenizer import CORPUS, TEXTS, conversations

    from localmix.tokenizer import load_tokenizer
    family, _, _, _, original, folder = family_gguf
    ours = load_tokenizer(folder, 32000)
    reference = transformers.AutoTokenizer.from_pretrained(original)
    for text in TEXTS + CORPUS[:6] + ["a<|endoftext|>b <|im_start|>"]:
        for bos in (False, True):
            want = reference(text, add_special_tokens=bos, split_special_tokens=True)["input_ids"]
            assert ours.encode(text, bos=bos) == want, text
        assert ours.decode(ours.encode(text)) == text
    added = set(reference.get_added_vocab())
    compared = 0
    for messages in conversations():
        if any(t in m["content"] for m in messages if m["role"] != "assistant" for t in added):
            continue  # a user's typed control tokens: test_hf_tokenizer covers them
        want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours.apply_chat_template(messages) == want, messages
        compared += 1
    assert compared > 30
    assert ours.eos_id == reference.eos_token_id and ours.eos_id in ours.stop_ids


def test_an_unknown_pre_tokenizer_is_one_error(family_gguf, tmp_path):
    _, hf, _, _, tokenizer, _ = family_gguf
    path, _ = write_family_gguf(hf, tmp_path / "llama-bpe.gguf", tokenizer, pre="llama-bpe")
    result = localmix_cli("pull", path, env={"LOCALMIX_HOME": str(tmp_path / "home")})
    assert_one_line_error(result, "tokenizer.ggml.pre is 'llama-bpe'")


@pytest.mark.parametrize("pre, bos, cls", [("olmo", True, None), ("gpt-2", False, "GPT2Tokenizer")])
def test_other_pre_tokenizers_and_add_bos(tmp_path, pre, bos, cls):
    """A GGUF whose tokenizer adds BOS (tokenizer.ggml.add_bos_token, as the converter reads it off
    the post-processor) gives a tokenizer.json that adds it as the original does; "gpt-2" is GPT-2's
    split without OLMoE's NFC (transformers' GPT2Tokenizer), which a decomposed é tells apart."""
    import transformers
    from test_hf_tokenizer import TEXTS

    from localmix.quant.gguf_bpe import tokenizer_config, tokenizer_json
    from localmix.tokenizer import load_tokenizer
    original = original_tokenizer(tmp_path / "original", "olmo", bos=bos, cls=cls)
    tokens, types = bpe_vocabulary(original, 1024)
    special = gguf.SpecialVocab(original, load_merges=True, n_vocab=1024)
    first, eos = special.special_token_ids["bos"], special.special_token_ids["eos"]
    assert special.add_special_token.get("bos", False) == bos
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    (rebuilt / "tokenizer.json").write_text(tokenizer_json(rebuilt, tokens, np.array(types), special.merges, pre,
                                                           first, bos))
    (rebuilt / "tokenizer_config.json").write_text(tokenizer_config(tokens, first, eos, None, bos, None))
    ours, reference = load_tokenizer(rebuilt, 1024), transformers.AutoTokenizer.from_pretrained(original)
    for text in TEXTS + ["cafe\u0301 vs caf\u00e9"]:
        want = reference(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        assert (want[:1] == [first]) == bos and ours.encode(text, bos=True) == want, text
        assert ours.encode(text) == want[bos:]


def test_a_pulled_gguf_exports_to_mlx_lm(family_gguf, tmp_path):
    """The config and tokenizer files an import writes are complete enough for mlx-lm: the export
    of a pulled GGUF loads in mlx_lm and computes our logits (OLMoE's here clamps q, k and v, which
    mlx-lm's olmoe does not: refused)."""
    mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'mlx[cpu]' on Linux)")
    mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")
    family, _, _, _, _, folder = family_gguf
    exported = tmp_path / "mlx"
    result = localmix_cli("export", folder, exported, "--format", "mlx-lm")
    if family == "olmoe":
        assert_one_line_error(result, "mlx-lm's olmoe has no place for clip_qkv")
        return
    assert result.returncode == 0, result.stderr
    model, tokenizer = mlx_lm.load(str(exported))
    model.set_dtype(mx.float32)
    theirs = np.array(model(mx.array([IDS]))[0].astype(mx.float32))
    ours = localmix.load(folder, backend="numpy").logits(IDS)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 1e-4
    assert tokenizer.encode("Hello world!") == localmix.load(folder).tokenizer.encode("Hello world!")


# --- export: a localmix model as a GGUF file llama.cpp loads ---------------------------------------

@pytest.mark.parametrize("bits,group_size", [("4", 64), ("4", 32), ("3", 64), ("2", 64)])
def test_export_copies_4_3_and_2_bit_groups_as_q4_1_exactly_and_imports_back(hf, tmp_path, bits, group_size):
    result = localmix_cli("pull", hf, "--bits", bits, "--group-size", group_size, "--name", "tiny",
                          env={"LOCALMIX_HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "home" / "models" / "tiny"
    out = tmp_path / "tiny.gguf"
    result = localmix_cli("export", folder, out)
    assert result.returncode == 0, result.stderr
    assert "8-bit tensors become F16" in result.stderr and not list(tmp_path.glob(".tiny.gguf*"))
    assert (f"{bits}-bit tensors become Q4_1 exactly" in result.stderr) == (bits in ("3", "2"))
    model = localmix.load(folder, backend="numpy")
    weights, heads = model.transformer.weights, model.config.num_attention_heads
    reader = gguf.GGUFReader(str(out))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.1.ffn_down_exps.weight"] == kinds["token_embd.weight"] == T.Q4_1
    assert kinds["output.weight"] == T.F16 and kinds["blk.0.attn_norm.weight"] == T.F32
    layer = weights.layers[1]
    for e in range(len(layer.experts)):  # every expert of the stack, bit for bit
        np.testing.assert_array_equal(layer.experts[e].w2.dequantize(), gguf_matrix(reader, "blk.1.ffn_down_exps.weight", e))
        np.testing.assert_array_equal(layer.experts[e].w3.dequantize(), gguf_matrix(reader, "blk.1.ffn_up_exps.weight", e))
    np.testing.assert_array_equal(layer.wq.dequantize(), permute_back(gguf_matrix(reader, "blk.1.attn_q.weight"), heads))
    np.testing.assert_array_equal(layer.wk.dequantize(),
                                  permute_back(gguf_matrix(reader, "blk.1.attn_k.weight"), model.config.num_key_value_heads))
    np.testing.assert_array_equal(layer.router, gguf_matrix(reader, "blk.1.ffn_gate_inp.weight"))
    np.testing.assert_array_equal(weights.lm_head.dequantize().astype(np.float16), gguf_matrix(reader, "output.weight"))
    # Imported back (Q4_1 is copied as groups of 32): the same weights, so the same logits where the
    # output head is again what it was (8 bits of an F16 copy of 8 bits: within its rounding).
    _, back = pull(out, tmp_path / "again")
    reimported = localmix.load(back, backend="numpy")
    np.testing.assert_array_equal(reimported.transformer.weights.layers[1].experts[3].w1.dequantize(),
                                  layer.experts[3].w1.dequantize())
    exact, again = model.logits(IDS), reimported.logits(IDS)
    assert np.abs(again - exact).max() < 0.01 * np.abs(exact).max()
    assert_one_line_error(localmix_cli("export", folder, out), "exists; remove it")
    assert_one_line_error(localmix_cli("export", folder, tmp_path / "x.bin", "--format", "onnx"),
                          "unknown export format 'onnx'")


def test_a_model_with_experts_at_3_and_4_bits_exports_to_gguf_not_to_mlx_lm(hf, tmp_path):
    """A `shrink`-made model (a size one byte short: one expert at 3 bits): its layers' expert stacks
    in GGUF hold each expert's values bit for bit (3- and 4-bit groups both become Q4_1 exactly);
    mlx-lm keeps a layer's experts in one format, so that export is refused in one line."""
    from localmix.quant.convert import LocalSource, convert
    from localmix.quant.sizing import resize
    from localmix.store import read_manifest
    whole = convert(LocalSource(hf), tmp_path / "whole", bits="4")
    size = sum(f["size"] for f in read_manifest(whole)["files"].values()) - 1
    folder = resize(whole, tmp_path / "shrunk", size, say=lambda _: None)
    model = localmix.load(folder, backend="numpy")
    bits = [[e.w1.bits for e in layer.experts] for layer in model.transformer.weights.layers]
    assert sorted(b for layer in bits for b in layer) == [3] + [4] * (sum(map(len, bits)) - 1)
    out = tmp_path / "shrunk.gguf"
    result = localmix_cli("export", folder, out)
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(str(out))
    for i, layer in enumerate(model.transformer.weights.layers):
        for e in range(len(layer.experts)):
            np.testing.assert_array_equal(layer.experts[e].w1.dequantize(), gguf_matrix(reader, f"blk.{i}.ffn_gate_exps.weight", e))
    assert_one_line_error(localmix_cli("export", folder, tmp_path / "mlx", "--format", "mlx-lm"),
                          "mlx-lm keeps a layer's experts in one format")
    assert not (tmp_path / "mlx").exists()


def field(reader, key):
    """A GGUF metadata value as a list (strings decoded)."""
    f = reader.fields[key]
    values = [f.parts[i] for i in f.data]
    return [bytes(v).decode() if v.dtype == np.uint8 else v.tolist() for v in values]


def test_a_pulled_gguf_exports_back_to_its_values_and_vocabulary(family_gguf, tmp_path):
    """GGUF -> localmix -> GGUF, for Qwen3-MoE and Qwen2-MoE (shared expert; OLMoE with clip_qkv is refused):
    the experts' values (Q8_0, copied as 8-bit groups, come back as F16 within its rounding; Q4_1
    and Q4_0 as Q4_1 exactly), the other tensors and the byte-level vocabulary (tokens, types,
    merges, the pre-tokenizer's name) come back, and the file pulled again computes the same logits."""
    family, _, _, path, _, folder = family_gguf
    out = tmp_path / "again.gguf"
    result = localmix_cli("export", folder, out)
    if family == "olmoe":  # this one has clip_qkv, which llama.cpp applies otherwise
        assert_one_line_error(result, "clamps q, k and v otherwise than transformers")
        assert not out.exists()
        return
    assert result.returncode == 0, result.stderr
    original, exported = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(out))
    arch = field(original, "general.architecture")[0]
    for name in ("blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        assert {t.name: t.tensor_type for t in exported.tensors}[name] == (T.F16 if family == "qwen3_moe" else T.Q4_1)
        for e in range(4):
            np.testing.assert_allclose(gguf_matrix(exported, name, e), gguf_matrix(original, name, e), rtol=2 ** -11)
    for name in {"qwen3_moe": ["blk.1.attn_k_norm.weight"],
                 "qwen2_moe": ["blk.1.ffn_gate_inp_shexp.weight", "blk.0.attn_q.bias"]}[family]:
        np.testing.assert_array_equal(gguf_matrix(exported, name), gguf_matrix(original, name))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges", "general.architecture",
                f"{arch}.expert_used_count", f"{arch}.expert_count"):
        assert field(exported, key) == field(original, key), key
    again = tmp_path / "home"
    result = localmix_cli("pull", out, "--name", "again", env={"LOCALMIX_HOME": str(again)})
    assert result.returncode == 0, result.stderr
    ids = [1, 415, 2936, 9060, 285]
    before = localmix.load(folder, backend="numpy").logits(ids)
    after = localmix.load(again / "models" / "again", backend="numpy").logits(ids)
    # tensors that went to F16 are quantized again by the pull: within that rounding
    print(f"{family}: pulled again, logits within {np.abs(after - before).max() / np.abs(before).max():.1%}")
    assert np.abs(after - before).max() <= 0.1 * np.abs(before).max()

    tokens, types = field(original, "tokenizer.ggml.tokens"), field(original, "tokenizer.ggml.token_type")
    ours = field(exported, "tokenizer.ggml.tokens")
    assert [t for t, k in zip(ours, field(exported, "tokenizer.ggml.token_type")) if k != [5]] == \
        [t for t, k in zip(tokens, types) if k != [5]]  # the unused padding rows aside
