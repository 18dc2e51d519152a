"""The HTTP routes of `tunelab serve`, in OpenAI's shapes: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (both with `stream: true` as server-sent events), `POST /v1/classify`, `GET /health`.

Requests are checked against the server's Limits; anything the client can fix is a 4xx in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. An unexpected failure is a 500 whose message is an id — the
exception goes to the server's log under it, never to the client. With an API key, every route but /health needs
`Authorization: Bearer KEY` (compared in constant time). A request whose Host header is not one the server answers
to (guard.HostPolicy: loopback, the bound address, --allow-host) is refused with a 400 before any of that.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from typing import ClassVar, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from ..errors import TunelabError
from ..generation.continuous import Busy
from .batching import ClassifyJob, GenerateJob
from .guard import BodyLimit, HostCheck, HostPolicy, keys_match
from .limits import Limits

API_KEY_ENV = "TUNELAB_API_KEY"
log = logging.getLogger("tunelab.serve")
router = APIRouter()


class ClientError(Exception):
    """A request the client can fix: becomes a 4xx in OpenAI's error shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type


# ----------------------------------------------------------------------------------------------- requests
# OpenAI's request bodies: the fields tunelab acts on are validated; the others the official client may send
# (user, logit_bias, ...) are accepted and ignored.

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str


class _Generation(_Request):
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None  # accepted; batched sampling cannot honour a per-request seed
    ignore_eos: bool = False  # vLLM's extra parameter: always max_tokens tokens (benchmarks force a length)


class CompletionRequest(_Generation):
    prompt: str | list[str]
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    default_max_tokens: ClassVar[int] = 256

    @model_validator(mode="after")
    def _newer_name(self):
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class ClassifyRequest(_Request):
    input: str | list[str]


# ----------------------------------------------------------------------------------------------- the app

def create_app(runs: list, limits: Limits | None = None, api_key: str | None = None, registry=None,
               hosts: HostPolicy | None = None) -> FastAPI:
    """The FastAPI app serving `runs` (paths of finished runs); `registry`: already loaded ones. `api_key`: the key
    every route but /health needs (default: $TUNELAB_API_KEY, if set). `hosts`: the Host names it answers
    (default: loopback only)."""
    from .registry import Registry

    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    limits = limits or Limits()
    app = FastAPI(title="tunelab", version=_version())
    app.state.registry = registry or Registry(runs, limits)
    app.state.limits, app.state.started = limits, int(time.time())
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer ") or not keys_match(given.removeprefix("Bearer "), api_key):
                return error(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                             code="invalid_api_key")
        return await call_next(request)

    app.add_exception_handler(ClientError, lambda r, e: error(e.status, e.message, e.type, e.param, e.code))
    app.add_exception_handler(Busy, lambda r, e: error(
        503, "the server is busy: too many requests are waiting for this model; retry shortly", "server_busy",
        code="queue_full", headers={"Retry-After": "1"}))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, lambda r, e: error(
        e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "invalid_request_error",
        code="request_too_large" if e.status_code == 413 else None))
    app.add_exception_handler(Exception, lambda r, e: error(
        500, internal_error(e, f"{r.method} {r.url.path}"), "server_error"))
    app.include_router(router)
    # outermost: a foreign Host is answered before the key check, the body limit or any route
    app.add_middleware(HostCheck, policy=hosts or HostPolicy(), refuse=lambda message: error(
        400, message, code="host_not_allowed"))
    return app


def error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def _invalid(request, exc: RequestValidationError):
    problems, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)  # the request field, not pydantic's union branch
        if e.get("type") == "json_invalid":
            problems.append(f"the request body is not valid JSON ({e.get('msg')})")
        else:
            problems.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return error(400, "; ".join(problems) or "invalid request", param=param)


def internal_error(exc: BaseException, where: str) -> str:
    """Log an unexpected failure with its traceback under a fresh id; the client gets the id, never the text."""
    eid = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s: %s: %s", eid, where, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return f"internal error (id {eid}); the server's log has the details"


# ----------------------------------------------------------------------------------------------- routes

@router.get("/health")
async def health(request: Request):
    registry = request.app.state.registry
    return {"status": "ok", "models": list(registry.models),
            "queued": {s.id: s.worker.pending for s in registry.models.values()}}


