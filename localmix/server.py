"""`localmix serve`: OpenAI and Ollama HTTP routes over one loaded model (Starlette on uvicorn).

Requests share the model through one engine thread: it starts each new request's answer as the
API does (Model.start, with the request's sampling and routing), prefills its prompt, then decodes
every active answer together, one token each per step (generate.decode_together: Transformer.step),
so that each weight read serves all of them; answers whose routing differs (localmix's experts_per_token, min_expert_weight,
fallback_margin request fields) are decoded in a step of their own. Answers stream back to the
request handlers through asyncio queues; a client that goes away (mid-stream, or while waiting for
a whole answer) cancels its answer before the engine's next token.

Every request is untrusted. Its body is read up to a size limit (413 beyond) and within a time
limit (408); more answers waiting than MAX_WAITING is a 503. Parsing the body, checking
each field's type and range, and tokenizing the prompt run in a worker thread, never on the event
loop (a 4 MB prompt takes seconds to tokenize; /health and the streams must not wait for it); a
bad request gets a 400 saying which field is wrong, as OpenAI's error object on /v1 and as
Ollama's {"error": "..."} on /api. A prompt and max_tokens together must fit the context.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.middleware import Middleware
from starlette.routing import Route

from localmix import __version__, validate
from localmix.errors import LocalmixError
from localmix.generate import Generation, GenerationResponse, decode_together
from localmix.routing import RoutingOptions
from localmix.sampling import SamplingParams
from localmix.checkpoint import tensor_table
from localmix.catalog import Busy, Catalog, NotFound, Served
from localmix.home import models_dir
from localmix.structured import Constraint, Vocabulary, json_grammar
from localmix.tools import CallReader, ToolCall, ToolSyntax, read_tools, tool_names
from localmix.store import DENSE_FILE, is_localmix_model, model_summary, open_manifest, summarize, tensor_file

log = logging.getLogger("localmix.server")

MAX_BODY_BYTES = 4 << 20  # a 32k-token context is ~130 KB of text; 4 MB leaves room for JSON and long chats
MAX_STOPS, MAX_STOP_CHARS = 16, 1024  # OpenAI allows 4 stop strings; Ollama clients send a few more
BODY_SECONDS = 60.0  # to send the whole body: a client trickling bytes holds a connection, not forever
MAX_WAITING = 256  # answers queued for the engine beyond those it decodes; more get 503
DEFAULT_MAX_TOKENS = 256  # when the request does not say (and the context has room)
FILL = -1  # Ollama's num_predict -1 and -2: until the context is full


@dataclass
class Job:
    """One answer in the engine: its generation, and where its responses go."""
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    options: RoutingOptions
    chat: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    logprobs: int | None = None
    constraint: Constraint | None = None  # structured output: this answer's grammar state
    cancelled: bool = False
    generation: Generation | None = field(default=None, repr=False)

    def send(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed under us: the server is stopping
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Engine:
    """The thread that runs the model for every request."""

    def __init__(self, model, max_batch: int = 8):
        self.model, self.max_batch = model, max_batch
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.wake = threading.Condition()
        self.stopped = False
        self.running = False  # answers admitted or being decoded (set under `wake`: see idle)
        self.widest = 0  # the most answers decoded together so far
        self.decoded = 0  # tokens sampled, all answers together (tests count abandoned answers' tokens with it)
        self._vocabulary: Vocabulary | None = None
        self.vocabulary_lock = threading.Lock()
        self.thread = threading.Thread(target=self.run, name="localmix-engine", daemon=True)
        self.thread.start()

    def vocabulary(self) -> Vocabulary:
        """The model's vocabulary as structured output reads it: built once, on the first such request
        (in a request's worker thread: two of them may ask at once)."""
        with self.vocabulary_lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary(self.model.tokenizer, self.model.config.vocab_size)
            return self._vocabulary

    def submit(self, job: Job) -> None:
        with self.wake:
            if self.stopped:  # unloaded between the request's reading and now (catalog.Catalog)
                raise BadRequest(503, "the model was unloaded meanwhile; send the request again", "model_unloaded")
            self.waiting = [j for j in self.waiting if not j.cancelled]
            if len(self.waiting) >= MAX_WAITING:
                raise BadRequest(503, f"the server is busy: {len(self.waiting)} answers are waiting", "server_busy")
            self.waiting.append(job)
            self.wake.notify()

    def stop(self) -> None:
        """The engine ends after the step under way (ended() says when)."""
        with self.wake:
            self.stopped = True
            self.wake.notify()

    def ended(self, wait: float) -> bool:
        """Whether the engine's thread has ended, waiting up to `wait` seconds for it."""
        self.thread.join(wait)
        return not self.thread.is_alive()

    def idle(self) -> bool:
        """No answer waits or is being decoded (a model may be unloaded)."""
        with self.wake:
            return not self.running and not any(not j.cancelled for j in self.waiting)

    def run(self) -> None:
        self.model.tuner.start()  # Numba's thread count is per calling thread: this one decodes
        while True:
            with self.wake:
                self.running = bool(self.active)
                while not (self.waiting or self.active or self.stopped):
                    self.wake.wait()
                if self.stopped:
                    return
                self.waiting = [j for j in self.waiting if not j.cancelled]  # abandoned before they started
                room = self.max_batch - len(self.active)
                admitted, self.waiting = self.waiting[:room], self.waiting[room:]
                self.running = bool(admitted or self.active)
            for job in admitted:
                self.start(job)
            self.step()

    def start(self, job: Job) -> None:
        if job.cancelled:
            return
        try:
            job.generation = self.model.start(job.prompt, job.max_tokens, job.params, job.options, new_text=job.chat,
                                              cancelled=lambda: job.cancelled, logprobs=job.logprobs,
                                              constraint=job.constraint)
            job.generation.prefill()  # asks `cancelled` between chunks of the prompt
        except LocalmixError as e:
            job.send(e)
            return
        except Exception as e:  # noqa: BLE001 (a request must never stop the engine)
            log.exception("internal error while starting an answer")
            job.send(LocalmixError(f"internal error: {e}"))
            return
        self.active.append(job)

    def step(self) -> None:
        """Sample a token for each active answer, send it, then run the model once for all that go on
        (once per routing among them: decode_together). An abandoned answer's next() says "cancelled" without sampling, and it leaves the batch here."""
        going = []
        for job in self.active:
            try:
                response = job.generation.next()
            except Exception as e:  # noqa: BLE001 (a request must never stop the engine)
                log.exception("internal error while sampling")
                job.send(LocalmixError(f"internal error: {e}"))
                job.generation = None
                continue
            if response.token is not None:
                self.decoded += 1
            job.send(response)
            if response.finish_reason is None:
                going.append(job)
            else:
                job.generation = None  # its KV cache goes now, not when the handler lets go of the job
        self.active = going
        if not going:
            return
        try:
            start = time.perf_counter()
            self.widest = max(self.widest, decode_together([job.generation for job in going]))
            if len(going) == 1:  # the tuner compares token times, so only steps of one answer count
                self.model.tuner.record(time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001
            log.exception("internal error in a decoding step")
            for job in going:
                job.send(LocalmixError(f"internal error: {e}"))
                job.generation = None
            self.active = []
            return


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          param: str | None = None) -> JSONResponse:
    """An OpenAI-style error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


class Gone(Exception):
    """The client left before it had sent its whole request."""


@dataclass
class Ask:
    """A request, checked: the model that answers it, the prompt's ids and how to answer it."""
    served: Served        # held (Catalog.acquire) until its answers are queued (Server.queue)
    ids: list[int]
    params: SamplingParams
    options: RoutingOptions  # the answer's routing: the model's, with the request's localmix fields
    length: int           # max tokens of the answer
    stream: bool
    chat: bool            # the answer starts a new text (after [/INST]) rather than continuing the prompt
    include_usage: bool = False
    n: int = 1            # answers to the same prompt (OpenAI's choices), decoded together
    logprobs: int | None = None  # report each token's log-probability and this many likeliest (None: not)
    # structured output: each answer's grammar state, made in the worker thread (a grammar's matcher
    # takes up to a second to build; in the engine thread it would hold up every answer being decoded)
    constraints: list[Constraint] | None = None
    tool_syntax: ToolSyntax | None = None  # tools were offered: the answers' calls are read in this syntax
    parallel_calls: bool = True  # False: an answer's first call only (OpenAI's parallel_tool_calls)


@dataclass
class Preload:
    """An Ollama request with nothing to answer: its model is loaded (and unloaded soon with keep_alive 0)."""
    served: Served
    unload: bool


# --- checking a request's fields (in the worker thread) ----------------------------------------

MAX_CHOICES = 8  # OpenAI's n: answers decoded together (the engine's batch)
MAX_TOP_LOGPROBS = {True: 20, False: 5}  # chat's top_logprobs, completions' logprobs (OpenAI's limits)
# Fields the APIs define that localmix does not implement yet, with the values that ask for nothing:
# any other value is a 400 that names the field, never an answer that silently ignored it.
UNSUPPORTED = {
    False: {"functions": (None, []),  # (OpenAI's deprecated form of tools)
            "function_call": (None, "none", "auto"), "logit_bias": (None, {}), "presence_penalty": (None, 0),
            "frequency_penalty": (None, 0),
            "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "best_of": (None, 1),
            "echo": (None, False), "suffix": (None, "")},
    True: {"images": (None, []), "think": (None, False), "suffix": (None, ""), "template": (None, ""),
           "context": (None, [])},
}


def refuse_unsupported(body: dict, ollama: bool) -> None:
    for key, neutral in UNSUPPORTED[ollama].items():
        if body.get(key) not in neutral:
            raise BadRequest(400, f"request: {key} is not supported by localmix yet", param=key)

def checked(check, *args, **kwargs):
    """A validate.* check whose LocalmixError becomes a 400."""
    try:
        return check(*args, **kwargs)
    except LocalmixError as e:
        raise BadRequest(400, str(e)) from None


def optional(o: dict, key: str, default, check, *bounds):
    """o[key] checked by validate.`check`, or default where it is absent or null."""
    value = o.get(key)
    return default if value is None else checked(check, value, key, "request", *bounds)


def stops_of(value) -> list[str]:
    """None, a string, or a list of at most MAX_STOPS strings of at most MAX_STOP_CHARS characters each."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_STOPS:
        raise BadRequest(400, f"request: stop must be a string or a list of at most {MAX_STOPS} strings")
    return [checked(validate.string, s, "stop", "request", MAX_STOP_CHARS) for s in value]


def sampling(body: dict, ollama: bool) -> tuple[SamplingParams, int | None]:
    """Sampling settings, and the answer's length as asked (None: not asked; FILL: as long as the
    context allows), as each API names them. Defaults are each API's own."""
    o = body
    if ollama:
        o = body.get("options")
        o = {} if o is None else o
        if not isinstance(o, dict):
            raise BadRequest(400, "request: options must be an object")
    seed = optional(o, "seed", None, validate.integer, -(1 << 63), (1 << 64) - 1)
    params = SamplingParams(
        temperature=optional(o, "temperature", 0.8 if ollama else 1.0, validate.number, 0.0, 100.0),
        top_p=optional(o, "top_p", 0.9 if ollama else 1.0, validate.number, 0.0, 1.0, True),
        top_k=optional(o, "top_k", 40 if ollama else 0, validate.integer, 0, 1 << 31),
        min_p=optional(o, "min_p", 0.0, validate.number, 0.0, 1.0),
        repeat_penalty=optional(o, "repeat_penalty", 1.1 if ollama else 1.0, validate.number, 0.0, 100.0, True),
        repeat_last_n=optional(o, "repeat_last_n", 64, validate.integer, 0, 1 << 31),
        seed=None if seed is None or seed < 0 else seed,  # Ollama's -1: a random seed
        stop=stops_of(o.get("stop")))
    checked(params.check)
    if ollama:  # -1: until the context is full, -2: fill the context (both: as long as it allows)
        length = optional(o, "num_predict", None, validate.integer, -2, validate.MAX_CONTEXT)
        return params, FILL if length is not None and length < 0 else length
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return params, optional(body, key, None, validate.integer, 0, validate.MAX_CONTEXT)


