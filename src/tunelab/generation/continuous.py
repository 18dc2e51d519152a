"""Continuous batching for the torch engine — the server's generation loop, as vLLM and TGI schedule: a request
joins the running batch at the next step and leaves it at the step it finishes, and a cancelled one (its client
went away) leaves at once, so a short request never waits for a batch of long ones.

One thread per model. Each step is one forward pass over every running request's last token, computed as
transformers' `generate` computes a left-padded batch: position ids from the attention mask, a `DynamicCache`
grown by one column a step. Requests that arrive together are prefilled together; their cache is padded on the
left to the running batch's width and joined to it; rows that finish are dropped from it (`batch_select_indices`),
and columns no remaining row uses are cut. Sampling per request with transformers' own temperature and top-p
warpers; several LoRA adapters mix in one step through peft's `adapter_names`.

A job is any object with: `prompt_ids`, `adapter`, `temperature`, `top_p`, `ignore_eos`, `cancelled`,
`finish_reason`, `add(token, tokenizer)`, `finish(reason)`, `fail(exc)` and `prompt_tokens` (see
serve/batching.GenerateJob)."""
from __future__ import annotations

import threading
import time
from collections import deque

import torch


def fits(model) -> str | None:
    """Why this model cannot run the loop (it then runs in static batches), or None. Prompt-learning adapters
    (prefix, prompt tuning) put virtual tokens into the cache or the input: `generate` handles them."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return "a prompt-learning adapter (its virtual tokens) generates through `generate`"
    if getattr(model.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


class Busy(Exception):
    """The model's queue is full."""


