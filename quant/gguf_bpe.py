"""A Hugging Face tokenizer.json (and tokenizer_config.json) rebuilt from a GGUF's byte-level BPE
vocabulary (`tokenizer.ggml.model = "gpt2"`: Qwen, OLMoE, ...), so that a pulled model encodes
as the original tokenizer did.

llama.cpp's converter writes the vocabulary as it is in tokenizer.json (byte-level strings, `Ġ`
for a space), the merges as "left right" strings, and the added tokens with a type: CONTROL for
special ones (and those that look special, such as `<|fim_prefix|>`), USER_DEFINED for the others
(`<think>`), UNUSED for the padding entries it adds up to the embeddings' rows. What it does not
write is the pre-tokenizer: only a name (`tokenizer.ggml.pre`) that llama.cpp maps to its own
regex. Here each known name maps back to the pre-tokenizer and normalizer of the tokenizer.json it
was identified from; a name not known here is refused rather than guessed, because another split
gives other ids without any error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from localmix.errors import LocalmixError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(1, 7)

# Qwen2's (and Qwen2-MoE's, Qwen3's) split, as its tokenizer.json has it before ByteLevel.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# tokenizer.ggml.pre -> (normalizer, pre-tokenizer) of tokenizer.json, as transformers 5 builds them
# for the classes those models name: Qwen2Tokenizer (NFC, Qwen2's split), GPTNeoXTokenizer (OLMoE:
# NFC, GPT-2's split, which ByteLevel makes with use_regex), GPT2Tokenizer (GPT-2's split alone).
PRE_TOKENIZERS = {
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "trim_offsets": False, "use_regex": False}]}),
    "olmo": ({"type": "NFC"}, _BYTE_LEVEL),
    "gpt-2": (None, _BYTE_LEVEL),
}
MAX_MERGES = 1 << 20


def tokenizer_json(path: Path, tokens: list[str], types: np.ndarray, merges: list[str], pre: str,
                   bos: int | None, add_bos: bool) -> str:
    """tokenizer.json's text. tokens, types: the GGUF's vocabulary (types checked to be 1-6);
    merges: "left right" strings; bos: the id a prompt starts with where add_bos."""
    if pre not in PRE_TOKENIZERS:
        raise LocalmixError(f"{path}: tokenizer.ggml.pre is {pre!r:.60}; localmix rebuilds the byte-level BPE "
                            f"pre-tokenizers {', '.join(map(repr, PRE_TOKENIZERS))} (another would give other ids)")
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
    vocab, added = {}, []
    for i, (token, kind) in enumerate(zip(tokens, types.tolist())):
        if kind == UNUSED:  # the converter's [PAD<i>] rows: no text makes them
            continue
        if not token:
            raise LocalmixError(f"{path}: tokenizer.ggml.tokens[{i}] is empty")
        if token in vocab:
            raise LocalmixError(f"{path}: token {token!r:.60} appears twice in tokenizer.ggml.tokens "
                                f"(ids {vocab[token]} and {i})")
        vocab[token] = i
        if kind in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind == CONTROL})
    if len(merges) > MAX_MERGES:
        raise LocalmixError(f"{path}: tokenizer.ggml.merges lists {len(merges)} merges (at most {MAX_MERGES})")
    pairs = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ")
        # byte-level tokens never hold a space (it is written Ġ): a merge is exactly two of them
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise LocalmixError(f"{path}: tokenizer.ggml.merges[{i}] ({merge!r:.60}) is not a merge of two tokens "
                                f"into a third of the vocabulary")
        pairs.append(pair)
    post_processor = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if add_bos:
        if bos is None:
            raise LocalmixError(f"{path}: tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
        post_processor = {"type": "TemplateProcessing",
                          "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                     {"Sequence": {"id": "A", "type_id": 0}}],
                          "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                   {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                          "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": pairs},
    }, ensure_ascii=False)


def tokenizer_config(tokens: list[str], bos: int | None, eos: int | None, pad: int | None, add_bos: bool,
                     chat_template: str | None) -> str:
    """tokenizer_config.json's text: the special tokens a chat template sees, and the template."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": add_bos, "add_eos_token": False,
              "bos_token": None if bos is None else tokens[bos], "eos_token": None if eos is None else tokens[eos]}
    if pad is not None:
        config["pad_token"] = tokens[pad]
    if chat_template is not None:
        config["chat_template"] = chat_template
    return json.dumps(config, ensure_ascii=False, indent=1)
