"""What localmix asks of a tokenizer (ModelTokenizer), the one loader (load_tokenizer) that picks
the sentencepiece tokenizer.model (Mistral, Mixtral) or a Hugging Face tokenizer.json
(hf_tokenizer.py: Qwen, OLMoE, ...), streaming decode, and Mistral's instruct chat format.

The chat format reproduces mistral-common's encoding (`MistralTokenizer.v1()` for Mixtral 8x7B,
`.v3()` for Mixtral 8x22B) id for id, including how it merges and validates conversations, and for
v3 its tools: the offered tools ([AVAILABLE_TOOLS]), earlier calls ([TOOL_CALLS]) and their results
([TOOL_RESULTS]). Which one applies is read off the tokenizer: v2/v3 vocabularies have [INST] and
[/INST] as control tokens, v1 writes them as plain text. A v2 vocabulary cannot be told from v3's,
so a v2 model (Mistral Large 2402, none of the MoE models) would get v3's encoding of tools, which
differs from its own (v2 writes results as [{"name", "content"}] and drops the calls and results
before the last user turn). Text from a user never becomes a control token, because sentencepiece never
emits control pieces when it encodes text.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import sentencepiece

from localmix import validate
from localmix.errors import LocalmixError
from localmix.tools import MAX_DEPTH, MistralToolCalls, ToolCall, ToolSyntax, arguments_of

ROLES = ("system", "user", "assistant", "tool")
# Which role may follow which, as mistral-common's validator has it.
_MAY_FOLLOW = {"system": {"system", "user", "assistant"},
               "user": {"system", "user", "assistant"},
               "assistant": {"user", "assistant", "tool"},
               "tool": {"user", "assistant", "tool"}}
_MISTRAL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MISTRAL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


class MistralToolTokens(NamedTuple):
    """The control tokens of Mistral's v3 tools, by their pieces (PIECES, in the fields' order)."""
    begin_tools: int | None
    end_tools: int | None
    calls: int | None
    begin_results: int | None
    end_results: int | None

    PIECES = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass
class Message:
    """A chat message: an assistant's may carry the tools it called, a tool's says which call it answers."""
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # a tool message's: the tool's

    def as_template_data(self) -> dict:
        """The message as chat templates read it (transformers' form; no key whose value is None)."""
        data = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = [{**({"id": c.id} if c.id is not None else {}), "type": "function",
                                   "function": {"name": c.name, "arguments": c.arguments}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            data["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            data["name"] = self.name
        return data


# A real sentencepiece model is 0.5-2 MB, a tokenizer.json up to ~30 MB; anything far larger is not one.
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024

SENTENCEPIECE = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"
# What a tokenizer.json comes with, where the folder has it: its special tokens and chat template,
# the template as a file (it wins over the config's), and the stop ids generation uses.
HF_SIDE_FILES = ("tokenizer_config.json", "chat_template.jinja", "generation_config.json")
# The most bytes each tokenizer file may have (downloads, manifests).
TOKENIZER_FILE_LIMITS = {SENTENCEPIECE: MAX_TOKENIZER_BYTES, HF_TOKENIZER: MAX_TOKENIZER_BYTES,
                         "tokenizer_config.json": 16 * 1024 * 1024, "chat_template.jinja": 1 << 20,
                         "generation_config.json": 1 << 20}


class ModelTokenizer(Protocol):
    """What the rest of localmix uses of a tokenizer (Tokenizer: sentencepiece and Mistral's chat
    format; hf_tokenizer.HFTokenizer: tokenizer.json and a jinja chat template)."""

    vocab_size: int               # every id it produces is below this (and below the model's vocab_size)
    bos_id: int | None            # None: the tokenizer has no BOS token (Qwen)
    eos_id: int | None
    stop_ids: frozenset[int]      # a generated id among these ends the answer
    has_chat_template: bool       # False: a base model, which continues text rather than answering a chat
    chat_version: str             # the chat format, as `/show info` prints it
    tool_syntax: ToolSyntax | None  # how the chat format writes tool calls (None: it has no tools)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """The text's ids; special tokens typed in it stay text. bos: as a prompt starts."""

    def decode(self, ids) -> str: ...

    def stream_decoder(self, strip_leading_space: bool = True) -> "StreamDecoder": ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in a text (empty for a control token), as the stream decoder adds them."""

    def apply_chat_template(self, messages, tools: list[dict] | None = None) -> list[int]:
        """Ids of a conversation (dicts with role and content, as Message has them) ready for the
        assistant to answer, with the tools offered (tools.read_tools' form; only where tool_syntax is set)."""


def tokenizer_files(folder: str | Path) -> dict[str, Path]:
    """The tokenizer files of a model folder, by name: tokenizer.model alone where there is one
    (Mistral's format, which mistral-common's chat ids are reproduced for; their tokenizer.json is
    the same vocabulary), else tokenizer.json and the side files present. These are what pull,
    convert and export copy and hash. Empty when the folder has neither."""
    folder = Path(folder)
    if (folder / SENTENCEPIECE).is_file():
        return {SENTENCEPIECE: folder / SENTENCEPIECE}
    if not (folder / HF_TOKENIZER).is_file():
        return {}
    return {name: folder / name for name in (HF_TOKENIZER, *HF_SIDE_FILES) if (folder / name).is_file()}


def read_tokenizer(files: dict[str, Path], vocab_size: int, source: str,
                   config: dict | None = None) -> ModelTokenizer:
    """The tokenizer these files make (as tokenizer_files names them), checked against a model of
    vocab_size tokens: every id it can produce indexes the embeddings. config: the model's
    config.json (a tokenizer.json's stop ids include its eos_token_id; its model_type names the
    tokenizer class where tokenizer_config.json does not). One LocalmixError naming source."""
    if SENTENCEPIECE in files:
        return check_tokenizer(files[SENTENCEPIECE], vocab_size, source)
    if HF_TOKENIZER not in files:
        raise LocalmixError(f"{source}: no tokenizer (localmix reads tokenizer.model or tokenizer.json)")
    from localmix.hf_tokenizer import HFTokenizer  # imports tokenizers and jinja2 only when needed
    config = config if isinstance(config, dict) else {}
    model_type = config.get("model_type")
    return HFTokenizer(files, vocab_size, source, config.get("eos_token_id"),
                       model_type if isinstance(model_type, str) else None)


def load_tokenizer(folder: str | Path, vocab_size: int, source: str | None = None,
                   files: dict[str, Path] | None = None) -> ModelTokenizer:
    """The model folder's tokenizer, checked against vocab_size: from `files` (a localmix model's
    manifest lists them), else those tokenizer_files finds. The stop ids include the eos_token_id
    of the folder's config.json."""
    folder = Path(folder)
    source = source or str(folder)
    files = tokenizer_files(folder) if files is None else files
    if not files:
        raise LocalmixError(f"{source}: no tokenizer.model or tokenizer.json")
    config = None
    if SENTENCEPIECE not in files and (folder / "config.json").is_file():
        config = validate.read_json(folder / "config.json", "config")
    return read_tokenizer(files, vocab_size, source, config)


def check_tokenizer(path: str | Path, vocab_size: int, source: str | None = None) -> "Tokenizer":
    """Load a tokenizer.model and check it fits a model of vocab_size tokens: every id it can produce
    (its vocabulary, BOS and EOS) must index the embeddings. Returns the Tokenizer; anything wrong is
    one LocalmixError naming source (the file, or what it came from, such as a hub repository).
    `pull` calls this before it lists a model, and loading calls it again."""
    tokenizer = Tokenizer(path, source)
    source = source or str(path)
    if tokenizer.vocab_size > vocab_size:
        raise LocalmixError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                            f"{vocab_size}")
    return tokenizer


class Tokenizer:
    def __init__(self, model_path: str | Path, source: str | None = None):
        source = source or str(model_path)
        # Untrusted bytes: bound the size, and turn whatever sentencepiece or a crafted piece raises into
        # one error (a byte piece whose name is not <0xNN>, a BOS or EOS id outside the vocabulary).
        try:
            size = Path(model_path).stat().st_size
        except OSError as e:
            raise LocalmixError(f"{source}: cannot read the tokenizer ({e.strerror or e})") from None
        if not Path(model_path).is_file():  # a device such as /dev/zero would be read forever
            raise LocalmixError(f"{source}: the tokenizer is not a regular file")
        if size > MAX_TOKENIZER_BYTES:
            raise LocalmixError(f"{source}: tokenizer.model is {size} bytes, not a sentencepiece model")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise LocalmixError(f"{source}: not a sentencepiece model ({str(e)[:200]})") from None
        try:
            self._load(source)
        except (ValueError, IndexError, RuntimeError, UnicodeError) as e:
            raise LocalmixError(f"{source}: unusable sentencepiece model ({str(e)[:200]})") from None

    def _load(self, source: str) -> None:
        self.vocab_size = self.sp.vocab_size()
        if self.vocab_size <= 0:
            raise LocalmixError(f"{source}: the tokenizer has no tokens")
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # A prompt starts with BOS and an answer ends at EOS: an id of -1 (undefined) would index the
        # embeddings from the end, silently.
        for what, i in (("BOS", self.bos_id), ("EOS", self.eos_id)):
            if not 0 <= i < self.vocab_size:
                raise LocalmixError(f"{source}: the tokenizer has no {what} token (id {i})")
        self.begin_inst, self.end_inst = self._control_id("[INST]"), self._control_id("[/INST]")
        # "v1": [INST] is text; "v3": [INST] and [/INST] are control tokens (v2's encoding of
        # plain conversations is the same as v3's).
        self.chat_version = "v3" if self.begin_inst is not None and self.end_inst is not None else "v1"
        self.has_chat_template = True  # Mistral's instruct format, always
        tool_tokens = MistralToolTokens(*(self._control_id(p) for p in MistralToolTokens.PIECES))
        self._tool_tokens = tool_tokens if self.chat_version == "v3" and None not in tool_tokens else None
        self.tool_syntax = MistralToolCalls(tool_tokens.calls) if self._tool_tokens else None
        self.stop_ids = frozenset([self.eos_id])
        # What each id decodes to as bytes, for streaming: "▁" is a space, <0xNN> is a raw byte.
        self._piece_bytes = [self._bytes_of(i) for i in range(self.vocab_size)]

    def _control_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if i != self.sp.unk_id() and self.sp.is_control(i) else None

    def _bytes_of(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unknown(i):
            return b"" if self.sp.is_control(i) else " \u2047 ".encode()
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            if len(piece) != 6 or not piece.startswith("<0x") or not piece.endswith(">"):
                raise ValueError(f"byte piece {piece!r:.40} is not <0xNN>")
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def stream_decoder(self, strip_leading_space: bool = True) -> "StreamDecoder":
        return StreamDecoder(self._piece_bytes, strip_leading_space)

    def token_bytes(self, token: int) -> bytes:
        return self._piece_bytes[token]

    # -- chat ---------------------------------------------------------------------------------

    def apply_chat_template(self, messages, tools: list[dict] | None = None) -> list[int]:
        """Ids of a conversation ending with a user turn (or tool results), ready for the assistant to answer."""
        messages = _validate(messages, self.tool_syntax is not None)
        if tools and self.tool_syntax is None:
            raise LocalmixError("this model's chat format has no tools")
        system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content) or None
        turns = _merge_turns(messages)
        first_user = next(i for i, t in enumerate(turns) if t.role == "user")
        last_user = max(i for i, t in enumerate(turns) if t.role == "user")
        ids = [self.bos_id]
        for i, turn in enumerate(turns):
            if turn.role == "assistant" and turn.tool_calls:
                if turn.content:  # (two assistant messages in a row, one with calls, one with text)
                    raise LocalmixError("an assistant turn cannot have both content and tool calls")
                calls = [{"name": c.name, "arguments": c.arguments, "id": c.id} for c in turn.tool_calls]
                ids += [self._tool_tokens.calls] + self._json_ids(calls) + [self.eos_id]
            elif turn.role == "assistant":
                text = turn.content if self.chat_version == "v1" else turn.content.rstrip(" ")
                ids += self.encode(text) + [self.eos_id]
            elif turn.role == "tool":
                result = {"content": _json_or_text(turn.content), "call_id": turn.tool_call_id}
                ids += [self._tool_tokens.begin_results] + self._json_ids(result) + [self._tool_tokens.end_results]
            elif self.chat_version == "v1":  # the system prompt goes into the first user turn
                text = f"{system}\n\n{turn.content}" if system and i == first_user else turn.content
                ids += self.encode(f"[INST] {text} [/INST]")
            else:  # v3: the system prompt and the tools go into the last user turn
                text = f"{system}\n\n{turn.content}" if system and i == last_user else turn.content
                if tools and i == last_user:
                    tokens = self._tool_tokens
                    ids += [tokens.begin_tools] + self._json_ids(_mistral_tools(tools)) + [tokens.end_tools]
                ids += [self.begin_inst] + self.encode(text) + [self.end_inst]
        return ids

    def _json_ids(self, value) -> list[int]:
        return self.encode(json.dumps(value, ensure_ascii=False))


def _mistral_tools(tools: list[dict]) -> list[dict]:
    """The tools as mistral-common writes them (its Tool model, dumped without `strict`)."""
    out = []
    for tool in tools:
        function = tool["function"]
        if not _MISTRAL_NAME.match(function["name"]):
            raise LocalmixError(f"tool name {function['name']!r:.80} must be 1-64 letters, digits, '_' or '-'")
        out.append({"type": "function", "function": {"name": function["name"],
                                                     "description": function.get("description", ""),
                                                     "parameters": function.get("parameters", {})}})
    return out


def _json_or_text(text: str):
    """A tool result as mistral-common reads it: its JSON where it parses (empty: {}), else the text
    (also JSON nested deeper than a tool's arguments may be)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
        validate.json_depth(value, MAX_DEPTH, "a tool result")
        return value
    except (ValueError, RecursionError, LocalmixError):
        return text


class StreamDecoder:
    """Turns ids into text as they come, never splitting a UTF-8 character across two pieces of
    output. The first piece's leading space is dropped, as sentencepiece drops it when decoding a
    whole text; pass strip_leading_space=False when the text continues a prompt."""

    def __init__(self, piece_bytes: list[bytes], strip_leading_space: bool):
        self._piece_bytes = piece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_leading_space

    def add(self, token: int) -> str:
        text = self._utf8.decode(self._piece_bytes[token])
        if self._strip and text:
            self._strip = False
            if text.startswith(" "):
                text = text[1:]
        return text

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _as_message(m) -> Message:
    if isinstance(m, Message):
        return m
    if not isinstance(m, dict) or "role" not in m:
        raise LocalmixError(f"a chat message must be a dict with 'role' and 'content', got {m!r:.200}")
    role, content = m["role"], m.get("content")
    if role not in ROLES:
        raise LocalmixError(f"unsupported chat role {role!r:.40} (use system, user, assistant or tool)")
    if content is None and role == "assistant" and m.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise LocalmixError(f"the content of a {role} message must be a string, got {content!r:.200}")
    calls = m.get("tool_calls") or []
    if role != "assistant" and calls:
        raise LocalmixError(f"a {role} message cannot call tools")
    if not isinstance(calls, (list, tuple)):
        raise LocalmixError("tool_calls must be a list")
    tool_call_id, name = (_short_string(m.get(key), key) if role == "tool" else None for key in ("tool_call_id", "name"))
    return Message(role, content, tuple(_as_call(c, i) for i, c in enumerate(calls)), tool_call_id, name)


def _short_string(value, key: str) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > 256):
        raise LocalmixError(f"a tool message's {key} must be a string of at most 256 characters")
    return value


def _as_call(call, i: int) -> ToolCall:
    """A call in an assistant message: a ToolCall, or {"id", "function": {"name", "arguments"}}."""
    if isinstance(call, ToolCall):
        return call
    where = f"tool_calls[{i}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
            not 0 < len(function["name"]) <= 256:
        raise LocalmixError(f"{where} must be an object with a function with a name")
    call_id = call.get("id")
    if call_id is not None and (not isinstance(call_id, str) or len(call_id) > 256):
        raise LocalmixError(f"{where}.id must be a string of at most 256 characters")
    return ToolCall(function["name"], arguments_of(function.get("arguments", {}), where), call_id)


def _validate(messages, tools: bool = False) -> list[Message]:
    """mistral-common's rules for a conversation to answer (tools: v3's rules for calls and results)."""
    messages = [_as_message(m) for m in messages]
    if not messages:
        raise LocalmixError("the conversation has no messages")
    if not tools and any(m.role == "tool" or m.tool_calls for m in messages):
        raise LocalmixError("this model's chat format has no tools")
    if len(messages) == 1 and messages[0].role not in ("user", "system"):
        raise LocalmixError("a conversation must start with a user or system message")
    if len(messages) > 1 and messages[-1].role == "assistant":
        raise LocalmixError("the last message must come from the user (or a tool), not the assistant")
    for before, after in zip(messages, messages[1:]):
        if after.role not in _MAY_FOLLOW[before.role]:
            raise LocalmixError(f"a {after.role} message cannot follow a {before.role} message")
    awaited = 0  # results still owed to the latest calls
    for m in messages[1:]:
        if m.role == "tool":
            awaited -= 1
        elif m.role == "assistant":
            if awaited:
                raise LocalmixError("the tool calls and the tool results do not pair up")
            awaited = len(m.tool_calls)
    for m in messages:
        if m.role == "assistant" and m.tool_calls and m.content:
            raise LocalmixError("an assistant message cannot have both content and tool calls")
        if m.role == "assistant" and not m.content and not m.tool_calls:
            raise LocalmixError("an assistant message must have content")
        for call in m.tool_calls:
            if call.id is None or not _MISTRAL_CALL_ID.match(call.id):
                raise LocalmixError(f"tool call id {call.id!r:.40} must be 9 letters or digits")
            if not _MISTRAL_NAME.match(call.name):
                raise LocalmixError(f"tool call name {call.name!r:.80} must be 1-64 letters, digits, '_' or '-'")
        if m.role == "tool" and m.name is not None and not _MISTRAL_NAME.match(m.name):
            raise LocalmixError(f"a tool message's name {m.name!r:.80} must be 1-64 letters, digits, '_' or '-'")
        if m.role == "tool" and (m.tool_call_id is None or not _MISTRAL_CALL_ID.match(m.tool_call_id)):
            raise LocalmixError(f"a tool message's tool_call_id must be 9 letters or digits, got {m.tool_call_id!r:.40}")
    return messages


def _merge_turns(messages: list[Message]) -> list[Message]:
    """Consecutive messages of one role become one turn, joined by a blank line (an assistant's calls
    one after the other); a tool's results stay one per message; system messages leave the turns
    (they form the system prompt) but still separate the turns around them. A conversation that
    does not open with a user turn gets an empty one first."""
    turns: list[Message] = []
    run: list[Message] = []
    for m in messages + [Message("end", "")]:
        if run and (m.role != run[0].role or m.role == "tool"):
            if run[0].role == "tool":
                turns += run
            elif run[0].role != "system":
                turns.append(Message(run[0].role, "\n\n".join(x.content for x in run if x.content),
                                     tuple(c for x in run for c in x.tool_calls)))
            run = []
        run.append(m)
    if not turns or turns[0].role != "user":
        turns.insert(0, Message("user", ""))
    return turns
