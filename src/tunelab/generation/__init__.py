"""Generation engines behind one small interface, one module each — as lm-eval-harness registers `hf`, `vllm`,
`local-completions` over one `LM` class. `tunelab generate --engine auto|torch|llamacpp|vllm` goes through here.

An engine is made from a loaded run (`Generator`) by its module's `open(generator, path) -> Engine`, and answers
`generate(prompts, max_new_tokens=, temperature=, top_p=, batch_size=, progress=, ignore_eos=)` for prompts tunelab
has already rendered, so every engine sees the very prompt the trained model saw. Each module declares what it is:

| trait | meaning |
| --- | --- |
| `BATCHES` | several prompts are computed together (else one after another) |
| `NEEDS` | the import it needs, and the install line to give when it is missing |

`choose(name, generator, path, n_prompts, max_new_tokens)` opens the engine asked for, or for `auto` the one
measured fastest for that job on CPU (bench/generation.py) among those whose parity with the trained model is on
record and passed, and says why. An engine with a `missing()` of its own (vllm) runs in another environment.
Parity is recorded in RUN/engines.json (`record_parity`).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Protocol

from ..errors import TunelabError
from . import llamacpp, vllm
from . import torch as torch_engine

ENGINES = {"torch": torch_engine, "llamacpp": llamacpp, "vllm": vllm}
CHOICES = ("auto", *ENGINES)
RECORD = "engines.json"


class Engine(Protocol):
    name: str
    why: str  # what it runs on (merged weights, the GGUF file...), said to the user

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, progress: bool = False,
                 ignore_eos: bool = False) -> list[str]: ...


def missing(name: str) -> str | None:
    """Why engine `name` cannot run on this machine (its package is not installed), or None."""
    if hasattr(ENGINES[name], "missing"):  # an engine in an environment of its own says so itself
        return ENGINES[name].missing()
    need = getattr(ENGINES[name], "NEEDS", None)
    if need and importlib.util.find_spec(need[0]) is None:
        return f"the {name} engine needs {need[0]}: {need[1]}"
    return None


def choose(name: str, generator, path: Path | None, n_prompts: int, max_new_tokens: int = 64) -> Engine:
    """The engine `name` for this run (`auto`: see the module docstring); a clear error when it cannot run."""
    if name not in CHOICES:
        raise TunelabError(f"unknown generation engine {name!r}; choose one of {', '.join(CHOICES)}")
    if name != "auto":
        why = missing(name) or ENGINES[name].unfit(generator, path)
        if why:
            raise TunelabError(why)
        return ENGINES[name].open(generator, path)
    # auto: llama.cpp answers one prompt about 2x faster than HF generate, and loses to batched HF generate from a
    # few prompts on (bench/results/generation.json) — so it is picked for a single prompt, when its export of
    # this run exists and passed its parity check; otherwise torch
    if n_prompts == 1 and path is not None and not missing("llamacpp") and not llamacpp.unfit(generator, path):
        passed = llamacpp.passed_parity(path)
        if passed:
            return llamacpp.open(generator, path, why=f"auto: one prompt, and {passed}")
    # vLLM generates several times faster than HF generate once loaded, and takes tens of seconds to load: picked
    # for a job of at least vllm.MIN_TOKENS tokens, when its parity with this run in this precision is on record
    job = n_prompts * max_new_tokens
    vllm_ready = path is not None and not missing("vllm") and not vllm.unfit(generator, path) \
        and vllm.passed_parity(path, generator.precision)
    if n_prompts > 1 and job >= vllm.MIN_TOKENS and vllm_ready:
        return vllm.open(generator, path, why=f"auto: {n_prompts} prompts × {max_new_tokens} tokens, and "
                                              f"{vllm_ready}")
    engine = torch_engine.open(generator, path)
    engine.why = "auto: " + engine.why + (f"; {n_prompts} prompts batch best here" if n_prompts > 1 else
                                          f"; {llamacpp.not_ready(generator, path)}")
    return engine


def read_record(path: Path) -> dict:
    try:
        return json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def record_parity(path: Path, engine: str, result: dict) -> None:
    """RUN/engines.json[engine] = result (written atomically; other engines' entries kept)."""
    from ..runs import write_json

    record = read_record(path)
    record[engine] = result
    write_json(Path(path) / RECORD, record)


__all__ = ["CHOICES", "ENGINES", "Engine", "choose", "missing", "read_record", "record_parity"]
