"""The served runs: each finished run loaded once by its task, adapter runs over one base sharing that base (the
first adapter loads with it, the others are added: `PeftModel.load_adapter`), and one batching worker per model
object. Loading and wiring only; the workers run the batches: generation in continuous batching
(generation/continuous.py), prompt-learning adapters and classifiers in batches (batching.py)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RunError, TunelabError
from ..generation import torch as torch_engine
from ..generation.continuous import Loop, fits
from ..tasks import TASKS
from .batching import Worker, classify_batch, generate_batch, mixable
from .limits import Limits


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
        from ..runs import open_finished

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
            serves = TASKS[config.task].SERVES
            if serves == "classify":
                self._classifier(path, config)
            elif serves == "generate":
                # adapters over the same base share it (tunelab runs them on the full-precision base, as it
                # evaluates them: a qlora adapter too)
                shared = (path / "model" / "adapter_config.json").exists() and limits.engine == "torch"
                groups.setdefault(config.model.name if shared else f"{path}|alone", []).append((path, config))
            else:
                raise RunError(f"{path} is a `{config.task}` run; serve takes classifiers (/v1/classify) and "
                               f"decoder-only generative runs ({', '.join(t for t in TASKS if TASKS[t].SERVES)})")
        for members in groups.values():
            self._generators(members)
        self.lines.append(f"process memory (RSS) after loading: {_rss_mb():.0f} MB")

    def _classifier(self, path: Path, config) -> None:
        engine = TASKS[config.task].load(path, config)
        served = Served(path.name, path, config, "classify", engine)
        # texts are short work next to a generation: several per requested batch slot, within a token budget
        served.worker = Worker(path.name, lambda units: classify_batch(engine, units), self.limits,
                               max_units=self.limits.max_batch * 4, max_tokens=self.limits.max_classify_tokens)
        self.models[served.id] = served
        self.lines.append(f"{served.id}: classifier ({config.method.name} on {config.model.name}), "
                          f"{_param_bytes(engine.model) / 2**20:.1f} MB of weights")

    def _generators(self, members: list) -> None:
        path, config = members[0]
        engine = TASKS[config.task].load(path, config)
        if engine.encoder_decoder:
            raise RunError(f"{path}: serve handles decoder-only models")
        if self.limits.engine == "vllm":
            return self._on_vllm(path, config, engine)
        adapters = {}
        if (path / "model" / "adapter_config.json").exists():
            model = engine.model
            first = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
            adapters[path.name] = first
            for other, _ in members[1:]:
                model.load_adapter(str(other / "model"), adapter_name=other.name)
                adapters[other.name] = other.name
        merged = None
        if len(members) == 1 and adapters and torch_engine.mergeable(engine):
            # one adapter: generated on it merged into the base (one matmul per projection, as `tunelab generate`)
            merged, adapters = torch_engine.open(engine, path).why, {}
        mixed = mixable(engine.model) if adapters else False
        base_bytes = _param_bytes(engine.model)
        name = "+".join(p.name for p, _ in members)
        static = "static batches (as configured)" if not self.limits.continuous else fits(engine.model)
        if static:  # one `generate` call per batch: a request that arrives joins the next batch
            worker = Worker(name, lambda jobs: generate_batch(engine, jobs, mixed), self.limits)
        else:  # continuous batching: a request joins the running batch at the next step
            worker = Loop(name, engine, self.limits, mixed)
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
                              f"{base_bytes / 2**20:.1f} MB of weights" + (f"; {merged}" if merged else ""))
        self.lines.append(f"{name}: " + (f"static batches: {static}" if static else
                                         "continuous batching (a request joins the running batch at the next token)"))

    def _on_vllm(self, path: Path, config, generator) -> None:
        """One run on vLLM's engine (`--engine vllm`): merged into a plain model folder, its parity checked, vLLM's
        continuous batching behind tunelab's own routes, checks and rendering."""
        from ..generation import missing, vllm

        why = missing("vllm") or vllm.unfit(generator, path)
        if why:
            raise TunelabError(f"{path}: {why}")
        engine = vllm.open(generator, path)
        worker = vllm.Loop(path.name, engine, self.limits)
        self.models[path.name] = Served(path.name, path, config, "generate", generator, worker=worker)
        passed = vllm.passed_parity(path, generator.precision) or "its parity check did not pass (RUN/engines.json)"
        self.lines.append(f"{path.name}: {config.method.name} model on {config.model.name} on {engine.why}: "
                          f"continuous batching in vLLM; {passed}")
