"""`tunelab serve RUN [RUN ...]`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for finished runs.

- `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (with `stream: true` as server-sent
  events) for generative runs (sft, causal_lm, dpo, rl); `POST /v1/classify` for classification runs;
  `GET /health`. The `model` of a request is the run's id: its directory name.
- PEFT adapter runs over the same base model share **one** copy of the base weights: the first adapter is loaded
  with its base, the others are added to it (`PeftModel.load_adapter`), and each batch switches to its
  adapter — LoRA adapters are even mixed in one batch (peft's `adapter_names`).
- Dynamic batching: each model has a worker thread that takes the first waiting request, collects more for
  `batch_wait_ms` (up to `max_batch`), and runs them as one forward pass / one `generate` call. Requests past
  `max_queue` waiting ones get 503 with Retry-After.
- Errors are JSON in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx status for
  anything the client can fix; an unexpected failure is a 500 for that request, never a dead server.
- An API key (`--api-key` or TUNELAB_API_KEY) makes every /v1 route require `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import RunError, TunelabError
from .merge import CAUSAL

API_KEY_ENV = "TUNELAB_API_KEY"


@dataclass
class Limits:
    max_batch: int = 16
    """Most requests (classify: texts) run together in one forward pass; 1 turns batching off."""
    batch_wait_ms: float = 10.0
    """How long a worker waits for more requests after the first one arrives."""
    max_queue: int = 256
    """Requests waiting per model beyond which the server answers 503."""
    max_tokens: int = 512
    """Largest max_tokens a request may ask for."""
    max_input_tokens: int | None = None
    """Longest prompt in tokens (default: the model's context minus max_tokens requested)."""
    max_classify_inputs: int = 256
    """Most texts in one /v1/classify request."""
    max_input_chars: int = 100_000
    """Longest single text / prompt in characters (rejected before tokenizing)."""
    max_body_bytes: int = 16 * 2**20
    """Largest request body; a larger one is refused with 413 before it is read (by its Content-Length, or as soon
    as that many bytes have arrived)."""
    max_batch_tokens: int = 16_384
    """Most prompt tokens in one generation batch (a long prompt runs with fewer others)."""
    max_classify_tokens: int = 2_048
    """Most tokens (estimated from the characters, at most model.max_length a text) in one classify batch: it
    bounds how long a batch takes, so a small request behind large ones waits one short batch."""


class Busy(Exception):
    """The model's queue is full."""


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


# ----------------------------------------------------------------------------------------------- batching


class Worker:
    """One thread per model: runs the waiting work in batches. A request's work is a list of units (a prompt, or one
    text to classify); each batch takes units round-robin across the waiting requests — at most `max_units` units
    and `max_tokens` tokens — so one huge request cannot hold back the small ones behind it: they ride in the next
    batch, which is short."""

    def __init__(self, name: str, run_batch: Callable[[list], None], limits: Limits, max_units: int | None = None,
                 max_tokens: int | None = None):
        self.name, self.run_batch, self.limits = name, run_batch, limits
        self.max_units = max(1, max_units or limits.max_batch)
        self.max_tokens = max_tokens or limits.max_batch_tokens
        self.requests: deque[deque] = deque()  # per request: its units not yet taken
        self.cond = threading.Condition()
        self.batches = self.batched_jobs = 0
        self.thread = threading.Thread(target=self._loop, name=f"tunelab-serve-{name}", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        """Requests with work still waiting."""
        return len(self.requests)

    def submit(self, units: list) -> None:
        """Queue one request's units; Busy when `max_queue` requests are already waiting."""
        if not units:
            return
        with self.cond:
            if len(self.requests) >= self.limits.max_queue:
                raise Busy()
            self.requests.append(deque(units))
            self.cond.notify()

    def _waiting(self) -> int:
        return sum(len(q) for q in self.requests)

    def _collect(self) -> list:
        with self.cond:
            while not self.requests:
                self.cond.wait()
            deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
            while self._waiting() < self.max_units and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            batch, tokens = [], 0
            while self.requests and len(batch) < self.max_units:
                q = self.requests.popleft()
                cost = getattr(q[0], "cost", 0)
                if batch and tokens + cost > self.max_tokens:
                    self.requests.appendleft(q)
                    break
                batch.append(q.popleft())
                tokens += cost
                if q:
                    self.requests.append(q)  # its next unit waits for the other requests' turn
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            self.batches += 1
            self.batched_jobs += len(batch)
            try:
                self.run_batch(batch)
            except BaseException as exc:  # a failed batch fails its requests, not the server
                for unit in batch:
                    unit.fail(exc)


class Job:
    """A request in a worker's queue; its result arrives through `future` (and `on_text` when streaming)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.future: Future = Future()
        self.loop = loop

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class GenerateJob(Job):
    def __init__(self, prompt: str, adapter: str | None, max_tokens: int, temperature: float, top_p: float,
                 stop: list[str], stream_queue: asyncio.Queue | None = None, loop=None):
        super().__init__(loop)
        self.prompt, self.adapter, self.max_tokens = prompt, adapter, max_tokens
        self.temperature, self.top_p, self.stop = temperature, top_p, stop
        self.stream_queue = stream_queue
        self.cost = 0  # prompt tokens, for the batch token budget
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None
        self.prompt_tokens = 0

    @property
    def sampling(self) -> tuple:
        return (self.temperature > 0, round(self.temperature, 6), round(self.top_p, 6))

    def _emit(self, delta: str) -> None:
        if delta and self.stream_queue is not None:
            self.loop.call_soon_threadsafe(self.stream_queue.put_nowait, delta)

    def add(self, token: int, tokenizer) -> None:
        """One generated token (not EOS): update the text, stream what is safe to send."""
        self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.text = text
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                self.text = text[:at]
                self.finish("stop")
                return
        if len(self.tokens) >= self.max_tokens:
            self.finish("length")
            return
        hold = max((len(s) - 1 for s in self.stop), default=0)  # a stop string may be starting at the end
        upto = max(len(text) - hold, self.sent)
        self._emit(text[self.sent:upto])
        self.sent = upto

    def finish(self, reason: str) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self._emit(self.text[self.sent:])
        self.sent = len(self.text)
        if self.stream_queue is not None:
            self.loop.call_soon_threadsafe(self.stream_queue.put_nowait, None)
        self.future.set_result(self)

    def fail(self, exc: BaseException) -> None:
        super().fail(exc)
        if self.stream_queue is not None and self.finish_reason is None:
            self.finish_reason = "error"
            self.loop.call_soon_threadsafe(self.stream_queue.put_nowait, exc)


class ClassifyJob(Job):
    """One /v1/classify request; each of its texts is a unit of work of its own."""

    def __init__(self, texts: list[str]):
        super().__init__()
        self.texts = texts
        self.results: list = [None] * len(texts)
        self.left = len(texts)
        self.lock = threading.Lock()

    def units(self, max_length: int) -> list["ClassifyUnit"]:
        return [ClassifyUnit(self, i, min(max_length, len(t) // 3 + 2)) for i, t in enumerate(self.texts)]

    def done(self, index: int, probs: dict) -> None:
        with self.lock:
            self.results[index] = probs
            self.left -= 1
            finished = self.left == 0
        if finished and not self.future.done():
            self.future.set_result(self.results)


@dataclass
class ClassifyUnit:
    job: ClassifyJob
    index: int
    cost: int = 0
    """Estimated tokens (characters / 3, at most the model's max_length), for the batch token budget."""

    @property
    def text(self) -> str:
        return self.job.texts[self.index]

    def fail(self, exc: BaseException) -> None:
        self.job.fail(exc)


class _Streamer:
    """transformers' streamer protocol over a batch: each generated column of tokens goes to its job."""

    def __init__(self, jobs: list[GenerateJob], tokenizer, eos: set[int]):
        self.jobs, self.tokenizer, self.eos, self.prompt_seen = jobs, tokenizer, eos, False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        column = value.reshape(-1).tolist()
        for job, token in zip(self.jobs, column):
            if job.finish_reason is not None:
                continue
            if token in self.eos:
                job.finish("stop")
            else:
                job.add(token, self.tokenizer)

    def end(self) -> None:
        for job in self.jobs:
            job.finish("length")

    def all_done(self, input_ids, scores, **kwargs):  # a StoppingCriteria: stop once every job has finished
        done = all(j.finish_reason is not None for j in self.jobs)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# ----------------------------------------------------------------------------------------------- models


@dataclass
class Served:
    """One model id: a run, how to reach its weights, and the worker that runs it."""
    id: str
    run: Path
    config: Any
    kind: str  # "generate" | "classify"
    engine: Any  # Generator or Classifier
    adapter: str | None = None  # the PEFT adapter name inside a shared base model
    worker: Worker | None = None
    shared_with: list[str] = field(default_factory=list)

    @property
    def context(self) -> int:
        model_config = self.engine.model.config
        return int(getattr(model_config, "max_position_embeddings", 0) or 2048)


def _param_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().split("\n"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Registry:
    """The loaded runs, by model id, with one worker per underlying model object."""

    def __init__(self, runs: list, limits: Limits):
        from .runs import open_finished

        self.limits = limits
        self.models: dict[str, Served] = {}
        self.lines: list[str] = []
        opened = [open_finished(r) for r in runs]
        if not opened:
            raise TunelabError("give at least one finished run to serve")
        ids = [p.name for p, _ in opened]
        for name in {i for i in ids if ids.count(i) > 1}:
            clash = [str(p) for p, _ in opened if p.name == name]
            raise RunError(f"two runs would be served as model `{name}`: {', '.join(clash)}; give them distinct "
                           f"directory names")
        groups: dict[str, list] = {}
        for path, config in opened:
            if config.task == "classify":
                self._classifier(path, config)
            elif config.task in CAUSAL:
                shared = (path / "model" / "adapter_config.json").exists()
                key = f"{config.model.name}|{config.method.name == 'qlora'}"  # a 4-bit base is another model
                groups.setdefault(key if shared else f"{path}|alone", []).append((path, config))
            else:
                raise RunError(f"{path} is a `{config.task}` run; serve takes classify runs (/v1/classify) and "
                               f"decoder-only generative runs ({', '.join(CAUSAL)})")
        for members in groups.values():
            self._generators(members)
        self.lines.append(f"process memory (RSS) after loading: {_rss_mb():.0f} MB")

    def _classifier(self, path: Path, config) -> None:
        from .tasks.classify import Classifier

        engine = Classifier.from_saved(path, config)
        served = Served(path.name, path, config, "classify", engine)

        def run(units: list[ClassifyUnit]) -> None:
            units = sorted(units, key=lambda u: u.cost)  # similar lengths side by side: less padding
            for unit, probs in zip(units, engine.predict_proba([u.text for u in units])):
                unit.job.done(unit.index, probs)

        # texts are short work next to a generation: several per requested batch slot, within a token budget
        served.worker = Worker(path.name, run, self.limits, max_units=self.limits.max_batch * 4,
                               max_tokens=self.limits.max_classify_tokens)
        self.models[served.id] = served
        self.lines.append(f"{served.id}: classifier ({config.method.name} on {config.model.name}), "
                          f"{_param_bytes(engine.model) / 2**20:.1f} MB of weights")

    def _generators(self, members: list) -> None:
        from .tasks.generate import Generator

        path, config = members[0]
        engine = Generator.from_saved(path, config)
        if engine.encoder_decoder:
            raise RunError(f"{path}: serve handles decoder-only models")
        adapters = {}
        if (path / "model" / "adapter_config.json").exists():
            model = engine.model
            first = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
            adapters[path.name] = first
            for other, _ in members[1:]:
                model.load_adapter(str(other / "model"), adapter_name=other.name)
                adapters[other.name] = other.name
        mixed = self._mixable(engine.model) if adapters else False
        base_bytes = _param_bytes(engine.model)
        worker = Worker("+".join(p.name for p, _ in members), lambda jobs: self._generate(engine, jobs, mixed),
                        self.limits)
        names = [p.name for p, _ in members]
        for p, c in members:
            view = copy.copy(engine)  # the shared model and tokenizer, with this run's prompt settings
            view.config = c
            self.models[p.name] = Served(p.name, p, c, "generate", view, adapter=adapters.get(p.name),
                                         worker=worker, shared_with=[n for n in names if n != p.name])
        if adapters:
            sizes = {name: sum(t.numel() * t.element_size() for n, t in engine.model.named_parameters()
                               if f".{adapter}." in n) for name, adapter in adapters.items()}
            base = base_bytes - sum(sizes.values())
            self.lines.append(f"{config.model.name}: one copy of the base model ({base / 2**20:.1f} MB) shared by "
                              f"{len(members)} adapter run(s): "
                              + ", ".join(f"{n} {b / 2**20:.1f} MB" for n, b in sizes.items())
                              + (f" — {(len(members) - 1) * base / 2**20:.0f} MB less than a copy each"
                                 if len(members) > 1 else "") + ("; mixed-adapter batches" if mixed else ""))
        else:
            self.lines.append(f"{path.name}: {config.method.name} model on {config.model.name}, "
                              f"{base_bytes / 2**20:.1f} MB of weights")

    @staticmethod
    def _mixable(model) -> bool:
        """peft runs several LoRA adapters in one batch (`adapter_names`), but not DoRA or other adapter types."""
        configs = getattr(model, "peft_config", {})
        return bool(configs) and all(getattr(c, "peft_type", None) is not None and c.peft_type.value == "LORA"
                                     and not getattr(c, "use_dora", False) for c in configs.values())

    @staticmethod
    @torch.inference_mode()
    def _generate(engine, jobs: list[GenerateJob], mixed: bool) -> None:
        from transformers import StoppingCriteriaList

        tokenizer, model = engine.tokenizer, engine.model
        groups: dict[tuple, list[GenerateJob]] = {}
        for job in jobs:  # one generate call per sampling setting (and per adapter unless they mix)
            groups.setdefault(job.sampling + (() if mixed else (job.adapter,)), []).append(job)
        eos = tokenizer.eos_token_id
        eos_set = {eos} if isinstance(eos, int) else set(eos or [])
        for group in groups.values():
            try:
                enc = tokenizer([j.prompt for j in group], return_tensors="pt", padding=True,
                                add_special_tokens=True).to(model.device)
                enc.pop("token_type_ids", None)
                for j, n in zip(group, enc["attention_mask"].sum(1).tolist()):
                    j.prompt_tokens = int(n)
                streamer = _Streamer(group, tokenizer, eos_set)
                first = group[0]
                kwargs = {"max_new_tokens": max(j.max_tokens for j in group), "do_sample": first.temperature > 0,
                          "pad_token_id": tokenizer.pad_token_id, "eos_token_id": eos, "streamer": streamer,
                          "stopping_criteria": StoppingCriteriaList([streamer.all_done])}
                if first.temperature > 0:
                    kwargs.update(temperature=first.temperature, top_p=first.top_p)
                if mixed:
                    kwargs["adapter_names"] = [j.adapter for j in group]
                    model.generate(**enc, **kwargs)
                elif group[0].adapter is not None:
                    model.set_adapter(group[0].adapter)
                    model.generate(**enc, **kwargs)
                else:
                    model.generate(**enc, **kwargs)
            except BaseException as exc:
                for j in group:
                    j.fail(exc)


# ----------------------------------------------------------------------------------------------- the app


def create_app(runs: list, limits: Limits | None = None, api_key: str | None = None, registry=None):
    """The FastAPI app serving `runs` (paths of finished runs)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    registry = registry or Registry(runs, limits)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    app = FastAPI(title="tunelab", version=_version())
    app.state.registry, app.state.limits = registry, limits
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    started = int(time.time())

    def error(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
        return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                            status_code=status, headers=headers)

    @app.exception_handler(ClientError)
    async def _client_error(request, exc: ClientError):
        return error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(Busy)
    async def _busy(request, exc):
        return error(503, "the server is busy: too many requests are waiting for this model; retry shortly",
                     type="server_busy", code="queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        problems = []
        param = None
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            where = ".".join(loc)
            param = param or (loc[0] if loc else None)  # the request field, not pydantic's union branch
            if e.get("type") == "json_invalid":
                problems.append(f"the request body is not valid JSON ({e.get('msg')})")
            else:
                problems.append(f"{where or 'body'}: {e.get('msg')}")
        return error(400, "; ".join(problems) or "invalid request", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error(exc.status_code, str(exc.detail), type="not_found" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        return error(500, internal_error(exc, f"{request.method} {request.url.path}"), type="server_error")

    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        # with a key, every route but /health needs it — the API, and /docs and /openapi.json that describe it
        if expected is not None and request.url.path != "/health":
            header = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(header, expected):  # constant time: no timing hint of the key
                return error(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                             type="invalid_request_error", code="invalid_api_key")
        return await call_next(request)

    def model_of(name: str, kind: str) -> Served:
        served = registry.models.get(name)
        if served is None:
            raise ClientError(f"the model `{name}` does not exist; served: {', '.join(registry.models)}",
                              404, "model", "model_not_found")
        if served.kind != kind:
            use = "/v1/classify" if served.kind == "classify" else "/v1/completions or /v1/chat/completions"
            raise ClientError(f"`{name}` is a {served.kind} model; use {use}", 400, "model", "wrong_endpoint")
        return served

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(registry.models),
                "queued": {s.id: s.worker.pending for s in registry.models.values()}}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "created": started, "owned_by": "tunelab",
             "task": m.config.task, "method": m.config.method.name, "base_model": m.config.model.name,
             "shares_base_with": m.shared_with} for m in registry.models.values()]}

    def check_text(text: str, param: str) -> None:
        if len(text) > limits.max_input_chars:
            raise ClientError(f"{param} is {len(text)} characters; the limit is {limits.max_input_chars}", 400,
                              param, "input_too_long")

    def jobs_for(served: Served, prompts: list[str], body, loop, stream_queue=None) -> list[GenerateJob]:
        max_tokens = body.max_tokens if body.max_tokens is not None else body.default_max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise ClientError(f"max_tokens must be between 1 and {limits.max_tokens}; got {max_tokens}", 400,
                              "max_tokens", "invalid_value")
        if body.n not in (None, 1):
            raise ClientError("n must be 1 (one completion per request)", 400, "n", "invalid_value")
        budget = limits.max_input_tokens or served.context - max_tokens
        tokenizer = served.engine.tokenizer
        jobs = []
        for prompt in prompts:
            check_text(prompt, "prompt")
            n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
            if n == 0:  # as OpenAI does: an empty prompt is generated from the start-of-text token
                prompt = tokenizer.bos_token or tokenizer.eos_token or ""
                n = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
                if n == 0:
                    raise ClientError("the prompt is empty and this model's tokenizer has no start-of-text token to "
                                      "begin from", 400, "prompt", "empty_prompt")
            if n > budget:
                raise ClientError(f"the prompt is {n} tokens; with max_tokens {max_tokens} the limit is {budget} "
                                  f"(context {served.context})", 400, "prompt", "context_length_exceeded")
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            job = GenerateJob(prompt, served.adapter, max_tokens, body.temperature, body.top_p,
                              [x for x in stop if x], stream_queue, loop)
            job.cost = n
            jobs.append(job)
        return jobs

    async def wait(jobs: list[Job]) -> list:
        return [await asyncio.wrap_future(j.future) for j in jobs]

    def usage(jobs: list[GenerateJob]) -> dict:
        p, c = sum(j.prompt_tokens for j in jobs), sum(len(j.tokens) for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def submit(served: Served, units: list) -> None:
        served.worker.submit(units)  # one request: its units share the round-robin turns

    def sse(events):
        async def body():
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_events(job: GenerateJob, q: asyncio.Queue, make_chunk):
        first = True
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served = model_of(body.model, "generate")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ClientError("prompt is empty", 400, "prompt")
        loop = asyncio.get_running_loop()
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise ClientError("stream: true takes a single prompt", 400, "prompt")
            q: asyncio.Queue = asyncio.Queue()
            jobs = jobs_for(served, prompts, body, loop, q)
            submit(served, jobs)

            def chunk(text, finish, first):
                return {"id": rid, "object": "text_completion", "created": created, "model": served.id,
                        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
            return sse(stream_events(jobs[0], q, chunk))
        jobs = jobs_for(served, prompts, body, loop)
        submit(served, jobs)
        done = await wait(jobs)
        return {"id": rid, "object": "text_completion", "created": created, "model": served.id,
                "choices": [{"index": i, "text": j.text, "finish_reason": j.finish_reason, "logprobs": None}
                            for i, j in enumerate(done)], "usage": usage(done)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        served = model_of(body.model, "generate")
        prompt = _render_chat(served, [m.model_dump() for m in body.messages])
        loop = asyncio.get_running_loop()
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            q: asyncio.Queue = asyncio.Queue()
            jobs = jobs_for(served, [prompt], body, loop, q)
            submit(served, jobs)
            lead = {"stripped": False}

            def chunk(text, finish, first):
                if not lead["stripped"]:  # the reply is stripped of leading whitespace, as in non-streaming
                    text = text.lstrip()
                    lead["stripped"] = bool(text)
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) \
                    if finish is None else {}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.id,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return sse(stream_events(jobs[0], q, chunk))
        jobs = jobs_for(served, [prompt], body, loop)
        submit(served, jobs)
        (job,) = await wait(jobs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": served.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text.strip()},
                             "finish_reason": job.finish_reason}], "usage": usage([job])}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        served = model_of(body.model, "classify")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise ClientError("input is empty", 400, "input")
        if len(texts) > limits.max_classify_inputs:
            raise ClientError(f"{len(texts)} inputs in one request; the limit is {limits.max_classify_inputs}", 400,
                              "input", "too_many_inputs")
        for i, t in enumerate(texts):
            check_text(t, "input")
            if not isinstance(t, str) or not t.strip():
                where = "input" if isinstance(body.input, str) else f"input[{i}]"
                raise ClientError(f"{where} is empty: there is no text to classify", 400, "input", "empty_input")
        job = ClassifyJob(texts)
        submit(served, job.units(served.config.model.max_length))
        (probs,) = await wait([job])
        return {"object": "list", "model": served.id, "data": [
            {"index": i, "label": max(p, key=p.get), "probabilities": p} for i, p in enumerate(probs)]}

    return app


log = logging.getLogger("tunelab.serve")


def internal_error(exc: BaseException, where: str) -> str:
    """Log an unexpected failure with its traceback under a fresh id; the client gets the id, never the text."""
    eid = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s: %s: %s", eid, where, type(exc).__name__, exc,
              exc_info=(type(exc), exc, exc.__traceback__))
    return f"internal error (id {eid}); the server's log has the details"


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is read — at once when its
    Content-Length says so, else as soon as that many bytes have arrived."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the request body is larger than the limit of {self.limit:,} bytes"

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": {"message": self._message(), "type": "invalid_request_error", "param": None,
                                     "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(api_key: str | None = None, key_file: str | None = None) -> str | None:
    """The API key: --api-key-file (first line), else TUNELAB_API_KEY, else --api-key (visible in the process list)."""
    if key_file:
        path = Path(key_file)
        try:
            key = path.read_text(encoding="utf-8").strip().split("\n")[0].strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise TunelabError(f"--api-key-file {key_file}: cannot be read ({exc})") from None
        if not key:
            raise TunelabError(f"--api-key-file {key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or api_key or None


def _render_chat(served: Served, messages: list[dict]) -> str:
    """The prompt for the assistant's next turn, rendered as the run renders prompts (`tunelab generate`)."""
    engine = served.engine
    if not messages or messages[-1]["role"] != "user":
        raise ClientError("messages must end with a user message", 400, "messages")
    for m in messages:
        if not isinstance(m.get("content"), str):
            raise ClientError("message content must be a string", 400, "messages")
        if len(m["content"]) > 100_000:
            raise ClientError("a message is too long", 400, "messages", "input_too_long")
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
    from .tasks import sft

    fmt = engine._format(served.config.data)
    if fmt != "chat":
        raise ClientError(f"`{served.id}` was trained on {fmt} prompts, which hold one user message and no system "
                          f"message; conversations need a run with data.prompt_format chat", 400, "messages")
    turns = [{"instruction": rest[i]["content"], "input": None,
              "response": rest[i + 1]["content"] if i + 1 < len(rest) else ""} for i in range(0, len(rest), 2)]
    conv = sft.Conversation(turns, system=system)
    return sft.render_prompt(conv, len(turns) - 1, engine.tokenizer, fmt, served.config.data)


def _version() -> str:
    from . import __version__

    return __version__


def serve(runs: list, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, log_level: str = "info", allow_public: bool = False) -> None:
    """Load `runs` and serve them until interrupted (blocking). A host other than loopback needs an API key
    (or `allow_public`)."""
    import uvicorn

    key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not key and not allow_public:
        raise TunelabError(f"--host {host} makes the server reachable from other machines, and no API key is set: "
                           f"anyone there could use it. Set a key (TUNELAB_API_KEY or --api-key-file), or pass "
                           f"--allow-public if that is what you want")
    limits = limits or Limits()
    registry = Registry(runs, limits)
    print("tunelab serve:")
    for line in registry.lines:
        print(f"  {line}")
    app = create_app(runs, limits, key, registry=registry)
    print(f"  OpenAI-compatible API at http://{host}:{port}/v1" + (" (API key required)" if key else ""))
    if not is_loopback(host) and not key:
        print(f"  warning: no API key and --host {host}: open to every machine that reaches this one")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def wait_until_healthy(proc, port: int, timeout: float) -> str:
    """Poll a `tunelab serve` process's /health on 127.0.0.1:PORT: "ready", "exited" or "timeout" (then killed).
    For scripts and tests that start the server as a subprocess."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return "ready"
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    return "timeout"
