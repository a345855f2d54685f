"""The interactive chat loop, with the commands Ollama users know."""

from __future__ import annotations

import dataclasses
import time

from rich.console import Console

from localmix.api import Model
from localmix.cli.interrupts import CtrlC
from localmix.cli.output import print_stats, stats_line, stream_answer, usage_snapshot
from localmix.errors import LocalmixError
from localmix.sampling import SamplingParams

HELP = """Available commands:
  /set parameter NAME VALUE   set a parameter: temperature, top_p, top_k, min_p, seed,
                              num_predict, repeat_penalty, repeat_last_n, stop (several words)
  /set system TEXT            set the system prompt
  /set verbose | quiet        show or hide timings after each answer
  /set stats | nostats        show or hide the experts' figures after each answer
  /show [info|parameters|system]
  /clear                      forget the conversation
  /bye                        exit (or Ctrl-D)
  /?, /help                   this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer (what it said so far is kept)."""

# /set parameter names (Ollama's) -> SamplingParams fields; num_predict is the answer length.
PARAMETERS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
              "repeat_penalty": float, "repeat_last_n": int, "num_predict": int, "stop": str}


class ChatSession:
    def __init__(self, model: Model, name: str, params: SamplingParams, max_tokens: int,
                 system: str | None, verbose: bool, load_s: float, console: Console, stats: bool = False,
                 trace=None):
        self.model, self.name, self.params, self.max_tokens = model, name, params, max_tokens
        self.system, self.verbose, self.load_s, self.console = system, verbose, load_s, console
        self.stats, self.trace = stats, trace  # trace: gets each answer's routing records (--trace)
        self.history: list[dict] = []

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        if self.model.base_model:  # one text: each message runs on into its continuation, a paragraph per turn
            turns = [self.history[i]["content"] + self.history[i + 1]["content"]
                     for i in range(0, len(self.history), 2)]
            # The oldest turns go once the text takes more than half the context, leaving room to continue.
            while turns and len(self.model.tokenizer.encode("\n\n".join(turns + [user_text]))) > \
                    self.model.config.max_position_embeddings // 2:
                turns.pop(0)
            return system + [{"role": "user", "content": "\n\n".join(turns + [user_text])}]
        return system + self.history + [{"role": "user", "content": user_text}]

    def answer(self, user_text: str) -> None:
        start, before = time.perf_counter(), usage_snapshot(self.model)
        # Ctrl-C stops the answer between two kernel calls; the part shown stays in the conversation,
        # as in Ollama, and the chat goes on.
        with CtrlC() as ctrl_c:
            try:
                text, last = stream_answer(self.model, self.messages(user_text), self.max_tokens, self.params,
                                           cancelled=ctrl_c, trace=self.trace)
            except LocalmixError as e:
                self.console.print(f"error: {e}", markup=False)
                return
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        if ctrl_c.pressed:
            return
        if self.verbose and last:
            print_stats(last, self.load_s, time.perf_counter() - start)
        if self.stats:
            self.console.print(stats_line(self.model, before), markup=False, soft_wrap=True)

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        words = line.split()
        head = words[0]
        if head in ("/bye", "/exit"):
            return False
        if head in ("/?", "/help"):
            print(HELP)
        elif head == "/clear":
            self.history = []
            print("Cleared session context")
        elif head == "/show":
            self.show(words[1] if len(words) > 1 else "info")
        elif head == "/set" and len(words) >= 2:
            self.set(words[1], line.split(None, 2)[2] if len(words) > 2 else "")
        else:
            print(f"Unknown command '{head}'. Type /? for help")
        return True

    def set(self, what: str, rest: str) -> None:
        if what == "verbose":
            self.verbose = True
            print("Set 'verbose' mode.")
        elif what == "quiet":
            self.verbose = False
            print("Set 'quiet' mode.")
        elif what in ("stats", "nostats"):
            self.stats = what == "stats"
            print(f"Set '{what}' mode.")
        elif what == "system":
            self.system = rest.strip().strip('"') or None
            print("Set system message.")
        elif what == "parameter":
            self.set_parameter(rest)
        else:
            print(f"Unknown /set option '{what}'. Type /? for help")

    def set_parameter(self, rest: str) -> None:
        words = rest.split()
        if len(words) < 2 or words[0] not in PARAMETERS:
            print(f"Usage: /set parameter NAME VALUE, NAME one of: {', '.join(PARAMETERS)}")
            return
        name, values = words[0], words[1:]
        try:
            value = [PARAMETERS[name](v) for v in values] if name == "stop" else PARAMETERS[name](values[0])
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(PARAMETERS[name], "a string")
            print(f"Couldn't set parameter: {name} takes {kind}, got {values[0]!r}")
            return
        if name == "num_predict":
            if value < 0:
                print("Couldn't set parameter: num_predict must be >= 0")
                return
            self.max_tokens = value
        else:
            try:
                self.params = dataclasses.replace(self.params, **{name: value}).check()
            except LocalmixError as e:
                print(f"Couldn't set parameter: {e}")
                return
        print(f"Set parameter '{name}' to '{' '.join(values)}'")

    def show(self, what: str) -> None:
        c = self.model.config
        if what == "info":
            experts = (f"{c.num_local_experts} experts, {c.num_experts_per_tok} per token"
                       if c.is_moe else "dense")
            print(f"  model          {self.name} ({c.model_type})\n"
                  f"  path           {self.model.path}\n"
                  f"  layers         {c.num_hidden_layers}, hidden {c.hidden_size}, {experts}\n"
                  f"  attention      {c.num_attention_heads} heads, {c.num_key_value_heads} KV heads\n"
                  f"  context        {c.max_position_embeddings} tokens\n"
                  f"  chat format    {self.model.tokenizer.chat_version}")
        elif what == "parameters":
            p = self.params
            print(f"  temperature    {p.temperature}\n  top_k          {p.top_k}\n  top_p          {p.top_p}\n"
                  f"  min_p          {p.min_p}\n  repeat_penalty {p.repeat_penalty}\n"
                  f"  repeat_last_n  {p.repeat_last_n}\n  seed           {p.seed}\n"
                  f"  num_predict    {self.max_tokens}\n  stop           {p.stop}")
        elif what == "system":
            print(self.system or "No system message was specified for this model.")
        else:
            print(f"Unknown /show option '{what}'. Use info, parameters or system")


def read_message() -> str | None:
    """One message from the user: a line, or the lines between \"\"\" marks. None on Ctrl-D."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    stripped = line.strip()
    if not stripped.startswith('"""'):
        return line
    body = stripped[3:]
    if body.endswith('"""'):  # """all on one line"""
        return body[:-3]
    lines = [body]
    while True:
        try:
            line = input("... ")
        except EOFError:
            return None
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip("\n")
        lines.append(line)


def chat_loop(model: Model, name: str, params: SamplingParams, max_tokens: int, system: str | None,
              verbose: bool, load_s: float, stats: bool = False, trace=None) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    session = ChatSession(model, name, params, max_tokens, system, verbose, load_s, console, stats, trace)
    if model.base_model:
        print(f"{name} is a base model: it continues the text of the conversation (your messages and its "
              f"continuations) rather than answering it; /clear starts a new text.")
    print("Send a message (/? for help)")
    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.")
            continue
        if text is None:
            print()
            return
        if not text.strip():
            continue
        try:
            if text.startswith("/") and not text.startswith("//"):
                if not session.command(text):
                    return
                continue
            session.answer(text)
        except KeyboardInterrupt:  # between answers (a command, the figures after one): no kernel runs there
            print()