def routing_fields(body: dict, ollama: bool, experts: int) -> dict:
    """localmix's routing fields (None where absent: the model's): in Ollama's options object, or
    beside OpenAI's fields (the OpenAI client sends them with extra_body). As Model.stream takes them."""
    o = (body.get("options") or {}) if ollama else body  # options: an object, as sampling() checked
    return {"experts_per_token": optional(o, "experts_per_token", None, validate.integer, 1, max(experts, 1)),
            # [0, 1): a weight of 1 would drop every expert but the heaviest, as Steering.check says
            "min_expert_weight": optional(o, "min_expert_weight", None, validate.number, 0.0, 1.0, False, True),
            "fallback_margin": optional(o, "fallback_margin", None, validate.number, 0.0, 1.0)}


def content_of(value, where: str) -> str:
    """A message's text: a string, null, or OpenAI's list of parts (text parts only)."""
    if value is None:
        return ""  # an assistant message that only called tools
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            text = part.get("text") if isinstance(part, dict) and part.get("type", "text") == "text" else None
            if not isinstance(text, str):
                got = f"type {str(part.get('type'))!r:.40}" if isinstance(part, dict) else type(part).__name__
                raise BadRequest(400, f"request: {where}: content parts must be text parts "
                                      f"({{\"type\": \"text\", \"text\": a string}}), got {got}")
            texts.append(text)
        return "".join(texts)
    raise BadRequest(400, f"request: {where}: content must be a string or a list of text parts")


