"""Hugging Face tokenizers: tokenizer.json (byte-level BPE, through the `tokenizers` library),
tokenizer_config.json (special tokens, chat template), chat_template.jinja, and the stop ids of
generation_config.json and config.json.

Ids are transformers' (AutoTokenizer on the same folder, transformers 5):
- encode(text, bos) is `tokenizer(text, add_special_tokens=bos, split_special_tokens=True)`:
  special tokens typed in a text stay text (the sentencepiece path never makes control tokens
  from text either); added tokens that are not special (such as `<think>`) are matched, as there.
- apply_chat_template(messages) is `apply_chat_template(messages, add_generation_prompt=True,
  sanitize_control_tokens=True)`. For messages without control tokens in them that is exactly
  the ids of a plain `apply_chat_template(messages, add_generation_prompt=True)`. Where a user
  types a control token (`<|im_end|>`), plain transformers would encode it as the control token,
  letting a user forge turns; localmix keeps it text, as transformers' sanitize_control_tokens
  does (same algorithm: markers around the user's control tokens, see _encode_marked_chat),
  except in assistant messages, where only special tokens are kept text (see _mark).
- decode(ids) is `decode(ids, skip_special_tokens=True)`; transformers 5 ignores
  clean_up_tokenization_spaces for BPE, so no clean-up either.
"""

from __future__ import annotations

import re
from pathlib import Path

from localmix import validate
from localmix.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate
from localmix.errors import LocalmixError
from localmix.tokenizer import MAX_TOKENIZER_BYTES, StreamDecoder, _as_message
from localmix.tools import TaggedToolCalls

MAX_CONFIG_BYTES = 16 * 1024 * 1024   # tokenizer_config.json (some list tens of thousands of added tokens)
MAX_SMALL_JSON_BYTES = 1 << 20        # generation_config.json
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers' private-use markers around the control tokens a user typed (chat_template_utils)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"

# transformers 5 builds these tokenizer classes from tokenizer.json's vocabulary, merges and added
# tokens only, with the class's own normalizer, pre-tokenizer and BPE options (GPT-NeoX: its own
# post-processor too) and its own default special tokens: the ids follow the class, not the rest
# of the file, so localmix builds them the same way (_as_class). Any other class (TokenizersBackend,
# PreTrainedTokenizerFast, ...) uses tokenizer.json as it is. The class is tokenizer_config.json's
# tokenizer_class, or else the one transformers maps config.json's model_type to.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
CLASS_OF_MODEL_TYPE = {"qwen2": "Qwen2Tokenizer", "qwen2_moe": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
                       "qwen3_moe": "Qwen2Tokenizer", "olmoe": "GPTNeoXTokenizer", "olmo": "GPTNeoXTokenizer",
                       "gpt_neox": "GPTNeoXTokenizer"}