class Loop:
    """The step loop of one model (`engine`: a tasks.generate.Generator). `submit(jobs)` queues them; they join at
    the next step, at most `limits.max_batch` running at once and `limits.max_batch_tokens` prompt tokens
    prefilled in one step. `mixed`: LoRA adapters mix in one step (else a step runs one adapter, and a request
    for another waits until the running ones finish)."""

    def __init__(self, name: str, engine, limits, mixed: bool = False):
        self.name, self.engine, self.limits, self.mixed = name, engine, limits, mixed
        self.waiting: deque = deque()
        self.cond = threading.Condition()
        self.batches = self.batched_jobs = 0  # prefills (a group that joined together) and jobs they took
        self.steps = self.cancelled = 0
        self.joinable = True  # the cache can be joined (plain DynamicCache layers); else jobs join an idle loop
        self._reset()
        self.thread = threading.Thread(target=self._run, name=f"tunelab-serve-{name}", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        return len(self.waiting) + len(self.running)

    def submit(self, jobs: list) -> None:
        """Queue one request's jobs; Busy when `max_queue` are already waiting."""
        with self.cond:
            if len(self.waiting) >= self.limits.max_queue:
                raise Busy()
            self.waiting.extend(jobs)
            self.cond.notify()

    def _reset(self) -> None:
        self.running, self.cache, self.mask, self.last = [], None, None, None

    def _take(self) -> list:
        """The waiting jobs that join now (after at most `batch_wait_ms` for more when nothing runs)."""
        with self.cond:
            while not self.waiting and not self.running:
                self.cond.wait()
            if not self.running and len(self.waiting) < self.limits.max_batch:
                deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
                while len(self.waiting) < self.limits.max_batch and (left := deadline - time.monotonic()) > 0:
                    self.cond.wait(left)
            if self.running and not self.joinable:
                return []
            taken, later, tokens = [], deque(), 0
            adapters = {j.adapter for j in self.running}
            while self.waiting and len(self.running) + len(taken) < self.limits.max_batch:
                job = self.waiting.popleft()
                if job.cancelled:
                    job.finish("cancelled")
                    self.cancelled += 1
                elif not self.mixed and adapters and job.adapter not in adapters:
                    later.append(job)  # another adapter: it joins once the running ones have finished
                elif taken and tokens + len(job.prompt_ids) > self.limits.max_batch_tokens:
                    self.waiting.appendleft(job)
                    break
                else:
                    taken.append(job)
                    adapters.add(job.adapter)
                    tokens += len(job.prompt_ids)
            self.waiting.extendleft(reversed(later))
            return taken

    def _run(self) -> None:
        while True:
            new = self._take()
            try:
                with torch.inference_mode(), self.engine.autocast():
                    if new:
                        self._join(new)
                    self._leave()
                    if self.running:
                        self._step()
                        self._leave()
            except BaseException as exc:  # a failed step fails its requests, not the server
                for job in self.running + new:
                    job.fail(exc)
                self._reset()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache, jobs: list):
        kwargs = {"adapter_names": [j.adapter for j in jobs]} if self.mixed else {}
        model = self.engine.model
        if not self.mixed and jobs[0].adapter is not None and getattr(model, "active_adapter", None) != jobs[0].adapter:
            model.set_adapter(jobs[0].adapter)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].float(), out.past_key_values

    def _join(self, jobs: list) -> None:
        """Prefill the joining jobs together and add them to the running batch."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        device, pad = self.engine.model.device, self.engine.tokenizer.pad_token_id
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + list(j.prompt_ids) for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                            device=device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits, cache = self._forward(ids, mask, positions, DynamicCache(config=self.engine.model.config), jobs)
        self.batches += 1
        self.batched_jobs += len(jobs)
        for j in jobs:
            j.prompt_tokens = len(j.prompt_ids)
        tokens = self._pick(logits, jobs)
        self.joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        if self.running:
            self.cache, self.mask = _concat(self.cache, self.mask, cache, mask)
            self.last = torch.cat([self.last, tokens])
        else:
            self.cache, self.mask, self.last = cache, mask, tokens
        self.running = self.running + jobs
        self._deliver(tokens, jobs)

    def _step(self) -> None:
        """One token for every running job."""
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        positions = (self.mask.sum(-1, keepdim=True) - 1)
        logits, self.cache = self._forward(self.last[:, None], self.mask, positions, self.cache, self.running)
        self.steps += 1
        self.last = self._pick(logits, self.running)
        self._deliver(self.last, self.running)

    def _pick(self, logits: torch.Tensor, jobs: list) -> torch.Tensor:
        """The next token of each job: greedy, or sampled with its temperature and top-p (transformers' warpers,
        as `generate` applies them)."""
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        tokens = logits.argmax(-1)
        for i, job in enumerate(jobs):
            if job.temperature > 0:
                row = TemperatureLogitsWarper(job.temperature)(None, logits[i:i + 1])
                if job.top_p < 1:
                    row = TopPLogitsWarper(job.top_p)(None, row)
                tokens[i] = torch.multinomial(row.softmax(-1), 1)[0, 0]
        return tokens

    def _deliver(self, tokens: torch.Tensor, jobs: list) -> None:
        eos = self.engine.tokenizer.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        for job, token in zip(jobs, tokens.tolist()):
            if job.finish_reason is not None:
                continue
            if token in eos and not job.ignore_eos:
                job.finish("stop")
            else:
                job.add(token, self.engine.tokenizer)

    def _leave(self) -> None:
        """Drop finished and cancelled jobs from the batch, and the left columns no remaining job uses."""
        for job in self.running:
            if job.cancelled and job.finish_reason is None:
                job.finish("cancelled")
                self.cancelled += 1
        keep = [i for i, j in enumerate(self.running) if j.finish_reason is None]
        if len(keep) == len(self.running):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last = self.mask[index], self.last[index]
        self.running = [self.running[i] for i in keep]
        first = int(self.mask.any(0).nonzero()[0])
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]


def _concat(cache, mask, other, other_mask):
    """Two left-padded batches as one: the narrower padded on the left to the wider one's width."""
    width = max(mask.shape[1], other_mask.shape[1])
    pad = torch.nn.functional.pad

    def wide(t, w):  # [batch, heads, w, dim] -> [batch, heads, width, dim]
        return pad(t, (0, 0, width - w, 0))

    for a, b in zip(cache.layers, other.layers):
        a.keys = torch.cat([wide(a.keys, mask.shape[1]), wide(b.keys, other_mask.shape[1])])
        a.values = torch.cat([wide(a.values, mask.shape[1]), wide(b.values, other_mask.shape[1])])
    return cache, torch.cat([pad(mask, (width - mask.shape[1], 0)), pad(other_mask, (width - other_mask.shape[1], 0))])