@router.get("/v1/models")
async def models(request: Request):
    started = request.app.state.started
    return {"object": "list", "data": [
        {"id": m.id, "object": "model", "created": started, "owned_by": "tunelab", "task": m.config.task,
         "method": m.config.method.name, "base_model": m.config.model.name, "shares_base_with": m.shared_with}
        for m in request.app.state.registry.models.values()]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    served = _model(request, body.model, "generate")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise ClientError("prompt is empty", 400, "prompt")
    if body.stream and len(prompts) != 1:
        raise ClientError("stream: true takes a single prompt", 400, "prompt")
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text, finish, first):
        return {"id": rid, "object": "text_completion", "created": created, "model": served.id,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    def whole(done):
        return {"id": rid, "object": "text_completion", "created": created, "model": served.id,
                "choices": [{"index": i, "text": j.text, "finish_reason": j.finish_reason, "logprobs": None}
                            for i, j in enumerate(done)], "usage": _usage(done)}

    return await _generate(request, served, prompts, body, chunk, whole)


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request):
    served = _model(request, body.model, "generate")
    prompt = render_chat(served, [m.model_dump() for m in body.messages], request.app.state.limits)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    lead = {"stripped": False}

    def chunk(text, finish, first):
        if not lead["stripped"]:  # the reply is stripped of leading whitespace, as in non-streaming
            text = text.lstrip()
            lead["stripped"] = bool(text)
        delta = ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None else {}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def whole(done):
        (job,) = done
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text.strip()},
                             "finish_reason": job.finish_reason}], "usage": _usage(done)}

    return await _generate(request, served, [prompt], body, chunk, whole)


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request):
    served, limits = _model(request, body.model, "classify"), request.app.state.limits
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise ClientError("input is empty", 400, "input")
    if len(texts) > limits.max_classify_inputs:
        raise ClientError(f"{len(texts)} inputs in one request; the limit is {limits.max_classify_inputs}", 400,
                          "input", "too_many_inputs")
    for i, text in enumerate(texts):
        _check_text(limits, text, "input")
        if not text.strip():
            where = "input" if isinstance(body.input, str) else f"input[{i}]"
            raise ClientError(f"{where} is empty: there is no text to classify", 400, "input", "empty_input")
    job = ClassifyJob(texts)
    served.worker.submit(job.units(served.config.model.max_length))  # one request: its texts share the turns
    probs = await asyncio.wrap_future(job.future)
    return {"object": "list", "model": served.id, "data": [
        {"index": i, "label": max(p, key=p.get), "probabilities": p} for i, p in enumerate(probs)]}


# ----------------------------------------------------------------------------------------------- helpers

def _model(request: Request, name: str, kind: str):
    registry = request.app.state.registry
    served = registry.models.get(name)
    if served is None:
        raise ClientError(f"the model `{name}` does not exist; served: {', '.join(registry.models)}", 404, "model",
                          "model_not_found")
    if served.kind != kind:
        use = "/v1/classify" if served.kind == "classify" else "/v1/completions or /v1/chat/completions"
        raise ClientError(f"`{name}` is a {served.kind} model; use {use}", 400, "model", "wrong_endpoint")
    return served


def _check_text(limits: Limits, text: str, param: str) -> None:
    if len(text) > limits.max_input_chars:
        raise ClientError(f"{param} is {len(text)} characters; the limit is {limits.max_input_chars}", 400, param,
                          "input_too_long")


async def _generate(request: Request, served, prompts: list[str], body, chunk, whole):
    """Queue one job per prompt; answer with server-sent `chunk`s when streaming, else `whole(finished jobs)`."""
    loop = asyncio.get_running_loop()
    stream = asyncio.Queue() if body.stream else None
    jobs = _jobs(served, prompts, body, request.app.state.limits, loop, stream)
    served.worker.submit(jobs)  # one request: its prompts share the round-robin turns
    if stream is None:
        return whole(await _finished(request, jobs))
    return _sse(_stream_events(jobs[0], stream, chunk))


