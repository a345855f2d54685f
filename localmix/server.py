"""`localmix serve`: OpenAI and Ollama HTTP routes over one loaded model (Starlette on uvicorn).

Requests share the model through one engine thread: it prefills each new request's prompt, then
decodes every active answer together, one token each per step (Transformer.step), so that each
weight read serves all of them. Answers stream back to the request handlers through asyncio
queues; a client that goes away cancels its answer at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from localmix.errors import LocalmixError
from localmix.generate import Generation, GenerationResponse
from localmix.sampling import SamplingParams


@dataclass
class Job:
    """One answer in the engine: its generation, and where its responses go."""
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    chat: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: bool = False
    generation: Generation | None = field(default=None, repr=False)

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class Engine:
    """The thread that runs the model for every request."""

    def __init__(self, model, max_batch: int = 8):
        self.model, self.max_batch = model, max_batch
        self.waiting: list[Job] = []
        self.active: list[Job] = []
        self.wake = threading.Condition()
        self.stopped = False
        self.widest = 0  # the most answers decoded together so far
        self.thread = threading.Thread(target=self.run, name="localmix-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.wake:
            self.waiting.append(job)
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()

    def run(self) -> None:
        while True:
            with self.wake:
                while not (self.waiting or self.active or self.stopped):
                    self.wake.wait()
                if self.stopped:
                    return
                room = self.max_batch - len(self.active)
                admitted, self.waiting = self.waiting[:room], self.waiting[room:]
            for job in admitted:
                self.start(job)
            self.step()

    def start(self, job: Job) -> None:
        if job.cancelled:
            return
        try:
            job.generation = Generation(self.model.transformer, self.model.tokenizer, job.prompt, job.max_tokens,
                                        job.params, strip_leading_space=job.chat)
            job.generation.prefill()
        except LocalmixError as e:
            job.send(e)
            return
        except Exception as e:  # noqa: BLE001 (a request must never stop the engine)
            job.send(LocalmixError(f"internal error: {e}"))
            return
        self.active.append(job)

    def step(self) -> None:
        """Sample a token for each active answer, send it, then run the model once for all that go on."""
        going = []
        for job in self.active:
            if job.cancelled:
                continue
            try:
                response = job.generation.next()
            except Exception as e:  # noqa: BLE001 (a request must never stop the engine)
                job.send(LocalmixError(f"internal error: {e}"))
                continue
            job.send(response)
            if response.finish_reason is None:
                going.append((job, response.token))
        self.active = [job for job, _ in going]
        if not going:
            return
        self.widest = max(self.widest, len(going))
        try:
            logits = self.model.transformer.step([token for _, token in going], [job.generation.cache for job, _ in going])
        except Exception as e:  # noqa: BLE001
            for job, _ in going:
                job.send(LocalmixError(f"internal error: {e}"))
            self.active = []
            return
        for (job, _), row in zip(going, logits):
            job.generation.logits = row


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    """An OpenAI-style error body (Ollama clients read its "error" too)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def sampling(body: dict, ollama: bool) -> tuple[SamplingParams, int]:
    """Sampling settings and the answer's length as each API names them."""
    o = (body.get("options") or {}) if ollama else body
    if not isinstance(o, dict):
        raise BadRequest(400, "options must be an object")
    stop = o.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    try:
        params = SamplingParams(
            temperature=float(o.get("temperature", 0.8 if ollama else 1.0)),
            top_p=float(o.get("top_p", 0.9 if ollama else 1.0)), top_k=int(o.get("top_k", 40 if ollama else 0)),
            min_p=float(o.get("min_p", 0.0)), seed=o.get("seed"),
            repeat_penalty=float(o.get("repeat_penalty", 1.1 if ollama else 1.0)), stop=list(stop)).check()
        length = o.get("num_predict", 256) if ollama else body.get("max_completion_tokens", body.get("max_tokens", 256))
        length = 256 if length is None else int(length)
    except (TypeError, ValueError) as e:
        raise BadRequest(400, f"bad sampling parameter: {e}") from None
    except LocalmixError as e:
        raise BadRequest(400, str(e)) from None
    if ollama and length < 0:  # Ollama: -1 is "until the context is full"
        length = 1 << 30
    if length < 0:
        raise BadRequest(400, f"max_tokens must be >= 0, got {length}")
    return params, length


