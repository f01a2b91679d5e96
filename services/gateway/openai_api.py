"""The OpenAI-compatible HTTP API: a thin edge over the gateway's one request flow (``Frontend``).

``POST /v1/chat/completions``, ``POST /v1/completions`` (server-sent events with ``stream``, ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Bodies are validated by pydantic models here and
the request's fields by the same ``RequestBuilder`` as the gRPC API, so both doors admit the same requests
and produce the same tokens. Errors use OpenAI's JSON shape with the HTTP status of the gRPC code
(``HTTP_STATUS``); a streamed response that fails after its first token ends with an ``error`` event.

Each generation runs in a task of its own (``_Generation``): a client that disconnects, before or during
its stream, cancels it, and the router's cancellation frees the request's KV on its instances.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.auth import ApiKeys
from pdserve.errors import Cancelled, InvalidArgument, PdserveError, Unauthenticated
from services.gateway.requests import FieldNames, Frontend, RequestSpec, UnknownModel
from services.gateway.router import GatewayRequest, OutputChunk

log = logging.getLogger(__name__)

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
_ERROR_TYPE = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               411: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable", 504: "timeout"}
_MASK64 = (1 << 64) - 1


class _Body(BaseModel):
    """Fields both endpoints take. Fields no one here knows are ignored, as OpenAI-compatible servers do;
    known ones pdserve cannot honour are refused (``_unsupported``) rather than silently dropped."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    user: str | None = None
    top_k: int | None = None  # extension: 0 or -1 disables
    ignore_eos: bool = False  # extension
    logprobs: bool | int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Body):
    messages: list[_Message]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def _unsupported(body: _Body) -> None:
    """400 for what a client asked that pdserve does not do, naming the field."""
    checks = [("n", body.n not in (None, 1), "only n=1 is supported"),
              ("logprobs", bool(body.logprobs), "log probabilities are not supported"),
              ("presence_penalty", bool(body.presence_penalty), "penalties are not supported"),
              ("frequency_penalty", bool(body.frequency_penalty), "penalties are not supported"),
              ("logit_bias", bool(body.logit_bias), "logit_bias is not supported")]
    if isinstance(body, ChatRequest):
        checks += [("top_logprobs", bool(body.top_logprobs), "log probabilities are not supported"),
                   ("tools", bool(body.tools), "tool calls are not supported"),
                   ("response_format", (body.response_format or {}).get("type", "text") != "text",
                    "only text responses are supported")]
    else:
        checks += [("echo", body.echo, "echo is not supported"), ("suffix", bool(body.suffix), "suffix is not supported"),
                   ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported")]
    for name, bad, why in checks:
        if bad:
            raise InvalidArgument(f"{name}: {why}")
    if body.stream_options is not None and not body.stream:
        raise InvalidArgument("stream_options: only with stream=true")


def _spec(body: _Body, request_id: str, **prompt) -> tuple[RequestSpec, FieldNames]:
    _unsupported(body)
    if body.seed is not None and not -(1 << 63) <= body.seed <= _MASK64:
        raise InvalidArgument(f"seed: must be a 64-bit integer, got {body.seed}")
    max_tokens, max_name = body.max_tokens, "max_tokens"
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        max_tokens, max_name = body.max_completion_tokens, "max_completion_tokens"
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    spec = RequestSpec(model=body.model, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                       top_k=max(body.top_k or 0, 0), seed=None if body.seed is None else body.seed & _MASK64,
                       stop=stop, ignore_eos=body.ignore_eos, request_id=request_id, **prompt)
    return spec, FieldNames(max_tokens=max_name)


def chat_spec(body: ChatRequest, request_id: str = "") -> tuple[RequestSpec, FieldNames]:
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content or ""
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgument(f"messages[{i}].content[{j}]: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return _spec(body, request_id, messages=messages)


def completion_spec(body: CompletionRequest, request_id: str = "") -> tuple[RequestSpec, FieldNames]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidArgument(f"prompt: one prompt per request, got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, list):
        return _spec(body, request_id, token_ids=prompt)
    return _spec(body, request_id, prompt=prompt)


def error_body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"), "param": None,
                      "code": code}}


def error_response(exc: PdserveError) -> JSONResponse:
    status = 404 if isinstance(exc, UnknownModel) else HTTP_STATUS.get(exc.status, 500)
    code = "model_not_found" if isinstance(exc, UnknownModel) else exc.status.lower()
    headers = {}
    retry_after = getattr(exc, "retry_after_ms", None)
    if status == 429:
        headers["Retry-After"] = str(max(1, math.ceil((retry_after or 1000) / 1000)))
    return JSONResponse(error_body(status, str(exc), code), status_code=status, headers=headers)


class _Generation:
    """One request's chunks, produced by a task of its own into a queue; a disconnect of the client (or
    ``close``) cancels the task, which cancels the request everywhere it runs."""

    _END = object()

    def __init__(self, frontend: Frontend, req: GatewayRequest, http: Request) -> None:
        self.req = req
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._produce(frontend), name=f"http-{req.request_id}")
        self._watch = asyncio.create_task(self._watch_disconnect(http))

    async def _produce(self, frontend: Frontend) -> None:
        try:
            async for chunk in frontend.stream(self.req):
                self._queue.put_nowait(chunk)
            self._queue.put_nowait(self._END)
        except BaseException as exc:  # noqa: BLE001 - the reader raises it
            self._queue.put_nowait(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _watch_disconnect(self, http: Request) -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass
        if not self._task.done():
            log.info("request_id=%s: client disconnected; cancelling", self.req.request_id)
            self._task.cancel()

    async def next(self) -> OutputChunk | None:
        """The next chunk; None after the last; raises the request's error."""
        item = await self._queue.get()
        if item is self._END:
            return None
        if isinstance(item, asyncio.CancelledError):
            raise Cancelled("the client disconnected")
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        for task in (self._task, self._watch):
            task.cancel()
        await asyncio.gather(self._task, self._watch, return_exceptions=True)


def _usage(req: GatewayRequest, last: OutputChunk) -> dict:
    prompt, completion = len(req.prompt_ids), last.completion_tokens
    cached = last.timings.cached_tokens if last.timings is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class OpenAIApi:
    """Builds the FastAPI app over a ``Frontend``; ``ready()`` says whether the cluster can serve."""

    def __init__(self, frontend: Frontend, keys: ApiKeys, ready, max_body_bytes: int) -> None:
        self.frontend = frontend
        self.keys = keys
        self.ready = ready
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    def app(self) -> FastAPI:
        app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(PdserveError, lambda _, exc: error_response(exc))
        app.add_exception_handler(RequestValidationError, lambda _, exc: JSONResponse(
            error_body(400, _validation_message(exc)), status_code=400))
        app.add_exception_handler(StarletteHTTPException, lambda _, exc: JSONResponse(
            error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers))
        app.add_exception_handler(Exception, self._internal)
        authorized = [Depends(self._authorize)]
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=authorized)
        app.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"], dependencies=authorized)
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"], dependencies=authorized)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=authorized)
        return _BodyLimit(app, self.max_body_bytes)

    @staticmethod
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        log.error("HTTP API: unexpected %s", type(exc).__name__, exc_info=exc)
        return JSONResponse(error_body(500, "internal error"), status_code=500)

    async def _authorize(self, request: Request) -> None:
        if not self.keys.allows(request.headers.get("authorization")):
            raise Unauthenticated("missing or invalid API key (send 'Authorization: Bearer KEY')")

    async def health(self) -> JSONResponse:
        ok = self.ready()
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    def _model_card(self) -> dict:
        info = self.frontend.info
        return {"id": info.name, "object": "model", "created": self.created, "owned_by": "pdserve",
                "max_model_len": info.context_length}

    async def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str) -> dict:
        self.frontend.requests.check_model(model_id)
        return self._model_card()

    async def chat(self, body: ChatRequest, request: Request):
        spec, names = chat_spec(body, request.headers.get("x-request-id", ""))
        return await self._respond(spec, names, body, request, chat=True)

    async def completions(self, body: CompletionRequest, request: Request):
        spec, names = completion_spec(body, request.headers.get("x-request-id", ""))
        return await self._respond(spec, names, body, request, chat=False)

    async def _respond(self, spec: RequestSpec, names: FieldNames, body: _Body, request: Request, chat: bool):
        req = await self.frontend.start(spec, names)
        run = _Generation(self.frontend, req, request)
        kind = "chat.completion" if chat else "text_completion"
        base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{req.request_id}", "object": kind,
                "created": int(time.time()), "model": self.frontend.info.name}
        headers = {"x-request-id": req.request_id}
        try:
            first = await run.next()  # failures before the first token get their own status
        except BaseException:
            await run.close()
            raise
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            events = _sse(run, first, base, chat, usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        try:
            text, last = [], first
            chunk = first
            while chunk is not None:
                text.append(chunk.text)
                last = chunk
                chunk = await run.next()
        finally:
            await run.close()
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return JSONResponse({**base, "choices": [choice], "usage": _usage(req, last)},
                            headers=headers)


async def _sse(run: _Generation, first: OutputChunk | None, base: dict, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """The stream's events; ``run`` is closed (the request cancelled if unfinished) however it ends."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if include_usage else {}

    def event(choice: dict) -> str:
        return "data: " + json.dumps({**base, "object": kind, "choices": [choice], **extra}) + "\n\n"

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    try:
        if chat:
            yield event(choice(None, None, role=True))
        chunk, last = first, first
        while chunk is not None:
            if chunk.token_ids:  # one event per step, even while the text of a character is held back
                yield event(choice(chunk.text, None))
            if chunk.finish_reason is not None:
                yield event(choice(None, chunk.finish_reason))
            last = chunk
            chunk = await run.next()
        if include_usage:
            yield "data: " + json.dumps({**base, "object": kind, "choices": [],
                                         "usage": _usage(run.req, last)}) + "\n\n"
    except PdserveError as exc:  # after the first token: the status is sent already, so the body says it
        status = HTTP_STATUS.get(exc.status, 500)
        yield "data: " + json.dumps(error_body(status, str(exc), exc.status.lower())) + "\n\n"
    finally:
        await run.close()
    yield "data: [DONE]\n\n"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


class _BodyLimit:
    """ASGI middleware: a request body must declare its length (411 otherwise: h11 then holds the body to
    it) and stay within ``limit`` bytes (413), checked before any of it is read."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope.get("headers") or ()).get(b"content-length")
            if length is None or not length.isdigit():
                return await self._refuse(send, 411, "send the body with a Content-Length")
            if int(length) > self.limit:
                return await self._refuse(send, 413, f"request body over {self.limit} bytes")
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(send, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