async def _finished(request: Request, jobs: list[GenerateJob]) -> list[GenerateJob]:
    """The jobs once done; if the client goes away first, they are cancelled (they leave their batch at the next
    step) and the request ends."""
    waiting = [asyncio.wrap_future(j.future) for j in jobs]
    while True:
        done, _ = await asyncio.wait(waiting, timeout=0.25)
        if len(done) == len(waiting):
            return [f.result() for f in waiting]
        if await request.is_disconnected():
            for j in jobs:
                j.cancel()
            raise asyncio.CancelledError("the client disconnected")


def _jobs(served, prompts: list[str], body, limits: Limits, loop, stream_queue) -> list[GenerateJob]:
    max_tokens = body.max_tokens if body.max_tokens is not None else body.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ClientError(f"max_tokens must be between 1 and {limits.max_tokens}; got {max_tokens}", 400,
                          "max_tokens", "invalid_value")
    if body.n not in (None, 1):
        raise ClientError("n must be 1 (one completion per request)", 400, "n", "invalid_value")
    budget = limits.max_input_tokens or served.context - max_tokens
    tokenizer = served.engine.tokenizer
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    jobs = []
    for prompt in prompts:
        _check_text(limits, prompt, "prompt")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:  # as OpenAI does: an empty prompt is generated from the start-of-text token
            prompt = tokenizer.bos_token or tokenizer.eos_token or ""
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if not ids:
                raise ClientError("the prompt is empty and this model's tokenizer has no start-of-text token to begin "
                                  "from", 400, "prompt", "empty_prompt")
        if (n := len(ids)) > budget:
            raise ClientError(f"the prompt is {n} tokens; with max_tokens {max_tokens} the limit is {budget} (context "
                              f"{served.context})", 400, "prompt", "context_length_exceeded")
        jobs.append(GenerateJob(prompt, served.adapter, max_tokens, body.temperature, body.top_p,
                                [x for x in stop if x], stream_queue, loop, prompt_ids=ids,
                                ignore_eos=body.ignore_eos))
    return jobs


def _usage(jobs: list[GenerateJob]) -> dict:
    p, c = sum(j.prompt_tokens for j in jobs), sum(len(j.tokens) for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(events):
    async def body():
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_events(job: GenerateJob, q: asyncio.Queue, make_chunk):
    """The job's chunks as they come; a client that goes away mid-stream (the response is closed) cancels it."""
    first = True
    try:
        while True:
            item = await q.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                yield {"error": {"message": internal_error(item, "streamed generation"), "type": "server_error"}}
                return
            yield make_chunk(item, None, first)
            first = False
        yield make_chunk("", job.finish_reason, first)
    finally:
        if job.finish_reason is None:
            job.cancel()


def render_chat(served, messages: list[dict], limits: Limits) -> str:
    """The prompt for the assistant's next turn, rendered as the run renders prompts (`tunelab generate`)."""
    from ..data.conversations import Conversation

    engine = served.engine
    if not messages or messages[-1]["role"] != "user":
        raise ClientError("messages must end with a user message", 400, "messages")
    for m in messages:
        _check_text(limits, m["content"], "messages")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    if system is None and len(rest) == 1:
        try:  # exactly what `tunelab generate --prompt` renders (with the run's fixed instruction, if any)
            return engine.render(rest[0]["content"])
        except TunelabError as exc:
            raise ClientError(str(exc), 400, "messages") from exc
    roles = [m["role"] for m in rest]
    if roles != ["user", "assistant"] * (len(rest) // 2) + ["user"]:
        raise ClientError("after an optional system message, messages must alternate user / assistant and end "
                          "with user", 400, "messages")
    fmt = engine.prompt_format()
    if fmt != "chat":
        raise ClientError(f"`{served.id}` was trained on {fmt} prompts, which hold one user message and no system "
                          f"message; conversations need a run with data.prompt_format chat", 400, "messages")
    turns = [{"instruction": rest[i]["content"], "input": None,
              "response": rest[i + 1]["content"] if i + 1 < len(rest) else ""} for i in range(0, len(rest), 2)]
    return engine.render_conversation(Conversation(turns, system=system))  # an icl run adds its demonstrations


def _version() -> str:
    from ..version import __version__

    return __version__
