"""Tool calls (function calling): the tools a request offers, and the calls an answer makes.

A chat format that has tools says two things: how the offered tools and earlier calls enter the
prompt (the tokenizer's apply_chat_template does that, given `tools`), and how the model writes a
call in its answer (a ToolSyntax here). localmix reads two syntaxes, those of the MoE families it
runs:

- Mistral's v3 instruct format (Mixtral 8x22B): the control token [TOOL_CALLS], then a JSON list
  `[{"name": ..., "arguments": {...}}]`, as mistral-common encodes a call in the history.
- The `<tool_call>` blocks of ChatML templates (Qwen2/Qwen3-MoE, Hermes):
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one per call.

An answer is read as it comes (CallReader): text before a call is shown as text; from the call's
opening on, it is held and parsed when the answer ends. What does not parse stays text, as vLLM's
parsers leave it. A request that requires a call (OpenAI's tool_choice "required" or a named
function) gets a grammar (ToolSyntax.grammar) that llguidance enforces while sampling: the call's
frame, a tool's name, and arguments that conform to that tool's parameters schema.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from localmix.errors import LocalmixError
from localmix.structured import lark_grammar
from localmix.validate import json_depth, parse_json

MAX_TOOLS = 128
MAX_DEPTH = 32  # levels of nesting in a tool's schema or a call's arguments (real ones: under 10)
NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")  # OpenAI's function names (mistral-common's, and dots)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str | None  # None: a call in a conversation's history that came without one


def call_id() -> str:
    """A new call's id: nine letters and digits, the form Mistral's v3 format requires (any string
    is an id to OpenAI's clients)."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


def read_tools(value, where: str = "tools") -> list[dict]:
    """The tools of a request, checked: a list of {"type": "function", "function": {"name", "description",
    "parameters"}} (OpenAI's and Ollama's form). The dicts are returned as given (a chat template sees
    them as transformers would pass them); LocalmixError names what is wrong."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise LocalmixError(f"{where} must be a list of at most {MAX_TOOLS} tools")
    json_depth(value, MAX_DEPTH + 3, where)
    names = set()
    for i, tool in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise LocalmixError(f'{at} must be an object of type "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise LocalmixError(f"{at}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise LocalmixError(f"{at}.function.name must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise LocalmixError(f"{at}.function.name: two tools are called {name!r}")
        names.add(name)
        if not isinstance(function.get("description", ""), str):
            raise LocalmixError(f"{at}.function.description must be a string")
        if not isinstance(function.get("parameters", {}), dict):
            raise LocalmixError(f"{at}.function.parameters must be a JSON schema (an object)")
    return value


def tool_names(tools: list[dict]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def arguments_of(value, where: str) -> dict:
    """A call's arguments: an object, or (OpenAI's form) a string holding one."""
    if isinstance(value, str):
        try:
            value = parse_json(value, where) if value.strip() else {}
        except LocalmixError:
            raise LocalmixError(f"{where}: arguments must be a JSON object (a string that does not parse)") from None
    if not isinstance(value, dict):
        raise LocalmixError(f"{where}: arguments must be a JSON object")
    json_depth(value, MAX_DEPTH, f"{where}: arguments")
    return value


def _calls(data) -> list[ToolCall] | None:
    """Calls from parsed JSON: an object or a list of objects with a name and arguments; None if not."""
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        try:
            arguments = arguments_of(arguments, "a tool call")
        except LocalmixError:
            return None
        calls.append(ToolCall(item["name"], arguments, call_id()))
    return calls or None


def _arguments_rule(parameters: dict) -> str:
    """The grammar of a call's arguments: its tool's parameters schema, where arguments the tool does
    not name are not written unless the schema allows them in so many words (JSON Schema's default
    would let a forced call add keys of random text; Ollama's client drops additionalProperties from
    the schemas it sends). Python's json.dumps separators, as the calls in the prompt are written."""
    schema = dict(parameters or {"type": "object"})
    if "properties" in schema:
        schema.setdefault("additionalProperties", False)
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    return "%json " + json.dumps(schema)


