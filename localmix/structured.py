"""Structured output: answers held to JSON, or to a JSON schema, while they are sampled.

llguidance (Microsoft's grammar engine, behind llama.cpp's and vLLM's structured output) turns a JSON
schema into a grammar and, before each token, says which tokens of the model's vocabulary can come
next; the others' logits are set to -inf before the sampler sees them, so even a model that knows no
JSON writes valid JSON that conforms to the schema. It reads the vocabulary as the bytes each token
stands for (the tokenizer's token_bytes), so it works for every tokenizer localmix has.

Why llguidance: it computes a token mask on a 32,000-token vocabulary in 14-106 microseconds here
(`python scripts/structured_cost.py`, from `Constraint.mask_seconds`), builds a schema's grammar
lazily, keeps every bound of a schema, and runs on numpy without torch. Measured beside it
(`scripts/grammar_libraries.py`, README "Serving"): xgrammar's masks cost less but its package
imports torch; outlines-core takes seconds to index the vocabulary for "any object" and drops
integer bounds.
"""

from __future__ import annotations

import json
import time

import numpy as np

from localmix.errors import LocalmixError

MAX_SCHEMA_BYTES = 256 << 10  # a schema is untrusted input: its size, and the grammar's limits below


class Vocabulary:
    """A model tokenizer as llguidance reads it: each token's bytes, its EOS, its encoder; built once
    per model (some hundred milliseconds for 150,000 tokens) and shared by every answer."""

    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        eos = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.stop_ids)
        tokens = [tokenizer.token_bytes(i) if i < tokenizer.vocab_size else b"" for i in range(vocab_size)]
        special = [i for i, t in enumerate(tokens) if not t]  # control tokens stand for no text
        for i in special:  # as llguidance marks them (its llama.cpp reader): 0xff, never in UTF-8 text, then a name
            tokens[i] = b"\xff<|control_%d|>" % i
        wrapped = _Wrapped(tokenizer, eos, tokens, special)
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapped), n_vocab=vocab_size,
                                                eos_token=sorted(tokenizer.stop_ids))
        self.vocab_size = vocab_size


class _Wrapped:
    """What llguidance.TokenizerWrapper reads from a tokenizer: the tokens' bytes, and an encoder of
    bytes into ids. Not the model's own encoder: sentencepiece puts a space before a text's first
    word, which llguidance, tokenizing a piece of text in the middle of an answer, must not get (it
    panicked on it); so the longest token that matches, byte by byte, as llguidance's own fallback does."""

    def __init__(self, tokenizer, eos: int, tokens: list[bytes], special: list[int]):
        self.eos_token_id, self.bos_token_id = eos, tokenizer.bos_id
        self.tokens, self.special_token_ids = tokens, special
        skip = set(special)
        self.ids = {}
        for i, t in enumerate(tokens):
            if i not in skip and t:
                self.ids.setdefault(t, i)
        self.longest = max(map(len, self.ids))

    def __call__(self, text) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode()
        ids, at = [], 0
        while at < len(data):
            for n in range(min(self.longest, len(data) - at), 0, -1):
                token = self.ids.get(data[at:at + n])
                if token is not None:
                    ids.append(token)
                    at += n
                    break
            else:
                raise LocalmixError(f"structured output: byte {data[at]:#x} has no token of its own")
        return ids


def json_grammar(schema: dict | None) -> str:
    """llguidance's grammar for JSON conforming to `schema` (None: any JSON object, as OpenAI's
    json_object and Ollama's format "json" mean). A schema it cannot compile is a LocalmixError."""
    return _grammar(json.dumps({"type": "object"} if schema is None else schema), "json", "the JSON schema")


def lark_grammar(text: str) -> str:
    """llguidance's grammar of a lark grammar (with JSON schemas in it: tools.ToolSyntax.grammar);
    one it cannot compile is a LocalmixError."""
    return _grammar(text, "lark", "the tools' grammar")


def _grammar(text: str, kind: str, what: str) -> str:
    """llguidance's grammar of a JSON schema or a lark grammar, checked: larger than MAX_SCHEMA_BYTES,
    or one it cannot compile, is a LocalmixError saying `what` it is."""
    import llguidance

    if len(text) > MAX_SCHEMA_BYTES:
        raise LocalmixError(f"{what} is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False}) \
            if kind == "json" else llguidance.grammar_from("lark", text)
    except ValueError as e:
        raise LocalmixError(f"{what} cannot be used: {str(e)[:300]}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise LocalmixError(f"{what} cannot be used: {messages[0][:300]}")
    return grammar


class Constraint:
    """One answer's grammar state: `restrict` the logits before sampling, `accept` the token after.
    A token the grammar refuses (never sampled through restrict) is a LocalmixError."""

    def __init__(self, vocabulary: Vocabulary, grammar: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise LocalmixError(f"the grammar cannot be used: {self.matcher.get_error()[:300]}")
        self.words = (vocabulary.vocab_size + 31) // 32
        self.mask_seconds = 0.0  # spent computing masks: the cost per token the server reports
        self.masks = 0

    def restrict(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar does not allow next at -inf (a copy)."""
        start = time.perf_counter()
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint32)[:self.words]
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:len(logits)].astype(bool)
        self.mask_seconds += time.perf_counter() - start
        self.masks += 1
        return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LocalmixError(f"structured output: the grammar refused token {token} "
                                f"({self.matcher.get_error()[:200]})")
