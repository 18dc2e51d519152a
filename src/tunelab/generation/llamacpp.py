"""llama.cpp (llama-cpp-python, the `[gguf]` extra) on the run's f16 GGUF export — the file users take to
llama.cpp and Ollama. The export is made on first use (`tunelab export RUN --format gguf`, with its parity check
against the trained model: a file that answers differently is refused) and kept in RUN/export-gguf/.

Prompts go in as the token ids tunelab's tokenizer gives the rendered prompt, so llama.cpp reads exactly what the
trained model read; sampling is plain temperature / top-p (llama.cpp's top-k, min-p and repeat penalty off, as in
HF `generate`). One prompt at a time: llama-cpp-python's completion API does not batch independent prompts."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

INSTALL = "pip install 'tunelab[gguf]' (it compiles llama.cpp: minutes)"
BATCHES = False
QUANT = "f16"


def gguf_file(path: Path) -> Path:
    return Path(path) / "export-gguf" / f"model-{QUANT}.gguf"


def missing() -> str | None:
    """Why llama.cpp cannot run here (llama-cpp-python is not installed), or None."""
    return None if importlib.util.find_spec("llama_cpp") else f"the llamacpp engine needs llama_cpp: {INSTALL}"


def unfit(generator, path: Path | None) -> str | None:
    """Why this run cannot generate through llama.cpp, or None."""
    from ..methods import trait
    from ..tasks import TASKS

    if path is None:
        return ("the llamacpp engine runs a run's GGUF export, and an untrained base (--base) has none: use "
                "--engine torch")
    config = generator.config
    if not TASKS[config.task].CAUSAL_LM:
        return f"{path} is a `{config.task}` run; llama.cpp runs decoder-only models (use --engine torch)"
    method = config.method.name
    if generator.demonstrations is not None or not (trait(method, "MERGEABLE") or trait(method, "FULL_MODEL")):
        return (f"{path} is a `{method}` run, which llama.cpp cannot hold (its trained part is not a weight of the "
                f"model): use --engine torch")
    return None


def _parity(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / "export-gguf" / "parity.json").read_text()).get(QUANT)
    except (OSError, ValueError, AttributeError):
        return None


def summary(record: dict) -> dict:
    """RUN/engines.json["llamacpp"] (the GGUF export's own check) as a row of the parity table."""
    from ..gguf import AGREEMENT

    identical = record.get("identical")
    return {"engine": f"llamacpp ({Path(record.get('file') or QUANT).name})", "agreement": None,
            "perplexity_ratio": record.get("perplexity_ratio"),
            "greedy_identical": None if identical is None else f"{identical:.0%} of {record.get('prompts')}",
            "passed": None if identical is None else identical >= AGREEMENT}


def passed_parity(path: Path) -> str | None:
    """A sentence saying the run's f16 GGUF exists and answered like the trained model; None if not so."""
    from ..gguf import AGREEMENT

    record = _parity(path)
    if not gguf_file(path).is_file() or not record or record.get("identical", 0) < AGREEMENT:
        return None
    return (f"{gguf_file(path).relative_to(Path(path).parent)} answered like the trained model on "
            f"{record['identical']:.0%} of {record['prompts']} test prompts")


def not_ready(generator, path: Path | None) -> str:
    """Why `auto` did not pick llama.cpp for a single prompt."""
    why = missing() or unfit(generator, path)
    if why:
        return f"llamacpp not used: {why}"
    if not gguf_file(path).is_file():
        return (f"llamacpp (faster for one prompt) not used: no GGUF export of this run yet — `--engine llamacpp` "
                f"or `tunelab export {path} --format gguf` makes one")
    return "llamacpp not used: its GGUF export did not pass the parity check (export-gguf/parity.json)"


def open(generator, path: Path, why: str | None = None, answers: list | None = None) -> "LlamaCppEngine":
    """The run's f16 GGUF export (made first if missing; its parity is the export's own check, so `answers` are
    not used)."""
    from .record import record_parity

    if not gguf_file(path).is_file():
        from ..export import export

        print(f"tunelab: making {gguf_file(path)} for the llamacpp engine (once; parity-checked)", flush=True)
        export(path, "gguf", quant=QUANT)
    record = _parity(path) or {}
    record_parity(path, "llamacpp", {k: record.get(k) for k in (
        "file", "prompts", "identical", "prompts_identical", "prompt_tokens_identical", "max_next_token_logit_diff",
        "perplexity_ratio", "llama_cpp_python")} | {"prompt": "tunelab's rendering, as token ids"})
    return LlamaCppEngine(generator, gguf_file(path), why or f"llamacpp ({gguf_file(path).name})")


def threads() -> int:
    """The threads torch computes with (OMP_NUM_THREADS, else the physical cores), without importing torch when
    this process has not: llama.cpp answering one prompt never needs it."""
    import os
    import sys

    if "torch" in sys.modules:
        return sys.modules["torch"].get_num_threads()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(self, generator, file: Path, why: str):
        self.generator, self.file, self.why = generator, file, why
        self.label = f"llamacpp ({file.name})"
        self._llm, self._n_ctx = None, 0

    def _model(self, n_ctx: int):
        import llama_cpp

        if self._llm is None or n_ctx > self._n_ctx:
            self._n_ctx = max(n_ctx, 512)
            self._llm = llama_cpp.Llama(model_path=str(self.file), n_ctx=self._n_ctx, n_threads=threads(),
                                        n_batch=min(self._n_ctx, 512), verbose=False, seed=0)
        return self._llm

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, progress: bool = False,
                 ignore_eos: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        tokenizer = self.generator.tokenizer
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        llm = self._model(max(map(len, ids), default=0) + max_new_tokens + 8)
        out = []
        for prompt in tqdm(ids, desc="generating (llama.cpp)", disable=not progress, leave=False):
            llm.reset()
            done = llm.create_completion(prompt or [tokenizer.eos_token_id], max_tokens=max_new_tokens,
                                         temperature=temperature, top_p=top_p, top_k=0, min_p=0.0,
                                         repeat_penalty=1.0, seed=0,
                                         logit_bias={llm.token_eos(): float("-inf")} if ignore_eos else None)
            out.append(done["choices"][0]["text"].strip())
        return out