ENDOFTEXT = "<|endoftext|>"
SPECIAL_DEFAULTS = {
    "Qwen2Tokenizer": {"unk_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT},
    "GPT2Tokenizer": {"unk_token": ENDOFTEXT, "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT},
    "GPTNeoXTokenizer": {"unk_token": ENDOFTEXT, "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                         "pad_token": "<|padding|>"},
}


def _as_class(tok, cls: str, add_prefix_space: bool) -> None:
    """The tokenizer's pipeline made the one transformers gives class cls (see SPECIAL_DEFAULTS)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors

    if isinstance(tok.model, models.BPE):  # the class's BPE options (transformers passes no others)
        model = tok.model
        model.dropout, model.unk_token, model.fuse_unk, model.byte_fallback = None, None, False, False
        model.continuing_subword_prefix, model.end_of_word_suffix, model.ignore_merges = "", "", False
    tok.decoder = decoders.ByteLevel()
    if cls == "Qwen2Tokenizer":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])
    elif cls == "GPT2Tokenizer":
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    else:  # GPTNeoXTokenizer, which also sets its post-processor (no BOS, no EOS: transformers drops
        # tokenizer_config's add_bos_token/add_eos_token when there is a tokenizer.json)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, trim_offsets=True)
        tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters byte-level BPE writes them as."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def _piece_bytes(token: str) -> bytes:
    """What the ByteLevel decoder makes of one token: its characters mapped back to bytes, or, if
    any character is not one of the 256, the token's own UTF-8 (as tokenizers does, added tokens
    included)."""
    try:
        return bytes(BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        return token.encode()


def _read_text(path: Path, what: str, limit: int) -> str:
    if not path.is_file():
        raise LocalmixError(f"{path}: {what} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LocalmixError(f"{path}: {what} larger than {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise LocalmixError(f"{path}: {what} is not UTF-8 text") from None


def _token_string(value, key: str, source: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken object, or null."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return validate.string(value, key, source, 4096)


def _ids(value, key: str, source: str, vocab_size: int) -> list[int]:
    """An eos_token_id: an id, a list of ids, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if len(values) > 1024:
        raise LocalmixError(f"{source}: {key} lists {len(values)} ids")
    return [validate.integer(v, key, source, 0, vocab_size - 1) for v in values]


def _template(config: dict, files: dict[str, Path], source: str) -> ChatTemplate | None:
    """The chat template: chat_template.jinja (which wins, as in transformers), else tokenizer_config.json's
    chat_template, a string or named templates (the default one: transformers' choice without tools)."""
    if "chat_template.jinja" in files:
        text = _read_text(Path(files["chat_template.jinja"]), "chat_template.jinja", 4 * MAX_TEMPLATE_CHARS)
        return ChatTemplate(text, f"{source}: chat_template.jinja")
    where = f"{source}: tokenizer_config.json chat_template"
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {}
        for entry in template:
            entry = validate.json_object(entry, where, "a named template")
            named[validate.string(entry.get("name"), "name", where)] = entry.get("template")
        if "default" not in named:
            raise LocalmixError(f"{where}: named templates without a 'default' one")
        template = named["default"]
    elif template is not None and not isinstance(template, str):
        raise LocalmixError(f"{where}: must be a string or a list of named templates")
    return ChatTemplate(template, where) if template is not None else None


class HFTokenizer:
    """A tokenizer.json with its configuration, checked against a model of vocab_size tokens:
    every id it can produce (its vocabulary, its special tokens, its stop ids) indexes the
    embeddings. files: name -> path, tokenizer.json and any of tokenizer_config.json,
    chat_template.jinja, generation_config.json. config_eos: config.json's eos_token_id."""

    def __init__(self, files: dict[str, Path], vocab_size: int, source: str, config_eos=None,
                 model_type: str | None = None):
        """model_type: config.json's, which names the class where tokenizer_config.json does not."""
        config = {}
        where = f"{source}: tokenizer_config.json"
        if "tokenizer_config.json" in files:
            config = validate.json_object(validate.read_json(files["tokenizer_config.json"], "tokenizer_config.json",
                                                             MAX_CONFIG_BYTES), where, "tokenizer_config.json")
        cls = config.get("tokenizer_class")
        cls = CLASS_OF_MODEL_TYPE.get(model_type) if cls is None else \
            validate.string(cls, "tokenizer_class", where, 200).removesuffix("Fast")
        # Two copies, so that no call switches a shared setting (the server encodes in threads): one
        # reads special tokens in text as text, the other matches them (a chat template's output).
        text = _read_text(Path(files["tokenizer.json"]), "tokenizer.json", MAX_TOKENIZER_BYTES)
        self._text, self._chat = (self._backend(text, source, config, cls, where) for _ in range(2))
        self._text.encode_special_tokens = True
        vocab = self._chat.get_vocab(with_added_tokens=True)
        if not vocab:
            raise LocalmixError(f"{source}: tokenizer.json has no tokens")
        self.vocab_size = max(vocab.values()) + 1  # ids it can produce are below this
        if self.vocab_size > vocab_size:
            raise LocalmixError(f"{source}: the tokenizer has ids up to {self.vocab_size - 1} but the model only "
                                f"{vocab_size} tokens")

        self.special_tokens = self._special_tokens(config, cls, where)
        added = self._chat.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added = {t.content: i for i, t in added.items()}
        self.bos_id = self._id_of(self.special_tokens.get("bos_token"), "bos_token", where)
        self.eos_id = self._id_of(self.special_tokens.get("eos_token"), "eos_token", where)

        self.template = _template(config, files, source)
        self.has_chat_template = self.template is not None
        self.chat_version = "chat template" if self.template else "none (a base model)"
        # A template that reads `tools` and writes <tool_call> blocks (Qwen's, Hermes'): calls are read
        # in that syntax. Other templates' calls (Llama 3's JSON, gpt-oss's channels) are not read.
        self.tool_syntax = TaggedToolCalls() if self.template is not None and self.template.reads_tools and \
            TaggedToolCalls.opener_text in self.template.literal_text else None
        self._control_re, self._special_re, self._markers_re = self._control_patterns(config, added, where)
        self._newline_ids = self._chat.encode("\n", add_special_tokens=False).ids

        self.stop_ids = self._stop_ids(files, config_eos, vocab_size, source)
        if self.eos_id is None and self.stop_ids:
            self.eos_id = min(self.stop_ids)

        # What each id decodes to, for streaming: ids the model has beyond the tokenizer's decode to
        # nothing, as tokenizers' decode skips ids it does not know; special tokens are skipped.
        pieces = [b""] * vocab_size
        for token, i in vocab.items():
            if i not in self.special_ids:
                pieces[i] = _piece_bytes(token)
        self._piece_bytes = pieces

    @staticmethod
    def _backend(text: str, source: str, config: dict, cls: str | None, where: str):
        """tokenizer.json read by the tokenizers library, built as transformers builds class cls."""
        import tokenizers

        try:  # (its parser bounds nesting at 128 levels; Python's json would hold a second copy as objects)
            tok = tokenizers.Tokenizer.from_str(text)
        except BaseException as e:  # noqa: BLE001 (tokenizers raises Exception, a Rust panic BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise LocalmixError(f"{source}: not a tokenizer.json the tokenizers library reads "
                                f"({str(e)[:200]})") from None
        if cls in SPECIAL_DEFAULTS:
            add_prefix_space = config.get("add_prefix_space")
            _as_class(tok, cls, add_prefix_space is not None and
                      validate.boolean(add_prefix_space, "add_prefix_space", where))
        if not isinstance(tok.decoder, tokenizers.decoders.ByteLevel):
            raise LocalmixError(f"{source}: tokenizer.json's decoder is {type(tok.decoder).__name__}; "
                                f"localmix reads byte-level BPE tokenizers (or a sentencepiece tokenizer.model)")
        return tok

    def _special_tokens(self, config: dict, cls: str | None, where: str) -> dict[str, str]:
        """The strings the template sees as bos_token, eos_token, ... (transformers' special_tokens_map):
        the config's (null: none), else the class's default where the vocabulary has it. Each one is
        made special in both copies, as transformers makes them whatever tokenizer.json says (skipped
        in decoding, text when typed)."""
        import tokenizers

        special = {}
        for key in SPECIAL_TOKENS:
            if key in config:
                token = _token_string(config[key], key, where)
            else:
                token = SPECIAL_DEFAULTS.get(cls, {}).get(key)
                token = token if token is not None and self._chat.token_to_id(token) is not None else None
            if token is not None:
                self._id_of(token, key, where)
                special[key] = token
        added = self._chat.get_added_tokens_decoder()
        for token in sorted(set(special.values())):
            same = [t for t in added.values() if t.content == token]
            if not same or not same[0].special:
                flags = dict(single_word=same[0].single_word, lstrip=same[0].lstrip, rstrip=same[0].rstrip,
                             normalized=same[0].normalized) if same else dict(normalized=False)
                for tok in (self._text, self._chat):
                    tok.add_special_tokens([tokenizers.AddedToken(token, special=True, **flags)])
        return special

    def _control_patterns(self, config: dict, added: dict, where: str):
        """Regexes of the control tokens (transformers' _get_control_tokens: the special tokens, and the
        added tokens the template writes, or tokenizer_config.json's chat_control_tokens, whitespace
        tokens aside), of the special tokens alone, and of transformers' markers around any added token."""
        controls = config.get("chat_control_tokens")
        if controls is not None:
            if not isinstance(controls, list) or not all(isinstance(c, str) for c in controls):
                raise LocalmixError(f"{where}: chat_control_tokens must be a list of strings")
        literal = self.template.literal_text if self.template else ""
        control = [t.content for t in added.values() if t.special or (
            t.content in controls if controls is not None else (t.content in literal and not t.content.isspace()))]
        markers = re.compile(f"{MARK_START}({_alternation(list(self._added)).pattern}){MARK_END}"
                             f"|[{MARK_START}{MARK_END}]")
        return _alternation(control), _alternation([t.content for t in added.values() if t.special]), markers

    def _stop_ids(self, files: dict[str, Path], config_eos, vocab_size: int, source: str) -> frozenset[int]:
        """The ids generation stops at: the tokenizer's EOS, generation_config.json's and config.json's
        eos_token_id (an id or a list)."""
        stops = {self.eos_id} if self.eos_id is not None else set()
        if "generation_config.json" in files:
            where = f"{source}: generation_config.json"
            generation = validate.json_object(
                validate.read_json(files["generation_config.json"], "generation_config.json", MAX_SMALL_JSON_BYTES),
                where, "generation_config.json")
            stops.update(_ids(generation.get("eos_token_id"), "eos_token_id", where, vocab_size))
        stops.update(_ids(config_eos, "eos_token_id", f"{source}: config.json", vocab_size))
        return frozenset(stops)

    def _id_of(self, token: str | None, key: str, where: str) -> int | None:
        if token is None:
            return None
        i = self._chat.token_to_id(token)
        if i is None:
            raise LocalmixError(f"{where}: {key} {token!r:.60} is not a token of tokenizer.json")
        return i

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """transformers' tokenizer(text, add_special_tokens=bos, split_special_tokens=True): bos adds
        what tokenizer.json's post-processor adds (often nothing: Qwen has no BOS)."""
        ids = self._text.encode(text, add_special_tokens=bool(bos)).ids
        return ids + ([self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids) -> str:
        return self._chat.decode([int(i) for i in ids], skip_special_tokens=True)

    def stream_decoder(self, strip_leading_space: bool = True) -> StreamDecoder:
        # Byte-level BPE keeps every space (decoding a whole text strips none): nothing to strip.
        return StreamDecoder(self._piece_bytes, False)

    def token_bytes(self, token: int) -> bytes:
        return self._piece_bytes[token]

    def apply_chat_template(self, messages, tools: list[dict] | None = None) -> list[int]:
        """Ids of the conversation with the assistant's turn opened (add_generation_prompt=True), the
        tools offered (tools.read_tools' form) where the template has tools."""
        if self.template is None:
            raise LocalmixError("this model has no chat template (a base model): give it a text to continue")
        messages = [_as_message(m) for m in messages]
        if not messages:
            raise LocalmixError("the conversation has no messages")
        if self.tool_syntax is None and (tools or any(m.role == "tool" or m.tool_calls for m in messages)):
            raise LocalmixError("this model's chat template has no tools localmix can read")
        marked = []
        for m in messages:
            content = self._special_re if m.role == "assistant" else self._control_re
            marked.append({key: self._mark(value, content if key == "content" else self._control_re)
                           for key, value in m.as_template_data().items()})
        tools = self._mark(tools, self._control_re) if tools else None
        return self._encode_marked_chat(self.template.render(marked, dict(self.special_tokens), tools=tools))

    # -- transformers' sanitize_control_tokens (utils/chat_template_utils.py), on tokenizers ------------

    def _mark(self, value, pattern: re.Pattern):
        """The control tokens in a string wrapped in private markers, any markers already there dropped
        (so none can be forged); in a list or a dict's values, each string so (transformers'
        mark_control_tokens). An assistant's text (the model's own earlier answer) is marked with the
        special tokens' pattern alone: it keeps the added tokens that are not special as they are,
        because templates read them (Qwen3 drops the reasoning before `</think>` from the history) and
        the model wrote them as tokens. transformers marks them there too, which breaks that split."""
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return pattern.sub(f"{MARK_START}\\g<0>{MARK_END}", value)
        if isinstance(value, dict):
            return {key: self._mark(item, pattern) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mark(item, pattern) for item in value]
        return value

    def _encode_marked_chat(self, chat: str) -> list[int]:
        """The rendered chat's ids: the template's own control tokens as tokens, the marked ones (a
        user's) as text. A lone marker (a template split a marked token) is dropped but still breaks the
        text, so the text on either side cannot join into a control token."""
        pieces = self._markers_re.split(chat)
        ids = self._chat.encode(pieces[0], add_special_tokens=False).ids
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1
            piece_ids = self._encode_piece(piece, as_text)
            if as_text and self._added.get(piece) in piece_ids:
                raise LocalmixError(f"the tokenizer makes {piece!r:.40} from plain text: it cannot be kept as text")
            ids += piece_ids
        return ids

    def _encode_piece(self, piece: str, as_text: bool) -> list[int]:
        # After a newline, then without it, as transformers does (it keeps sentencepiece from adding a
        # prefix space mid-chat); where the newline merges with the piece, the piece alone.
        encode = self._plain_ids if as_text else (lambda s: self._chat.encode(s, add_special_tokens=False).ids)
        piece_ids = encode("\n" + piece)
        n = len(self._newline_ids)
        if piece_ids[:n] == self._newline_ids:
            return piece_ids[n:]
        return encode(piece)

    def _plain_ids(self, text: str) -> list[int]:
        """text through the normalizer, pre-tokenizer and model, matching no added token at all."""
        tok = self._chat
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        splits = [text] if tok.pre_tokenizer is None else [s for s, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        return [t.id for split in splits for t in tok.model.tokenize(split)]


def _alternation(tokens: list[str]) -> re.Pattern:
    """A regex matching any of the tokens, longer ones first (a token wins over those it contains)."""
    return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")