class ToolSyntax:
    """How a chat format writes calls. opener_text: the text that starts the calls in an answer;
    opener_token: the control token that does (None: the opener is text)."""

    opener_text: str
    opener_token: int | None = None
    separator: str  # between two calls

    def grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        """llguidance's grammar for an answer that is only calls: of tool `name` (None: any of the
        tools), one or (parallel) several. A schema it cannot compile is a LocalmixError."""
        chosen = [t for t in tools if name is None or t["function"]["name"] == name]
        rules = []
        for i, tool in enumerate(chosen):
            function = tool["function"]
            head = '{"name": ' + json.dumps(function["name"]) + ', "arguments": '
            rules += [f'call{i}: {json.dumps(head)} args{i} "}}"',  # (a lark string literal: JSON's escapes)
                      f"args{i}: {_arguments_rule(function.get('parameters'))}"]
        calls = f"call ({json.dumps(self.separator)} call)*" if parallel else "call"
        one = "(" + " | ".join(f"call{i}" for i in range(len(chosen))) + ")"
        return lark_grammar("\n".join([f"start: {self.frame(calls)}", f"call: {self.frame_one(one)}", *rules]))

    def frame(self, calls: str) -> str:
        """The grammar of the whole answer around `calls`."""
        raise NotImplementedError

    def frame_one(self, call: str) -> str:
        """The grammar of one call around `call` (its name and arguments)."""
        return call

    def parse(self, body: str) -> list[ToolCall] | None:
        """The calls written after the opener (None: they do not parse)."""
        raise NotImplementedError


class MistralToolCalls(ToolSyntax):
    """[TOOL_CALLS] [{"name": ..., "arguments": ...}, ...] (mistral-common's v3 encoding)."""

    opener_text = "[TOOL_CALLS]"
    separator = ", "

    def __init__(self, token: int):
        self.opener_token = token

    def frame(self, calls: str) -> str:
        # sentencepiece writes the list with the space it puts before a text: " [{"
        return f'<[{self.opener_token}]> " [" {calls} "]"'

    def parse(self, body: str) -> list[ToolCall] | None:
        try:
            return _calls(parse_json(body, "calls"))
        except LocalmixError:
            return None


class TaggedToolCalls(ToolSyntax):
    """<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>, once per call (ChatML templates)."""

    opener_text = "<tool_call>"
    closer = "</tool_call>"
    separator = "\n"

    def frame(self, calls: str) -> str:
        return calls

    def frame_one(self, call: str) -> str:
        return f'"<tool_call>\\n" {call} "\\n</tool_call>"'

    def parse(self, body: str) -> list[ToolCall] | None:
        calls = []
        for block in body.split(self.opener_text):
            if not block.strip():
                continue
            text, _, rest = block.partition(self.closer)
            if rest.strip():
                return None  # text after a call: not calls alone
            try:
                found = _calls(parse_json(text, "a call"))
            except LocalmixError:
                return None
            if found is None:
                return None
            calls += found
        return calls or None


class CallReader:
    """One answer read as it comes: `add` each token and its text, and get the text that can be
    shown now; `finish` gives the rest of the text and the calls (`step` does both for a step of
    generation). Text that may be the start of a call's opening is held until it is clear."""

    def __init__(self, syntax: ToolSyntax):
        self.syntax = syntax
        self.held = ""         # text that may begin the opener
        self.body: list[str] | None = None  # the calls' text, once the opener came

    def add(self, token: int | None, text: str) -> str:
        if self.body is not None:
            self.body.append(text)
            return ""
        if token is not None and token == self.syntax.opener_token:
            self.body = [text]
            shown, self.held = self.held, ""
            return shown
        if self.syntax.opener_token is not None:
            return text
        self.held += text
        opener = self.syntax.opener_text
        at = self.held.find(opener)
        if at >= 0:
            shown, self.body, self.held = self.held[:at], [self.held[at + len(opener):]], ""
            return shown
        keep = next((n for n in range(min(len(opener) - 1, len(self.held)), 0, -1)
                     if opener.startswith(self.held[-n:])), 0)
        shown, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return shown

    def step(self, token: int | None, text: str, last: bool) -> tuple[str, list[ToolCall]]:
        """The text to show after this step, and (the last step) the calls."""
        shown = self.add(token, text)
        if not last:
            return shown, []
        rest, calls = self.finish()
        return shown + rest, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the text not shown yet, the calls); calls that do not parse come back as text."""
        if self.body is None:
            shown, self.held = self.held, ""
            return shown, []
        body, self.body = "".join(self.body), None
        calls = self.syntax.parse(body)
        if calls is None:
            opener = "" if self.syntax.opener_token is not None else self.syntax.opener_text
            return opener + body, []
        return "", calls
