"""Jinja chat templates (tokenizer_config.json's `chat_template`, or chat_template.jinja), rendered
as transformers renders them (`transformers.utils.chat_template_utils`): an immutable jinja2
sandbox with trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`,
`strftime_now`, `dict`, `namespace` and transformers' `tojson` (no HTML escaping, non-ASCII kept).

A template comes with a downloaded model, so it is untrusted code. The sandbox keeps it away from
Python's internals; on top of that the template's size is bounded, and so is its rendering: a
budget of executed template lines and seconds (a loop over range(10**5) inside another would
otherwise run for hours), numbers passed to filters and methods (`' '|center(10**9)`), the
results of `*`, `**` and `+` (`'a' * 10**9`), and the length of the output. Anything over a
bound, and any error the template raises, is one LocalmixError.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from datetime import datetime

from localmix.errors import LocalmixError

MAX_TEMPLATE_CHARS = 256 * 1024    # real templates are 1-20 KB
MAX_RENDER_LINES = 500_000         # template lines executed in one rendering (a chat takes ~10-40 per message)
MAX_RENDER_SECONDS = 5.0
MAX_ARGUMENT = 1_000_000           # the largest number a filter or a method may be given (widths, counts)
MAX_INT_BITS = 4096


class TemplateLimit(Exception):
    """A rendering went over one of the bounds."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' filter: jinja's own escapes HTML characters, which templates do not expect
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _check_arguments(args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_ARGUMENT:
            raise TemplateLimit(f"a number larger than {MAX_ARGUMENT} given to a filter or method")


def _guarded(f):
    """A filter that refuses huge numeric arguments (widths, counts) before it allocates for them."""
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def filter(*args, **kwargs):
        _check_arguments(args[1:], kwargs)
        return f(*args, **kwargs)
    return filter


def _environment(max_chars: int):
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def sized(value):
        if isinstance(value, (str, list, tuple)) and len(value) > max_chars:
            raise TemplateLimit(f"a value of more than {max_chars} items")
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            raise TemplateLimit(f"a number of more than {MAX_INT_BITS} bits")
        return value

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, op, left, right):
            if op == "**" and isinstance(right, (int, float)) and abs(right) > 64 and \
                    isinstance(left, (int, float)) and abs(left) > 1:
                raise TemplateLimit("a power too large")
            if op == "*":
                for a, b in ((left, right), (right, left)):
                    if isinstance(a, (str, list, tuple)) and isinstance(b, int) and len(a) * b > max_chars:
                        raise TemplateLimit(f"a repeated value of more than {max_chars} items")
            if op == "%" and isinstance(left, str):
                _check_arguments(right if isinstance(right, tuple) else (right,), {})
                _check_format(left)
            return sized(super().call_binop(context, op, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _check_arguments(args, kwargs)
            return sized(super().call(__context, __obj, *args, **kwargs))

        def format_string(self, s, args, kwargs, format_func=None):
            _check_format(s)
            return super().format_string(s, args, kwargs, format_func)

    class TemplateDict:
        # transformers' `dict`: a callable that builds dicts, with no attributes to break out through
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # transformers' `namespace`: no underscore attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class Generation(jinja2.ext.Extension):
        # transformers' `{% generation %}...{% endgeneration %}` (it marks the assistant's tokens for
        # training masks): here its body renders as it is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guarded(f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(n=10**9): nothing a chat template needs
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _check_format(fmt: str) -> None:
    """A %- or {}-format string asking for a field wider than any chat needs is refused unformatted."""
    digits = 0
    for c in fmt:
        digits = digits + 1 if c.isdigit() else 0
        if digits > len(str(MAX_ARGUMENT)):
            raise TemplateLimit("a format width too large")


class ChatTemplate:
    """A compiled chat template. `source` names it in errors (the file it came from)."""

    def __init__(self, text: str, source: str, max_chars: int = 16 * 1024 * 1024):
        import jinja2
        import jinja2.meta

        if not isinstance(text, str):
            raise LocalmixError(f"{source}: the chat template must be a string")
        if len(text) > MAX_TEMPLATE_CHARS:
            raise LocalmixError(f"{source}: the chat template has {len(text)} characters, more than "
                                f"{MAX_TEMPLATE_CHARS}")
        self.source, self.text, self.max_chars = source, text, max_chars
        self.env = _environment(max_chars)
        try:
            self.template = self.env.from_string(text)
            ast = self.env.parse(text)
        except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as e:
            raise LocalmixError(f"{source}: the chat template does not compile ({str(e)[:200]})") from None
        # The template's literal text and string constants, joined so that a search cannot match across
        # two of them: what transformers reads its control tokens off (_get_template_literal_text).
        literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
        literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
        self.literal_text = "\0".join(literals)
        self.reads_tools = "tools" in jinja2.meta.find_undeclared_variables(ast)

    def render(self, messages: list[dict], variables: dict[str, str], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The conversation as text, as transformers' apply_chat_template renders it (documents None),
        within the bounds (LocalmixError past them)."""
        import jinja2

        budget = _Budget(self.max_chars)
        try:
            chunks, size = [], 0
            with budget:
                for chunk in self.template.generate(messages=messages, tools=tools, documents=None,
                                                    add_generation_prompt=add_generation_prompt, **variables):
                    size += len(chunk)
                    if size > self.max_chars:
                        raise TemplateLimit(f"more than {self.max_chars} characters of output")
                    chunks.append(chunk)
            return "".join(chunks)
        except TemplateLimit as e:
            raise LocalmixError(f"{self.source}: the chat template went past a limit ({e})") from None
        except jinja2.TemplateError as e:
            raise LocalmixError(f"{self.source}: the chat template refused the conversation "
                                f"({str(e)[:300]})") from None
        except RecursionError:
            raise LocalmixError(f"{self.source}: the chat template recursed too deeply") from None
        except MemoryError:
            raise LocalmixError(f"{self.source}: the chat template ran out of memory") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
                UnicodeError, LookupError, ArithmeticError) as e:
            raise LocalmixError(f"{self.source}: the chat template failed ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None


class _Budget:
    """Counts the template's executed lines (jinja compiles a template into Python functions whose
    file is "<template>") and the time, raising TemplateLimit past either; and at each line, the
    size of the strings and lists the template holds in its variables and namespaces, which `~`
    (concatenation, which no sandbox hook sees) could otherwise double until memory runs out.
    sys.settrace is per thread, so a server rendering in several threads gives each its own budget;
    the tracer in place before (a debugger, coverage) is put back."""

    def __init__(self, max_chars: int):
        import jinja2.utils

        self.lines = 0
        self.deadline = 0.0
        self.max_chars = max_chars
        self.namespace = jinja2.utils.Namespace

    def __enter__(self):
        self.saved = sys.gettrace()
        self.deadline = time.monotonic() + MAX_RENDER_SECONDS
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(self.saved)
        return False

    def _call(self, frame, event, arg):
        if frame.f_code.co_filename == "<template>":
            return self._line
        return None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines > MAX_RENDER_LINES:
                raise TemplateLimit(f"more than {MAX_RENDER_LINES} template steps")
            if not self.lines % 4096 and time.monotonic() > self.deadline:
                raise TemplateLimit(f"more than {MAX_RENDER_SECONDS:g} seconds")
            for value in frame.f_locals.values():
                values = object.__getattribute__(value, "_Namespace__attrs").values() \
                    if isinstance(value, self.namespace) else (value,)
                if any(isinstance(v, (str, list, tuple)) and len(v) > self.max_chars for v in values):
                    raise TemplateLimit(f"a value of more than {self.max_chars} items")
        return self._line

