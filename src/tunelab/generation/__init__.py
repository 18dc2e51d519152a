"""Generation engines behind one small interface, one module each — as lm-eval-harness registers `hf`, `vllm`,
`local-completions` over one `LM` class. `tunelab generate --engine auto|torch|llamacpp|vllm` goes through here.

An engine is made from a loaded run (`Generator`) by its module's `open(generator, path, answers=None) -> Engine`,
and answers `generate(prompts, max_new_tokens=, temperature=, top_p=, batch_size=, progress=, ignore_eos=)` for
prompts tunelab has already rendered, so every engine sees the very prompt the trained model saw; its
`summary(record)` turns its entry of RUN/engines.json into a row of `parity_table`. Each module declares what it
is:

| trait | meaning |
| --- | --- |
| `BATCHES` | several prompts are computed together (else one after another) |
| `NEEDS` | the import it needs, and the install line to give when it is missing |

`choose(name, generator, path, n_prompts, max_new_tokens, answers=)` opens the engine asked for, or for `auto` the
one measured fastest for that job on CPU (bench/generation.py) among those whose parity with the trained model is
on record and passed, and says why. `answers`: (rendered prompt, reference) pairs a parity check is made on when
the run has no predictions_test.jsonl yet (its own evaluation, which generates through here too). An engine with
a `missing()` of its own (vllm) runs in another environment. Parity is recorded in RUN/engines.json
(`record_parity`).
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
    label: str  # what runs, in a few words: "torch (fp32, adapter merged into the base)", "llamacpp (model-f16.gguf)"
    why: str  # the label, or why `auto` picked it; said to the user

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


def choose(name: str, generator, path: Path | None, n_prompts: int, max_new_tokens: int = 64,
           answers: list[tuple[str, str]] | None = None) -> Engine:
    """The engine `name` for this run (`auto`: see the module docstring); a clear error when it cannot run."""
    if name not in CHOICES:
        raise TunelabError(f"unknown generation engine {name!r}; choose one of {', '.join(CHOICES)}")
    if name != "auto":
        why = missing(name) or ENGINES[name].unfit(generator, path)
        if why:
            raise TunelabError(why)
        return ENGINES[name].open(generator, path, answers=answers)
    # auto: llama.cpp answers one prompt about 2x faster than HF generate, and loses to batched HF generate from a
    # few prompts on (bench/results/generation.json) — so it is picked for a single prompt, when its export of
    # this run exists and passed its parity check; otherwise torch
    if n_prompts == 1 and path is not None and not missing("llamacpp") and not llamacpp.unfit(generator, path):
        passed = llamacpp.passed_parity(path)
        if passed:
            return llamacpp.open(generator, path, why=f"auto: one prompt, and {passed}", answers=answers)
    # vLLM generates several times faster than HF generate once loaded, and takes tens of seconds to load: tried
    # for a job of at least vllm.MIN_TOKENS tokens, and kept when it passes its parity check with this run in this
    # precision (on record, or made now on the test answers)
    job, not_vllm = n_prompts * max_new_tokens, None
    if n_prompts > 1 and job >= vllm.MIN_TOKENS:
        not_vllm = vllm.not_ready(generator, path, answers)
        if not_vllm is None:
            try:
                engine = vllm.open(generator, path, answers=answers)  # checks its parity first when none is on record
            except TunelabError as exc:
                not_vllm = f"vllm did not start: {exc}"
            else:
                passed = vllm.passed_parity(path, generator.precision)
                if passed:
                    engine.why = f"auto: {n_prompts} prompts × {max_new_tokens} tokens, and {passed}"
                    return engine
                engine.close()
                not_vllm = "vllm did not pass its parity check with this run (RUN/engines.json)"
    engine = torch_engine.open(generator, path, answers=answers)
    engine.why = "auto: " + engine.why + (
        f"; {not_vllm}" if not_vllm else
        f"; {n_prompts} prompts × {max_new_tokens} tokens: under the {vllm.MIN_TOKENS:,} tokens for which vllm's start "
        f"pays" if n_prompts > 1 else f"; {llamacpp.not_ready(generator, path)}")
    return engine


def read_record(path: Path) -> dict:
    try:
        return json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def parity_table(path: Path) -> list[dict]:
    """Each engine's parity with the trained model on record for the run, one row each (`engine`, `agreement`:
    teacher-forced next-token agreement, `perplexity_ratio`, `greedy_identical`, `passed`; None where that engine
    does not measure it) — what `tunelab compare`'s report and the UI's run page show."""
    return [ENGINES[name].summary(record) for name, record in read_record(path).items()
            if name in ENGINES and isinstance(record, dict)]


def record_parity(path: Path, engine: str, result: dict) -> None:
    """RUN/engines.json[engine] = result (written atomically; other engines' entries kept)."""
    from ..folders import write_json

    record = read_record(path)
    record[engine] = result
    write_json(Path(path) / RECORD, record)


__all__ = ["CHOICES", "ENGINES", "Engine", "choose", "missing", "parity_table", "read_record", "record_parity"]