class Server:
    def __init__(self, model, name: str):
        self.model, self.name, self.created = model, name, int(time.time())
        self.engine = Engine(model)
        self.context = model.config.max_position_embeddings

    # --- the request's way in ---------------------------------------------------------------

    async def body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise BadRequest(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", self.name) and model.split(":")[0] != self.name:
            raise BadRequest(404, f"model {model!r} not found; this server has {self.name!r}", "model_not_found")
        return body

    def prompt(self, body: dict, chat: bool) -> list[int]:
        try:
            if chat:
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise BadRequest(400, "messages must be a non-empty list")
                messages = [{"role": m.get("role"), "content": text_of(m.get("content"))} for m in messages]
                ids = self.model.tokenizer.apply_chat_template(messages)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise BadRequest(400, "prompt must be a string")
                system = body.get("system")
                if body.get("raw", True) or system is None:
                    ids = self.model.tokenizer.encode(prompt, bos=True)
                else:
                    ids = self.model.tokenizer.apply_chat_template(
                        [{"role": "system", "content": system}, {"role": "user", "content": prompt}])
        except (LocalmixError, AttributeError, TypeError) as e:
            raise BadRequest(400, str(e)) from None
        if len(ids) >= self.context:
            raise BadRequest(400, f"the prompt has {len(ids)} tokens, more than the model's context of "
                                  f"{self.context} leaves room for", "context_length_exceeded")
        return ids

    async def responses(self, ids: list[int], params: SamplingParams, length: int, chat: bool):
        """The engine's responses for this request; leaving early (a client gone) cancels it."""
        job = Job(ids, length, params, chat, asyncio.get_running_loop(), asyncio.Queue())
        self.engine.submit(job)
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

    # --- OpenAI -----------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                          "owned_by": "localmix"}]})

    async def openai(self, request: Request, chat: bool) -> Response:
        try:
            body = await self.body(request)
            ids = self.prompt(body, chat)
            params, length = sampling(body, ollama=False)
        except BadRequest as e:
            return error(e.status, str(e), code=e.code)
        answer_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, final: bool) -> dict:
            if chat:
                key = "message" if final else "delta"
                return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def usage(last: GenerationResponse) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": last.generation_tokens,
                    "total_tokens": len(ids) + last.generation_tokens}

        def envelope(choices: list, extra: dict | None = None, chunk: bool = False) -> dict:
            return {"id": answer_id, "object": kind + (".chunk" if chunk and chat else ""), "created": int(time.time()),
                    "model": self.name, "choices": choices, **(extra or {})}

        answer = self.responses(ids, params, length, chat)
        if not body.get("stream"):
            try:
                parts = [r async for r in answer]
            except LocalmixError as e:
                return error(400, str(e))
            text = "".join(r.text for r in parts)
            return JSONResponse(envelope([choice(text, parts[-1].finish_reason, True)], {"usage": usage(parts[-1])}))

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            try:
                async for r in answer:
                    yield sse(envelope([choice(r.text, r.finish_reason, False)], chunk=True))
                    if r.finish_reason and include_usage:
                        yield sse(envelope([], {"usage": usage(r)}, chunk=True))
            except LocalmixError as e:
                yield sse({"error": {"message": str(e), "type": "invalid_request_error"}})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    # --- Ollama -----------------------------------------------------------------------------

    async def tags(self, request: Request) -> Response:
        size = sum(path.stat().st_size for path in Path(self.model.path).rglob("*") if path.is_file())
        details = {"format": "localmix", "family": self.model.config.model_type,
                   "parameter_size": "", "quantization_level": ""}
        return JSONResponse({"models": [{"name": self.name, "model": self.name, "modified_at": now(), "size": size,
                                         "digest": "", "details": details}]})

    async def ollama(self, request: Request, chat: bool) -> Response:
        try:
            body = await self.body(request)
            if not chat:
                body.setdefault("raw", body.get("system") is None)
            ids = self.prompt(body, chat)
            params, length = sampling(body, ollama=True)
        except BadRequest as e:
            return error(e.status, str(e), code=e.code)
        started = time.perf_counter_ns()

        def piece(text: str) -> dict:
            return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

        def line(r: GenerationResponse, text: str) -> dict:
            out = {"model": self.name, "created_at": now(), **piece(text), "done": r.finish_reason is not None}
            if r.finish_reason:
                total = time.perf_counter_ns() - started
                prompt_ns = int(len(ids) / max(r.prompt_tps, 1e-9) * 1e9)
                out.update(done_reason=r.finish_reason, total_duration=total, load_duration=0,
                           prompt_eval_count=len(ids), prompt_eval_duration=prompt_ns, eval_count=r.generation_tokens,
                           eval_duration=max(0, total - prompt_ns))
            return out

        answer = self.responses(ids, params, length, chat)
        if body.get("stream") is False:
            try:
                parts = [r async for r in answer]
            except LocalmixError as e:
                return error(400, str(e))
            return JSONResponse(line(parts[-1], "".join(r.text for r in parts)))

        async def lines():
            try:
                async for r in answer:
                    yield json.dumps(line(r, r.text)) + "\n"
            except LocalmixError as e:
                yield json.dumps({"error": str(e)}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.name})


def text_of(content) -> str:
    """A message's text: a string, or OpenAI's list of parts (the text ones)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise BadRequest(400, "message content must be a string or a list of text parts")


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def create_app(model, name: str) -> Starlette:
    server = Server(model, name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.stop()

    async def not_found(request: Request, exc) -> Response:
        return error(404, f"no route {request.method} {request.url.path}", code="not_found")

    async def failed(request: Request, exc) -> Response:
        return error(500, f"internal error: {exc}", kind="server_error")

    app = Starlette(routes=[
        Route("/health", server.health),
        Route("/v1/models", server.models),
        Route("/v1/chat/completions", partial(server.openai, chat=True), methods=["POST"]),
        Route("/v1/completions", partial(server.openai, chat=False), methods=["POST"]),
        Route("/api/tags", server.tags),
        Route("/api/chat", partial(server.ollama, chat=True), methods=["POST"]),
        Route("/api/generate", partial(server.ollama, chat=False), methods=["POST"]),
    ], exception_handlers={404: not_found, 405: not_found, 500: failed}, lifespan=lifespan)
    app.state.server = server
    return app
