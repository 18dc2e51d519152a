"""Dynamic batching: one worker thread per loaded model takes the waiting work in batches — round-robin across
requests, within a unit count and a token budget — and runs it: one forward pass for texts to classify, one
`generate` call for prompts (streaming each job's tokens as they come)."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from ..generation.continuous import Busy
from .limits import Limits


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
                 stop: list[str], stream_queue: asyncio.Queue | None = None, loop=None, prompt_ids=None,
                 ignore_eos: bool = False):
        super().__init__(loop)
        self.prompt, self.adapter, self.max_tokens = prompt, adapter, max_tokens
        self.temperature, self.top_p, self.stop = temperature, top_p, stop
        self.stream_queue = stream_queue
        self.prompt_ids = prompt_ids or []  # its tokens (the continuous loop prefills them)
        self.cost = len(self.prompt_ids)  # prompt tokens, for the batch token budget
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.cancelled = False
        self.ignore_eos = ignore_eos  # EOS is a token like any other: always max_tokens tokens
        self._offsets = (0, 0)  # incremental detokenization: the tokens already read, and the few before them

    def cancel(self) -> None:
        """The client went away: the job leaves its batch at the next step."""
        self.cancelled = True

    @property
    def sampling(self) -> tuple:
        return (self.temperature > 0, round(self.temperature, 6), round(self.top_p, 6))

    def _emit(self, delta: str) -> None:
        if delta and self.stream_queue is not None:
            self.loop.call_soon_threadsafe(self.stream_queue.put_nowait, delta)

    def add(self, token: int, tokenizer) -> None:
        """One generated token (not EOS): extend the text, stream what is safe to send. The text grows by the
        decoding of the newest tokens after a few before them (as TGI and vLLM detokenize: the earlier ones give
        the word boundary), not by decoding the whole answer again each step; half of a multi-byte character
        waits for the rest."""
        self.tokens.append(token)
        start, read = self._offsets
        before = tokenizer.decode(self.tokens[start:read], skip_special_tokens=True)
        now = tokenizer.decode(self.tokens[start:], skip_special_tokens=True)
        grew = len(now) > len(before) and not now.endswith("\ufffd")
        if grew:
            searched = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += now[len(before):]
            self._offsets = (read, len(self.tokens))
            for s in self.stop:
                at = self.text.find(s, searched)
                if at >= 0:
                    self.text = self.text[:at]
                    self.finish("stop")
                    return
        if len(self.tokens) >= self.max_tokens:
            if not grew:  # ends inside a character: what there is
                self.text += now[len(before):]
            self.finish("length")
            return
        hold = max((len(s) - 1 for s in self.stop), default=0)  # a stop string may be starting at the end
        upto = max(len(self.text) - hold, self.sent)
        self._emit(self.text[self.sent:upto])
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
            if job.cancelled:
                job.finish("cancelled")
            elif token in self.eos and not job.ignore_eos:
                job.finish("stop")
            else:
                job.add(token, self.tokenizer)

    def end(self) -> None:
        for job in self.jobs:
            job.finish("length")

    def all_done(self, input_ids, scores, **kwargs):  # a StoppingCriteria: stop once every job has finished
        import torch

        done = all(j.finish_reason is not None for j in self.jobs)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

def classify_batch(engine, units: list[ClassifyUnit]) -> None:
    """Probabilities for a batch of texts (from one or several requests), handed to each request as it completes."""
    units = sorted(units, key=lambda u: u.cost)  # similar lengths side by side: less padding
    for unit, probs in zip(units, engine.predict_proba([u.text for u in units])):
        unit.job.done(unit.index, probs)


def mixable(model) -> bool:
    """peft runs several LoRA adapters in one batch (`adapter_names`), but not DoRA or other adapter types."""
    configs = getattr(model, "peft_config", {})
    return bool(configs) and all(getattr(c, "peft_type", None) is not None and c.peft_type.value == "LORA"
                                 and not getattr(c, "use_dora", False) for c in configs.values())

def generate_batch(engine, jobs: list[GenerateJob], mixed: bool) -> None:
    """Run a batch of generation jobs: one `generate` call per sampling setting (and per adapter unless LoRA
    adapters mix in one batch); tokens stream to each job as they come."""
    import torch
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
            elif group[0].adapter is not None:
                model.set_adapter(group[0].adapter)
            with torch.inference_mode(), engine.autocast():  # as Generator.generate runs it
                model.generate(**enc, **kwargs)
        except BaseException as exc:
            for j in group:
                j.fail(exc)