def structured_output(body: dict, ollama: bool) -> str | None:
    """The grammar an answer must follow (structured.json_grammar), from OpenAI's response_format
    (json_object, or json_schema with its schema) or Ollama's format ("json", or a schema); None: free text."""
    if ollama:
        value = body.get("format")
        if value in (None, ""):
            return None
        if value != "json" and not isinstance(value, dict):
            raise BadRequest(400, 'request: format must be "json" or a JSON schema (an object)', param="format")
        return checked(json_grammar, None if value == "json" else value)
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return checked(json_grammar, None)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest(400, "request: response_format.json_schema.schema must be a JSON schema (an object)",
                             param="response_format")
        return checked(json_grammar, schema)
    raise BadRequest(400, "request: response_format.type must be text, json_object or json_schema",
                     param="response_format")


def logprobs_asked(body: dict, chat: bool, ollama: bool = False) -> int | None:
    """How many likeliest tokens to report beside each token's log-probability (None: none asked):
    chat's logprobs (true/false) and top_logprobs, completions' logprobs (a count); Ollama's
    logprobs and top_logprobs (up to 20), on both its routes."""
    most = MAX_TOP_LOGPROBS[chat or ollama]
    if not chat and not ollama:
        return optional(body, "logprobs", None, validate.integer, 0, most)
    top = optional(body, "top_logprobs", None, validate.integer, 0, most)
    if not optional(body, "logprobs", False, validate.boolean):
        if top is not None:
            raise BadRequest(400, "request: top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top or 0


def messages_of(value, ollama: bool) -> list[dict]:
    """The conversation as the tokenizers take it (tokenizer.Message's fields): role and content, an
    assistant's tool_calls, a tool message's tool_call_id and name (Ollama's tool_name). Calls without
    an id get one by their place (Ollama's have none), and a tool message without a tool_call_id
    answers the next call not yet answered, as Ollama pairs them."""
    if not isinstance(value, list) or not value:
        raise BadRequest(400, "request: messages must be a non-empty list")
    messages, awaiting, calls = [], [], 0
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRequest(400, f"request: messages[{i}] must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise BadRequest(400, f"request: messages[{i}].role must be a string")
        if m.get("images"):
            raise BadRequest(400, f"request: messages[{i}].images: images are not supported by localmix yet")
        message = {"role": role, "content": content_of(m.get("content"), f"messages[{i}]")}
        if m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list) or not all(isinstance(c, dict) for c in m["tool_calls"]):
                raise BadRequest(400, f"request: messages[{i}].tool_calls must be a list of objects")
            message["tool_calls"] = []
            for call in m["tool_calls"]:
                calls += 1
                call = {**call, "id": call.get("id") or f"call{calls:05d}"}
                message["tool_calls"].append(call)
            awaiting = [c["id"] for c in message["tool_calls"]]
        if role == "tool":
            message["tool_call_id"] = m.get("tool_call_id") or (awaiting[0] if awaiting else None)
            if message["tool_call_id"] in awaiting:
                awaiting.remove(message["tool_call_id"])
            name = m.get("tool_name" if ollama else "name")
            if name is not None:
                message["name"] = name
        messages.append(message)
    return messages


def tools_asked(body: dict, ollama: bool) -> tuple[list[dict] | None, str | None, bool]:
    """The request's tools (None: none offered), its tool_choice ("auto", "none", "required" or a
    function's name: OpenAI's field; Ollama has none, so localmix reads one among its options, as
    it reads its routing fields there), and whether several calls may be made at once."""
    fields = (body.get("options") or {}) if ollama else body
    tools, choice = body.get("tools"), fields.get("tool_choice")
    parallel = optional(fields, "parallel_tool_calls", True, validate.boolean)
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise BadRequest(400, "request: tool_choice needs tools", param="tool_choice")
        return None, None, True
    tools = checked(read_tools, tools, "request: tools")
    if choice is None or choice in ("none", "auto", "required"):
        choice = choice or "auto"
    else:
        function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        choice = function.get("name") if isinstance(function, dict) else None
        if choice not in tool_names(tools):
            raise BadRequest(400, 'request: tool_choice must be "none", "auto", "required" or {"type": "function", '
                                  '"function": {"name": the name of one of the tools}}', param="tool_choice")
    return tools, choice, parallel


class AnswerCalls:
    """One answer's tool calls, read as its steps come (tools.CallReader), as the APIs report them: the
    text to show at each step, and at the last the calls (the first alone where parallel calls
    were not asked for) and the finish reason ("tool_calls" where an answer that stopped called)."""

    def __init__(self, syntax: ToolSyntax, parallel: bool):
        self.reader, self.parallel = CallReader(syntax), parallel

    def step(self, r: GenerationResponse) -> tuple[str, list[ToolCall], str | None]:
        text, calls = self.reader.step(r.token, r.text, r.finish_reason is not None)
        calls = calls if self.parallel else calls[:1]
        return text, calls, "tool_calls" if calls and r.finish_reason == "stop" else r.finish_reason


def token_logprobs(tokenizer, r: GenerationResponse) -> dict:
    """A token's log-probability and its likeliest alternatives', as OpenAI's chat and Ollama write them."""
    def entry(token: int, logprob: float) -> dict:
        data = tokenizer.token_bytes(token)
        return {"token": data.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(data)}
    return {**entry(r.token, r.logprob), "top_logprobs": [entry(*t) for t in r.top_logprobs]}


def openai_call(call: ToolCall) -> dict:
    """A call as OpenAI's API writes it: its arguments as a JSON string."""
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def served_model(model, name: str) -> Served:
    """A loaded model ready to answer: its engine thread started, its listing figures read."""
    return Served(name, model, Engine(model), served_summary(model), int(time.time()))


class Server:
    def __init__(self, catalog: Catalog, max_body: int = MAX_BODY_BYTES, body_seconds: float = BODY_SECONDS,
                 trace=None):
        self.catalog = catalog
        self.max_body, self.body_seconds = max_body, body_seconds
        self.trace = trace  # gets every answer's routing records (serve --trace), as Model.stream's trace
        # Parsing, checking and tokenizing a request: off the event loop. Two threads: a huge prompt
        # occupies one, the other keeps serving the small ones (sentencepiece releases the GIL).
        self.workers = ThreadPoolExecutor(2, thread_name_prefix="localmix-request")

    # --- the request's way in ---------------------------------------------------------------

    async def read(self, request: Request) -> bytes:
        """The body, never more than max_body bytes of it in memory (413 beyond), within body_seconds (408)."""
        try:
            async with asyncio.timeout(self.body_seconds):
                return await self._read(request)
        except TimeoutError:
            raise BadRequest(408, f"the request body did not arrive within {self.body_seconds:g} s",
                             "request_timeout") from None

    async def _read(self, request: Request) -> bytes:
        too_big = BadRequest(413, f"the request body is larger than {self.max_body} bytes", "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_big
        body, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise too_big
                body.append(chunk)
        except ClientDisconnect:
            raise Gone() from None
        return b"".join(body)

    async def ask(self, request: Request, chat: bool, ollama: bool) -> Ask:
        raw = await self.read(request)
        return await self.off_loop(self.parse, raw, chat, ollama)

    def parse(self, raw: bytes, chat: bool, ollama: bool) -> Ask | Preload:
        """The request, checked field by field, and its prompt tokenized (in a worker thread); or, for
        Ollama's request with no prompt (or no messages), the model loaded and nothing to answer."""
        if not raw.strip():
            raise BadRequest(400, "the request body is empty: send a JSON object")
        body = checked(validate.parse_json, raw, "the request body", "JSON")  # NaN, Infinity, deep nesting: 400
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest(400, f"request: model must be a string, got {type(model).__name__}")
        served = self.acquire(model, body.get("keep_alive") if ollama else None)
        try:
            if ollama and body.get("messages" if chat else "prompt") in (None, "", []):
                unload = served.keep_alive == 0  # as Catalog.acquire read it: the next expiry check unloads it
                self.catalog.release(served)
                return Preload(served, unload)
            return self.parse_for(served, body, chat, ollama)
        except BaseException:
            self.catalog.release(served)
            raise

    def acquire(self, model: str | None, keep_alive=None) -> Served:
        """The loaded model a request names (loading it, on demand): 404, 503 or 400 if it cannot be had."""
        try:
            return self.catalog.acquire(model, keep_alive)
        except NotFound as e:
            raise BadRequest(404, str(e), "model_not_found") from None
        except Busy as e:
            raise BadRequest(503, str(e), "server_busy") from None
        except LocalmixError as e:
            raise BadRequest(400, str(e)) from None

    def parse_for(self, served: Served, body: dict, chat: bool, ollama: bool) -> Ask:
        stream = optional(body, "stream", ollama, validate.boolean)  # Ollama streams unless told not to
        include_usage = False
        if not ollama and body.get("stream_options") is not None:
            options = body["stream_options"]
            if not isinstance(options, dict):
                raise BadRequest(400, "request: stream_options must be an object")
            include_usage = optional(options, "include_usage", False, validate.boolean)
        refuse_unsupported(body, ollama)
        n = 1 if ollama else optional(body, "n", 1, validate.integer, 1, MAX_CHOICES)
        logprobs = logprobs_asked(body, chat, ollama)
        grammar = structured_output(body, ollama)
        params, length = sampling(body, ollama)  # (checks Ollama's options is an object)
        if not chat and body.get("tools") not in (None, []):
            raise BadRequest(400, "request: tools are offered in a chat (/api/chat, /v1/chat/completions)", param="tools")
        tools, choice, parallel = tools_asked(body, ollama) if chat else (None, None, True)
        model, context = served.model, served.context
        syntax = model.tokenizer.tool_syntax
        if tools and syntax is None:
            raise BadRequest(400, f"request: tools: the chat format of {served.name} has no tools localmix can "
                                  f"read (it reads Mistral's v3 format and <tool_call> templates)", param="tools")
        if choice not in (None, "none", "auto"):  # a call is required: its grammar
            if grammar is not None:
                raise BadRequest(400, "request: a response_format and a required tool call cannot both be met",
                                 param="tool_choice")
            grammar = checked(syntax.grammar, tools, None if choice == "required" else choice, parallel)
        experts = model.config.num_local_experts
        options = checked(model.routing_options, **routing_fields(body, ollama, experts), trace=self.trace)
        ids, new_text = self.prompt(model, body, chat, ollama, tools)
        room = context - len(ids)
        if room < 1:
            raise BadRequest(400, f"the prompt has {len(ids)} tokens, more than the model's context of "
                                  f"{context} leaves room for", "context_length_exceeded")
        if length is None:  # not asked: the default, or what fits
            length = min(room, DEFAULT_MAX_TOKENS)
        elif length == FILL:
            length = room
        elif length > room:
            name = "num_predict" if ollama else "max_tokens"
            raise BadRequest(400, f"the prompt has {len(ids)} tokens and {name} asks for {length}: "
                                  f"{len(ids) + length} is more than the model's context of {context} tokens",
                             "context_length_exceeded")
        constraints = None if grammar is None else [checked(Constraint, served.engine.vocabulary(), grammar)
                                                    for _ in range(n)]
        return Ask(served, ids, params, options, length, stream, new_text, include_usage, n, logprobs, constraints,
                   syntax if tools and choice != "none" else None, parallel)

    def prompt(self, model, body: dict, chat: bool, ollama: bool, tools: list[dict] | None = None
               ) -> tuple[list[int], bool]:
        """(ids, whether the answer starts a new text) for the request's messages (and tools) or prompt."""
        tokenizer = model.tokenizer
        try:
            if chat:  # Model.encode_prompt: the chat template, or a base model's plain-text continuation
                return model.encode_prompt(messages_of(body.get("messages"), ollama), tools)
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise BadRequest(400, "request: prompt must be a string")
            system = optional(body, "system", None, validate.string, 1 << 30)
            raw = optional(body, "raw", system is None, validate.boolean) if ollama else True
            if raw or system is None:
                return tokenizer.encode(prompt, bos=True), False
            return model.encode_prompt([{"role": "system", "content": system},
                                             {"role": "user", "content": prompt}])
        except LocalmixError as e:
            raise BadRequest(400, str(e)) from None
        except RecursionError:  # (tools and arguments are bounded in depth: a last guard)
            raise BadRequest(400, "request: the messages or tools are nested too deeply") from None

    def queue(self, ask: Ask) -> list[Job]:
        """The request's n answers, queued for its model's engine (503 if too many wait already); the
        model is no longer held by the request, but by its answers. Answer i samples with the request's
        seed plus i: n answers, not n copies of one."""
        jobs = []
        try:
            for choice in range(ask.n):
                params = ask.params
                if choice and params.seed is not None:
                    params = dataclasses.replace(params, seed=(params.seed + choice) % (1 << 64))
                job = Job(ask.ids, ask.length, params, ask.options, ask.chat, asyncio.get_running_loop(),
                          asyncio.Queue(), ask.logprobs, ask.constraints[choice] if ask.constraints else None)
                ask.served.engine.submit(job)
                jobs.append(job)
        except BaseException:
            for job in jobs:
                job.cancelled = True
            raise
        finally:
            self.catalog.release(ask.served)
        return jobs

    async def responses(self, job: Job):
        """The engine's responses for this job; leaving early (a client gone) cancels it."""
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            job.cancelled = True

    async def whole(self, request: Request, ask: Ask) -> list[list[GenerationResponse]] | None:
        """All of a non-streamed request's answers (n of them), or None if the client left first: then
        they are cancelled at once (the engine decodes at most the token under way), instead of
        running to max_tokens for nobody while the requests behind them wait."""
        jobs = self.queue(ask)
        collect = asyncio.ensure_future(asyncio.gather(*(_gather(self.responses(job)) for job in jobs)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            failed = collect.done() and not collect.cancelled() and collect.exception() is not None
            for job in jobs:  # none goes on for nobody: not when the client left, nor when another failed
                job.cancelled = job.cancelled or not collect.done() or failed
        if collect.done():
            return collect.result()
        collect.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collect
        log.info("client %s left before its answer was complete; answer cancelled", _client(request))
        return None

    # --- OpenAI -----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        listed = await self.off_loop(self.listing)
        return JSONResponse({"object": "list", "data": [{"id": d.name, "object": "model", "created": d.created,
                                                          "owned_by": "localmix"} for d in listed]})

    async def off_loop(self, call, *args):
        return await asyncio.get_running_loop().run_in_executor(self.workers, call, *args)

    def listing(self) -> list[Described]:
        """Every model requests may name, described without loading it (in a worker thread)."""
        described = []
        for name in self.catalog.names():
            with contextlib.suppress(LocalmixError):  # a damaged model: left out (localmix verify says why)
                described.append(self.described(name))
        return described

    def described(self, name: str) -> Described:
        served = self.catalog.loaded.get(name)
        if served is not None:
            return Described(name, served.summary, served.model.config, Path(served.model.path), served.created)
        folder = models_dir() / name
        manifest, args, _ = open_manifest(folder, str(folder))  # read and checked once
        summary = summarize(folder, manifest, args)
        return Described(name, summary, args, folder, int(datetime.fromisoformat(summary["created"]).timestamp()))

    async def openai(self, request: Request, chat: bool) -> Response:
        try:
            ask = await self.ask(request, chat, ollama=False)
        except BadRequest as e:
            return error(e.status, str(e), code=e.code, param=e.param)
        except Gone:
            return _gone(request)
        ids = ask.ids
        answer_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"
        tokenizer, name = ask.served.model.tokenizer, ask.served.name

        def logprobs(parts: list[GenerationResponse]) -> dict | None:
            """OpenAI's logprobs of these tokens: chat's `content` list, or completions' four lists."""
            if ask.logprobs is None:
                return None
            parts = [r for r in parts if r.token is not None]
            pieces = [tokenizer.token_bytes(r.token) for r in parts]
            if chat:
                return {"content": [token_logprobs(tokenizer, r) for r in parts]}
            texts = [p.decode("utf-8", "replace") for p in pieces]
            offsets = np.cumsum([0] + [len(t) for t in texts[:-1]]).tolist() if parts else []
            return {"tokens": texts,
                    "token_logprobs": [r.logprob for r in parts],
                    "top_logprobs": [{tokenizer.token_bytes(t).decode("utf-8", "replace"): lp
                                      for t, lp in r.top_logprobs} for r in parts],
                    "text_offset": offsets}

        def choice(index: int, parts: list[GenerationResponse]) -> dict:
            """A whole answer: its text, or (tools offered) its text and its calls."""
            text, finish = "".join(r.text for r in parts), parts[-1].finish_reason
            if not chat:
                return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs(parts)}
            message = {"role": "assistant", "content": text}
            if ask.tool_syntax is not None:
                calls, text, answer = [], "", AnswerCalls(ask.tool_syntax, ask.parallel_calls)
                for r in parts:
                    shown, calls, finish = answer.step(r)
                    text += shown
                message = {"role": "assistant", "content": text or (None if calls else "")}
                if calls:
                    message["tool_calls"] = [openai_call(c) for c in calls]
            return {"index": index, "message": message, "logprobs": logprobs(parts), "finish_reason": finish}

        def delta(index: int, r: GenerationResponse, answer: AnswerCalls | None) -> dict:
            """A streamed step: its text (with tools offered: what is not part of a call), and at the end
            the calls, whole, as one delta."""
            if not chat:
                return {"index": index, "text": r.text, "finish_reason": r.finish_reason, "logprobs": logprobs([r])}
            text, finish, change = r.text, r.finish_reason, {"role": "assistant"}
            if answer is not None:
                text, calls, finish = answer.step(r)
                if calls:
                    change["tool_calls"] = [{"index": i, **openai_call(c)} for i, c in enumerate(calls)]
            change["content"] = text
            return {"index": index, "delta": change, "logprobs": logprobs([r]), "finish_reason": finish}

        def usage(generated: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": generated, "total_tokens": len(ids) + generated}

        def envelope(choices: list, extra: dict | None = None, chunk: bool = False) -> dict:
            return {"id": answer_id, "object": kind + (".chunk" if chunk and chat else ""), "created": int(time.time()),
                    "model": name, "choices": choices, **(extra or {})}

        if not ask.stream:
            try:
                answers = await self.whole(request, ask)
            except BadRequest as e:
                return error(e.status, str(e), code=e.code)
            except LocalmixError as e:
                return error(400, str(e))
            if answers is None:
                return _gone(request)
            return JSONResponse(envelope([choice(i, parts) for i, parts in enumerate(answers)],
                                         {"usage": usage(sum(parts[-1].generation_tokens for parts in answers))}))

        try:
            streams = [self.responses(job) for job in self.queue(ask)]
        except BadRequest as e:
            return error(e.status, str(e), code=e.code)

        async def events():
            generated = 0
            answers = [AnswerCalls(ask.tool_syntax, ask.parallel_calls) if ask.tool_syntax else None for _ in streams]
            try:
                async for index, r in _merged(streams):
                    yield sse(envelope([delta(index, r, answers[index])], chunk=True))
                    generated += r.generation_tokens if r.finish_reason else 0
                if ask.include_usage:
                    yield sse(envelope([], {"usage": usage(generated)}, chunk=True))
            except LocalmixError as e:
                yield sse({"error": {"message": str(e), "type": "invalid_request_error"}})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    # --- Ollama -----------------------------------------------------------------------------

    async def tags(self, request: Request) -> Response:
        listed = await self.off_loop(self.listing)
        return JSONResponse({"models": [{"name": d.name, "model": d.name, "modified_at": d.summary["created"],
                                         "size": d.summary["disk_bytes"], "digest": "", "details": details(d.summary)}
                                        for d in listed]})

    async def ollama(self, request: Request, chat: bool) -> Response:
        try:
            ask = await self.ask(request, chat, ollama=True)
        except BadRequest as e:
            return ollama_error(e.status, str(e))
        except Gone:
            return _gone(request)
        if isinstance(ask, Preload):  # Ollama's way to load a model ahead (or, with keep_alive 0, to unload it)
            empty = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
            return JSONResponse({"model": ask.served.name, "created_at": now(), **empty, "done": True,
                                 "done_reason": "unload" if ask.unload else "load"})
        ids = ask.ids
        started = time.perf_counter_ns()

        answer = AnswerCalls(ask.tool_syntax, ask.parallel_calls) if ask.tool_syntax else None
        tokenizer = ask.served.model.tokenizer

        def line(r: GenerationResponse, text: str, calls: list[ToolCall] = ()) -> dict:
            if chat:
                message = {"role": "assistant", "content": text}
                if calls:
                    message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                out = {"model": ask.served.name, "created_at": now(), "message": message}
            else:
                out = {"model": ask.served.name, "created_at": now(), "response": text}
            if ask.logprobs is not None and r.token is not None:
                out["logprobs"] = [token_logprobs(tokenizer, r)]
            out["done"] = r.finish_reason is not None
            if r.finish_reason:
                total = time.perf_counter_ns() - started
                prompt_ns = int(len(ids) / max(r.prompt_tps, 1e-9) * 1e9)
                out.update(done_reason=r.finish_reason, total_duration=total, load_duration=0,
                           prompt_eval_count=len(ids), prompt_eval_duration=prompt_ns, eval_count=r.generation_tokens,
                           eval_duration=max(0, total - prompt_ns))
            return out

        def step(r: GenerationResponse) -> dict:
            """A step's line: its text (with tools offered: what is not part of a call; the calls at the end)."""
            if answer is None:
                return line(r, r.text)
            text, calls, _ = answer.step(r)  # (Ollama's done_reason stays "stop" for a call)
            return line(r, text, calls)

        if not ask.stream:
            try:
                parts = await self.whole(request, ask)
            except BadRequest as e:
                return ollama_error(e.status, str(e))
            except LocalmixError as e:
                return ollama_error(400, str(e))
            if parts is None:
                return _gone(request)
            lines = [step(r) for r in parts[0]]
            whole = lines[-1]
            if chat:
                whole["message"]["content"] = "".join(x["message"]["content"] for x in lines)
            else:
                whole["response"] = "".join(x["response"] for x in lines)
            if ask.logprobs is not None:
                whole["logprobs"] = [entry for x in lines for entry in x.get("logprobs", [])]
            return JSONResponse(whole)

        try:
            responses = self.responses(self.queue(ask)[0])
        except BadRequest as e:
            return ollama_error(e.status, str(e))

        async def lines():
            try:
                async for r in responses:
                    yield json.dumps(step(r)) + "\n"
            except LocalmixError as e:
                yield json.dumps({"error": str(e)}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def health(self, request: Request) -> Response:
        fixed = self.catalog.fixed
        return JSONResponse({"status": "ok", "model": fixed.name if fixed else None,
                             "loaded": list(self.catalog.loaded)})

    # --- Ollama: the server and its models ----------------------------------------------------

    async def root(self, request: Request) -> Response:
        """GET and HEAD /: how Ollama's clients and tools check that a server is up."""
        return PlainTextResponse("localmix is running")

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    def named(self, body: dict, key: str = "model") -> str:
        """The model a request names (Ollama's `model`, or the older `name`), one this server has."""
        model = body.get(key, body.get("name") if key == "model" else None)
        if not isinstance(model, str) or not model:
            raise BadRequest(400, f"request: {key} must be a model name")
        try:
            return self.catalog.name_of(model)
        except LocalmixError as e:
            raise BadRequest(404, str(e)) from None

    async def body_of(self, request: Request) -> dict:
        raw = await self.read(request)
        body = checked(validate.parse_json, raw or b"{}", "the request body", "JSON")
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        return body

    async def show(self, request: Request) -> Response:
        """POST /api/show: the model's details, parameters, template and model_info, as Ollama's."""
        try:
            d = await self.off_loop(self.described, self.named(await self.body_of(request)))
        except BadRequest as e:
            return ollama_error(e.status, str(e))
        except LocalmixError as e:
            return ollama_error(400, str(e))
        except Gone:
            return _gone(request)
        s, args = d.summary, d.args
        arch = s["architecture"]
        info = {"general.architecture": arch, "general.parameter_count": s["parameters"],
                f"{arch}.context_length": args.max_position_embeddings, f"{arch}.embedding_length": args.hidden_size,
                f"{arch}.block_count": args.num_hidden_layers, f"{arch}.attention.head_count": args.num_attention_heads,
                f"{arch}.attention.head_count_kv": args.num_key_value_heads,
                f"{arch}.expert_count": args.num_local_experts, f"{arch}.expert_used_count": args.num_experts_per_tok,
                "localmix.active_parameter_count": s["active_parameters"], "localmix.path": str(d.path)}
        return JSONResponse({"modelfile": f"# localmix serves {d.name} from {d.path}\n",
                             "parameters": "temperature 0.8\ntop_p 0.9\ntop_k 40\nrepeat_penalty 1.1",
                             "template": "",  # the chat template is the model's own (jinja or mistral-common), not Go's
                             "details": details(s), "model_info": info,
                             "capabilities": ["completion"], "modified_at": s["created"]})

    async def ps(self, request: Request) -> Response:
        """GET /api/ps: the loaded models, and when each will be unloaded if nothing asks for it."""
        def expiry(served: Served) -> str:
            at = served.expires_at()
            return "0001-01-01T00:00:00Z" if at is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        return JSONResponse({"models": [{"name": s.name, "model": s.name, "size": s.summary["disk_bytes"], "digest": "",
                                         "details": details(s.summary), "expires_at": expiry(s), "size_vram": 0,
                                         "context_length": s.context} for s in list(self.catalog.loaded.values())]})

    async def delete(self, request: Request) -> Response:
        """DELETE /api/delete: a model of $LOCALMIX_HOME, unloaded first if idle (refused for the model
        of `localmix serve NAME`, and for one answering requests)."""
        from localmix.home import remove_model
        try:
            name = self.named(await self.body_of(request))
        except BadRequest as e:
            return ollama_error(e.status, str(e))
        except Gone:
            return _gone(request)
        if self.catalog.fixed:
            return ollama_error(400, f"{name} is the model this server runs; stop the server, "
                                     f"then `localmix rm {name}`")
        if not await self.off_loop(self.catalog.unload, name):
            return ollama_error(400, f"{name} is answering requests; try again when it is idle")
        try:
            await self.off_loop(remove_model, name)
        except LocalmixError as e:
            return ollama_error(400, str(e))
        return Response(status_code=200)

    async def copy(self, request: Request) -> Response:
        """POST /api/copy: a model under another name in $LOCALMIX_HOME/models (its files linked)."""
        from localmix.quant.pull import copy_model
        try:
            body = await self.body_of(request)
            source = self.named(body, "source")
            destination = body.get("destination")
            if not isinstance(destination, str):
                raise BadRequest(400, "request: destination must be a model name")
            d = await self.off_loop(self.described, source)
            await self.off_loop(checked, copy_model, d.path, destination.removesuffix(":latest"))
        except BadRequest as e:
            return ollama_error(e.status, str(e))
        except Gone:
            return _gone(request)
        return Response(status_code=200)

    async def pull(self, request: Request) -> Response:
        """POST /api/pull: `localmix pull` of a Hugging Face repository (OWNER/NAME) into $LOCALMIX_HOME,
        its progress as Ollama's status lines (streamed unless "stream": false). Never a local path:
        a client names what the hub has, not what this machine's disk holds."""
        from localmix.quant.hub import looks_like_repo_id
        try:
            body = await self.body_of(request)
            repo = body.get("model", body.get("name"))
            if not isinstance(repo, str) or not looks_like_repo_id(repo.removesuffix(":latest")):
                raise BadRequest(400, "request: model must be a Hugging Face repository id (OWNER/NAME)")
            stream = optional(body, "stream", True, validate.boolean)
        except BadRequest as e:
            return ollama_error(e.status, str(e))
        except Gone:
            return _gone(request)
        updates = pull_in_background(repo.removesuffix(":latest"), asyncio.get_running_loop())
        if stream:
            return StreamingResponse((json.dumps(update) + "\n" async for update in updates),
                                     media_type="application/x-ndjson")
        last = [update async for update in updates][-1]
        return ollama_error(400, last["error"]) if "error" in last else JSONResponse(last)

    async def not_implemented(self, request: Request) -> Response:
        """Ollama's create, push and blobs: models come from `localmix pull` and `localmix shrink`."""
        return ollama_error(501, f"{request.url.path} is not supported: localmix makes models with `localmix pull` "
                                 f"(and `localmix shrink`), not from Modelfiles, and pushes to no registry")

    async def embed(self, request: Request) -> Response:
        """/api/embed, /api/embeddings, /v1/embeddings: a generative MoE model has no trained embedding;
        a mean of its hidden states would look like one and mean little, so: a clear 501."""
        message = ("embeddings are not supported: localmix serves generative models, which have no trained "
                   "embedding; use an embedding model with Ollama or sentence-transformers")
        if request.url.path.startswith("/v1"):
            return error(501, message, code="not_implemented")
        return ollama_error(501, message)

    async def one_model(self, request: Request) -> Response:
        """GET /v1/models/{id}."""
        try:
            d = await self.off_loop(self.described, self.catalog.name_of(request.path_params["model"]))
        except LocalmixError as e:
            return error(404, str(e), code="model_not_found")
        return JSONResponse({"id": d.name, "object": "model", "created": d.created, "owned_by": "localmix"})


async def pull_in_background(repo: str, loop: asyncio.AbstractEventLoop):
    """Ollama's pull status lines for `localmix pull REPO`, which runs in a thread of its own (a pull
    takes minutes to hours; the client leaving does not stop it: the model it has paid for in
    downloads is finished). Progress: at most a line every PROGRESS_SECONDS per file."""
    from localmix.quant.pull import pull
    queue: asyncio.Queue = asyncio.Queue()
    sent: dict[str, float] = {}

    def put(update: dict | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, update)

    def progress(what: str, done: int, total: int) -> None:
        now_s = time.monotonic()
        if done < total and now_s - sent.get(what, 0.0) < PROGRESS_SECONDS:
            return
        sent[what] = now_s
        put({"status": what, "digest": what, "total": total, "completed": done})

    def work() -> None:
        try:
            put({"status": "pulling manifest"})
            out = pull(repo, on_progress=lambda done, total: progress("quantizing", done, total),
                       on_download=lambda name, done, total: progress(f"downloading {name}", done, total),
                       say=lambda text: put({"status": text}), hub_only=True)
            put({"status": f"pulled {out.name}"})
            put({"status": "success"})
        except LocalmixError as e:
            put({"error": str(e)})
        except Exception as e:  # noqa: BLE001 (a pull must never take the server down)
            log.exception("internal error while pulling %s", repo)
            put({"error": f"internal error: {e}"})
        finally:
            put(None)

    threading.Thread(target=work, name="localmix-pull", daemon=True).start()
    while (update := await queue.get()) is not None:
        yield update


PROGRESS_SECONDS = 0.5
EXPIRY_SECONDS = 1.0  # how often idle models' keep-alives are checked (Catalog.expire)


@dataclass
class Described:
    """A model as the listings describe it, loaded or not."""
    name: str
    summary: dict     # store.model_summary's figures
    args: object      # its config.ModelArgs
    path: Path
    created: int      # Unix time


def details(s: dict) -> dict:
    """Ollama's `details` of a model (s: store.model_summary's figures)."""
    return {"parent_model": "", "format": "localmix", "family": s["architecture"],
            "families": [s["architecture"]], "parameter_size": f"{s['parameters'] / 1e9:.1f}B",
            "quantization_level": f"{s['bits']}-bit affine, groups of {s['group_size']}"}


def served_summary(model) -> dict:
    """store.model_summary's figures for a localmix model; for a Hugging Face folder served as it is
    (float32), the same keys from its config."""
    if is_localmix_model(model.path):
        return model_summary(model.path)
    args = model.config
    sizes = {name: int(np.prod(shape)) for name, shape in tensor_table(args)}
    experts = sum(n for name, n in sizes.items() if tensor_file(name, args) != DENSE_FILE)
    share = args.num_experts_per_tok / args.num_local_experts if args.is_moe else 1.0
    return {"architecture": args.model_type, "parameters": sum(sizes.values()),
            "active_parameters": int(sum(sizes.values()) - experts * (1 - share)), "bits": 32, "group_size": 0,
            "disk_bytes": 4 * sum(sizes.values()), "created": now()}


def ollama_error(status: int, message: str) -> JSONResponse:
    """Ollama's error body: {"error": "..."} (its clients read the string)."""
    return JSONResponse({"error": message}, status_code=status)


async def _gather(answer) -> list:
    return [r async for r in answer]


async def _merged(streams: list):
    """(index, response) from several answers' streams as each comes; leaving early closes them all
    (which cancels their answers)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for r in stream:
                queue.put_nowait((index, r))
        except Exception as e:  # noqa: BLE001 (raised in the consumer)
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:  # each pump's cancellation closes its stream (Server.responses: its answer is cancelled)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the ASGI disconnect message; the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def _gone(request: Request) -> Response:
    """Nobody reads this (uvicorn drops what is sent to a closed connection): one line in the log, no traceback."""
    log.info("client %s left before its request was answered", _client(request))
    return Response(status_code=499)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class QuietCancellations(logging.Filter):
    """A second Ctrl-C makes uvicorn exit at once, cancelling the requests in flight and its lifespan
    task: their end, not an error to print tracebacks for. (Starlette sends the lifespan's as text.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return False
        return not str(record.msg).rstrip().endswith("asyncio.exceptions.CancelledError")


class Gate:
    """ASGI middleware: one log line per request, as Ollama prints them (status, seconds, client,
    method and path), and with an API key, a 401 for a request without `Authorization: Bearer KEY`
    (`/` answers without: it is how clients see that a server is up)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        client = f"{scope['client'][0]}" if scope.get("client") else "?"

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if self.api_key and scope["path"] != "/" and not self.allowed(scope):
                response = error(401, "missing or wrong API key: send Authorization: Bearer KEY",
                                 code="invalid_api_key")
                await response(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            log.info("%3d | %8.3fs | %15s | %-6s %s", status[0], time.perf_counter() - start, client,
                     scope["method"], json.dumps(scope["path"]))

    def allowed(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode())


def create_app(model=None, name: str | None = None, max_body: int = MAX_BODY_BYTES, body_seconds: float = BODY_SECONDS,
               trace=None, api_key: str | None = None, catalog: Catalog | None = None) -> Starlette:
    """The app serving `model` as `name`, or the catalog's models (catalog.Catalog: on demand).
    trace: gets every answer's routing records (a routing.TraceFile). api_key: required of every
    request but `/` (Gate)."""
    catalog = catalog or Catalog(fixed=served_model(model, name))
    server = Server(catalog, max_body, body_seconds, trace)

    async def expire_models():  # unload the idle models whose keep-alive ran out
        while True:
            await asyncio.sleep(EXPIRY_SECONDS)
            await server.off_loop(catalog.expire)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        expiry = asyncio.ensure_future(expire_models()) if catalog.on_demand else None
        yield
        if expiry:
            expiry.cancel()
        catalog.stop(wait=0.0)
        server.workers.shutdown(wait=False, cancel_futures=True)

    async def not_found(request: Request, exc) -> Response:
        return error(404, f"no route {request.method} {request.url.path}", code="not_found")

    async def failed(request: Request, exc) -> Response:
        return error(500, f"internal error: {exc}", kind="server_error")

    app = Starlette(routes=[
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/chat/completions", partial(server.openai, chat=True), methods=["POST"]),
        Route("/v1/completions", partial(server.openai, chat=False), methods=["POST"]),
        Route("/v1/models/{model:path}", server.one_model),
        Route("/v1/embeddings", server.embed, methods=["POST"]),
        Route("/", server.root, methods=["GET", "HEAD"]),
        Route("/api/version", server.version),
        Route("/api/tags", server.tags),
        Route("/api/show", server.show, methods=["POST"]),
        Route("/api/ps", server.ps),
        Route("/api/delete", server.delete, methods=["DELETE"]),
        Route("/api/copy", server.copy, methods=["POST"]),
        Route("/api/pull", server.pull, methods=["POST"]),
        Route("/api/create", server.not_implemented, methods=["POST"]),
        Route("/api/push", server.not_implemented, methods=["POST"]),
        Route("/api/blobs/{digest:path}", server.not_implemented, methods=["POST", "HEAD"]),
        Route("/api/embed", server.embed, methods=["POST"]),
        Route("/api/embeddings", server.embed, methods=["POST"]),
        Route("/api/chat", partial(server.ollama, chat=True), methods=["POST"]),
        Route("/api/generate", partial(server.ollama, chat=False), methods=["POST"]),
    ], exception_handlers={404: not_found, 405: not_found, 500: failed}, lifespan=lifespan,
       middleware=[Middleware(Gate, api_key=api_key)])
    app.state.server = server
    return app
