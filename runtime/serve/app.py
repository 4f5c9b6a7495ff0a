"""The OpenAI-compatible HTTP app: ``/v1/chat/completions``, ``/v1/models``, ``/health``,
``/metrics``, on FastAPI with SSE streaming (sse-starlette).

The app only parses, checks and answers; the engine thread (runtime/serve/engine.py) owns
the model. Every refusal is one OpenAI-style error object ``{"error": {"message", "type",
"param", "code"}}`` with a one-line message; no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.sampling import DSVL_ANSWER_TOKENS, SamplingOptions
from runtime.serve.engine import Engine, Event, Job, QueueFull
from runtime.serve.messages import ImageLimits, RequestError, parse_messages
from runtime.serve.metrics import CONTENT_TYPE, Metrics


@dataclass
class ServerConfig:
    artifacts: Path
    backend: str = "ort-cpu"
    max_context: int | None = None
    threads: int = 0
    model_name: str | None = None
    max_batch: int = 8
    max_queue: int = 32
    max_body_bytes: int = 32 << 20
    max_tokens: int = DSVL_ANSWER_TOKENS  # the default when a request gives none (DSVL's chat.py)
    allow_special_tokens: bool = False
    verify_hash: bool = False
    images: ImageLimits = field(default_factory=ImageLimits)
    huge_pages: bool = True  # the decoder's weights on 2 MiB pages (runtime/hugepages.py)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.artifacts).resolve().name


class Server:
    """The loaded model, its engine and metrics."""

    def __init__(self, config: ServerConfig, metrics: Metrics):
        from runtime.pipeline import Pipeline

        self.config = config
        self.pipe = Pipeline.from_artifacts(config.artifacts, config.backend, config.max_context,
                                            config.threads, config.verify_hash,
                                            huge_pages=config.huge_pages)
        self.engine = Engine(self.pipe, config.max_batch, config.max_queue, metrics,
                             config.allow_special_tokens)

    @property
    def context(self) -> int:
        return self.engine.decoder.max_context


class State:
    """What the app's routes share: the config, metrics, and the server once loaded.

    Unpickled, a State is the one of its process with the same key: Ray Serve ships the app
    to a replica pickled twice (the deployment class and its ingress), and both copies must
    see the model the replica loads."""

    def __init__(self, config: ServerConfig, key: str | None = None):
        self.config, self.metrics = config, Metrics()
        self.key = key or uuid.uuid4().hex
        self.server: Server | None = None
        self.load_error: str | None = None
        self.created = int(time.time())

    def load(self) -> None:
        try:
            self.server = Server(self.config, self.metrics)
        except Exception as err:  # reported by /health and every request
            self.load_error = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"error: the model failed to load: {self.load_error}", file=sys.stderr)

    def load_in_background(self) -> None:
        threading.Thread(target=self.load, name="dsvl-load", daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.engine.stop()
            self.server.pipe.close()

    def __reduce__(self):
        return _process_state, (self.key, self.config)


_STATES: dict[str, State] = {}


def _process_state(key: str, config: ServerConfig) -> State:
    return _STATES.setdefault(key, State(config, key))


def error_response(message: str, status: int, param: str | None = None,
                   kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    code = {400: "invalid_request", 404: "not_found", 413: "too_large", 429: "rate_limit_exceeded",
            500: "internal_error", 503: "not_ready"}.get(status)
    if status >= 500:
        kind = "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def create_app(config: ServerConfig, load: bool = True) -> FastAPI:
    """The app; with ``load`` the model loads in the background at startup (``/health`` says
    when it is ready). Ray Serve passes ``load=False`` and sets ``app.state.dsvl`` itself."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if load:
            app.state.dsvl.load_in_background()
        yield
        app.state.dsvl.close()

    app = FastAPI(title="dsvl-edge", lifespan=lifespan)
    app.state.dsvl = State(config)

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return _count(request, error_response(str(err), err.status, err.param, err.kind, err.headers))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error_response(str(err.detail), err.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return _count(request, error_response(f"internal error: {message}", 500))

    @app.get("/health")
    async def health(request: Request):
        state: State = request.app.state.dsvl
        if state.server is not None:
            return {"status": "ok", "model": state.config.name, "pid": os.getpid()}
        if state.load_error:
            return error_response(f"the model failed to load: {state.load_error}", 503)
        return error_response("loading the model", 503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics(request: Request):
        return Response(request.app.state.dsvl.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        state: State = request.app.state.dsvl
        return {"object": "list", "data": [{"id": state.config.name, "object": "model",
                                            "created": state.created, "owned_by": "dsvl-edge"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state: State = request.app.state.dsvl
        server = _ready(state)
        payload = _json(await _body(request, state.config.max_body_bytes))
        params = Params.parse(payload, state.config, server.context,
                              server.pipe.artifacts.decoder.generation_defaults)
        conversation = await run_in_threadpool(parse_messages, payload.get("messages"),
                                               state.config.images)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(conversation.history, conversation.question, conversation.images, params.options,
                  params.max_tokens, params.explicit_max_tokens, params.stop,
                  emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            server.engine.submit(job)
        except QueueFull as err:
            raise RequestError(f"the server is busy: {err}; retry shortly", 429,
                               kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        try:
            first = await _next(events, request, job)
        except BaseException:
            job.cancelled.set()
            raise
        if first is None:  # the client left while waiting
            return Response(status_code=499)
        if first.kind == "error":
            raise RequestError(first.text, first.status)
        reply = Reply(state.config.name, first.prompt_tokens)
        if params.stream:
            return _count(request, EventSourceResponse(_sse(events, job, reply, params.include_usage),
                                                       ping=15))
        return _count(request, JSONResponse(await _collect(events, request, job, reply)))

    return app


def _count(request: Request, response: Response) -> Response:
    request.app.state.dsvl.metrics.request(response.status_code)
    return response


def _ready(state: State) -> Server:
    if state.server is None:
        message = (f"the model failed to load: {state.load_error}" if state.load_error
                   else "the model is still loading; retry shortly")
        raise RequestError(message, 503, kind="server_error")
    return state.server


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is {declared} bytes, over {limit} (--max-body-bytes)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is over {limit} bytes (--max-body-bytes)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> dict[str, Any]:
    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        payload = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as err:
        raise RequestError(f"the request body is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise RequestError("the request body must be a JSON object")
    return payload


@dataclass
class Params:
    options: SamplingOptions
    max_tokens: int
    explicit_max_tokens: bool
    stop: list[str]
    stream: bool
    include_usage: bool

    @classmethod
    def parse(cls, payload: dict, config: ServerConfig, context: int,
              defaults: dict | None = None) -> Params:
        max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
        explicit = max_tokens is not None
        if explicit and (not _is_int(max_tokens) or max_tokens < 1):
            raise RequestError("max_tokens must be a positive integer", param="max_tokens")
        temperature = _number(payload, "temperature", 0.0, 2.0)
        top_p = _number(payload, "top_p", 0.0, 1.0)
        if top_p == 0.0:
            raise RequestError("top_p must be in (0, 1]", param="top_p")
        seed = payload.get("seed")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 63):
            raise RequestError("seed must be a non-negative integer", param="seed")
        n = payload.get("n")
        if n is not None and n != 1:
            raise RequestError("n must be 1: this server returns one choice", param="n")
        stop = payload.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of at most 4 strings", param="stop")
        stream = payload.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        stream_options = payload.get("stream_options") or {}
        include_usage = bool(isinstance(stream_options, dict) and stream_options.get("include_usage"))
        # temperature 0 is greedy; a positive one samples; none: the model's own defaults
        options = SamplingOptions.model_defaults(
            defaults, max_new_tokens=max_tokens or min(config.max_tokens, context),
            do_sample=None if temperature is None else temperature > 0,
            temperature=temperature or None, top_p=top_p, seed=seed)
        return cls(options, options.max_new_tokens, explicit, stop, stream, include_usage)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(payload: dict, name: str, low: float, high: float) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise RequestError(f"{name} must be a number in [{low:g}, {high:g}]", param=name)
    return float(value)


class Reply:
    """The OpenAI response objects for one completion."""

    def __init__(self, model: str, prompt_tokens: int):
        self.id, self.model = f"chatcmpl-{uuid.uuid4().hex}", model
        self.created, self.prompt_tokens = int(time.time()), prompt_tokens

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def completion(self, text: str, finish_reason: str, completion_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "usage": self.usage(completion_tokens),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason, "logprobs": None}]}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                     "logprobs": None}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": choices}
        if usage:
            body["usage"] = usage
        return json.dumps(body)


async def _next(events: asyncio.Queue, request: Request, job: Job) -> Event | None:
    """The next event, or None once the client has gone (its generation is then cancelled).
    The connection is checked at most every 0.25 s, and also while events keep coming."""
    while True:
        if time.monotonic() - job.checked >= 0.25:
            job.checked = time.monotonic()
            if await request.is_disconnected():
                job.cancelled.set()
                return None
        try:
            return await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            continue


async def _collect(events: asyncio.Queue, request: Request, job: Job, reply: Reply) -> dict:
    pieces = []
    while True:
        event = await _next(events, request, job)
        if event is None:
            return {}
        if event.kind == "text":
            pieces.append(event.text)
        elif event.kind == "end":
            return reply.completion("".join(pieces), event.finish_reason, event.completion_tokens)
        elif event.kind == "error":
            raise RequestError(event.text, event.status)


async def _sse(events: asyncio.Queue, job: Job, reply: Reply, include_usage: bool):
    """SSE chunks ending in ``[DONE]``; a client that goes away cancels the generation."""
    try:
        yield {"data": reply.chunk({"role": "assistant", "content": ""})}
        while True:
            event = await events.get()
            if event.kind == "text":
                yield {"data": reply.chunk({"content": event.text})}
            elif event.kind == "end":
                yield {"data": reply.chunk({}, event.finish_reason)}
                if include_usage:
                    yield {"data": reply.chunk({}, usage=reply.usage(event.completion_tokens))}
                break
            elif event.kind == "error":
                yield {"data": json.dumps({"error": {"message": event.text, "type": "server_error",
                                                     "param": None, "code": None}})}
                break
        yield {"data": "[DONE]"}
    finally:
        job.cancelled.set()  # a no-op when finished; stops decoding when the client left
