"""Tasks: what is learned. One module each, registered here; each is a unit that declares its traits and
implements the `Task` protocol below, so `train.py` only orchestrates and the config, the data check, `tunelab
eval`, merge, export and serve ask the task instead of comparing names.

Adding a task means one module and one `register()` call (a test registers a toy task and trains it end to end).
Like torchtune's recipes, a task is a protocol, not a base class: no implementation inheritance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class FitContext:
    """What a task's `fit` and `evaluate` work with."""
    config: Any
    splits: Any
    model_dir: str
    run: Any
    """The RunDir: its `path`, `write_dir(name, fill)` for atomic folders, `write_json`."""
    resume: bool = False
    callbacks: tuple = ()
    """Extra Trainer callbacks (tunelab search reports evaluations through one)."""
    setup: Any = None
    """What the task's `setup` returned before the run directory existed (rl: the reward)."""
    choose: Any = None
    """generation.choose, which opens the engine that writes a generative run's test answers (`generate.engine`);
    passed in by train.py, since tasks do not import the generation layer built on them. None: HF generate."""
    extra: dict = field(default_factory=dict)


class Task(Protocol):
    NAME: str
    DATA_FIELDS: frozenset[str]
    """data.* keys this task reads beyond the common ones (train, validation, test, split, ...)."""
    METRICS: tuple[str, ...]
    """eval.metric values it accepts; the first is the default."""
    KIND: str
    """What a finished run loads as: "classifier", "generator" or "reward model"."""
    USE: str
    """The command that uses a finished run (for messages)."""
    PEFT_TASK_TYPE: str
    AUTO_HEAD: str | None
    """The head it builds on the model ("sequence-classification", "causal-lm"), checked before any work."""
    CAUSAL_LM: bool
    """The trained model is a decoder-only causal LM (merge, export, /v1/completions, forgetting by perplexity)."""
    CHAT_PROMPTS: bool
    """It learns from conversations rendered with the model's chat template (benchmarks render theirs with it)."""
    SERVES: str | None
    """The `tunelab serve` endpoint family: "classify", "generate" or None."""
    PACKING: bool
    """train.packing and train.compile apply (rows go through TRL's SFT trainer)."""
    PACKING_DEFAULT: bool
    GROUP_BY_LENGTH: bool
    """Default of train.group_by_length when rows are not packed."""
    DEFAULT_METHOD: str | None
    """Method used when the config names none (None: `method` is required)."""
    SECTION: str | None
    """The config section this task owns (`dpo`, `rl`), described by the module's `Settings`."""
    SECTION_REQUIRED: bool
    EARLIER_TASK: bool
    """eval.earlier_task (a linear probe on an earlier task's data) applies."""
    BASELINE: bool
    """`tunelab eval --base CONFIG` measures its untrained model."""
    STREAMING: bool
    """data.streaming applies: the train rows can be read, checked and tokenized as training consumes them."""

    def check(self, config) -> list[str]: ...
    def load_splits(self, config): ...
    # optional: setup(config, *, allow_code, load_run) -> object, run before the run directory exists; its result
    # is FitContext.setup
    def fit(self, ctx: FitContext) -> tuple[dict, dict]: ...
    def evaluate(self, ctx: FitContext, stats: dict) -> dict: ...
    def load(self, path, config, full_precision: bool = False): ...
    # the finished run, loaded as generate/serve run it (full_precision: every weight in fp32, for merge/export)
    def evaluate_file(self, path, config, spec: str, *, allow_code: bool, load_run, choose) -> dict: ...
    # load_run: runs.load_run; choose: generation.choose (for a generative task's answers) — passed in from above
    def report(self, metrics: dict) -> list[str]: ...
    def token_lengths(self, config, frame, tokenizer): ...


TASKS: dict[str, Task] = {}

_DEFAULTS = {"AUTO_HEAD": None, "PACKING": False, "PACKING_DEFAULT": False, "GROUP_BY_LENGTH": False,
             "DEFAULT_METHOD": None, "SECTION": None, "SECTION_REQUIRED": False, "EARLIER_TASK": False,
             "BASELINE": False, "STREAMING": False, "CAUSAL_LM": False, "CHAT_PROMPTS": False, "SERVES": None,
             "DATA_FIELDS": frozenset()}


def register(module) -> None:
    """Add a task module to the registry (its NAME is the config's `task:` value)."""
    for key, value in _DEFAULTS.items():
        if not hasattr(module, key):
            setattr(module, key, value)
    TASKS[module.NAME] = module


def get(name: str) -> Task:
    return TASKS[name]


def load_splits(config):
    """The config's data, read, checked and split by its task."""
    return TASKS[config.task].load_splits(config)


def with_trait(key: str) -> list[str]:
    return [name for name, task in TASKS.items() if getattr(task, key)]


from . import causal_lm, classify, dpo, reward, rl, seq2seq, sft  # noqa: E402

for _module in (classify, sft, seq2seq, causal_lm, reward, dpo, rl):
    register(_module)

__all__ = ["TASKS", "FitContext", "Task", "get", "load_splits", "register", "with_trait"]
