"""The run config: one YAML file describes model, data, task, method, training, evaluation and output.

Precedence: field defaults < YAML file < `--set key.path=value` overrides. Every problem is reported at once,
naming the file and the key. A loaded config is frozen; the resolved version is saved with every run.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..methods import METHODS, MethodOptions, trait
from ..schema import Section
from ..tasks import TASKS
from ..tasks.dpo import Settings as DPOSettings
from ..tasks.rl import Settings as RLSettings
from ..version import __version__
from .keys import set_key
from .sections import (
    ICL_ENTRIES,
    METRICS,
    CompareConfig,
    DataConfig,
    EarlierTask,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    OutputConfig,
    ParamRange,
    ReplayConfig,
    SearchConfig,
    SourceConfig,
    SplitConfig,
    TrainConfig,
)

__all__ = ["ICL_ENTRIES", "METRICS", "CompareConfig", "Config", "DPOSettings", "DataConfig", "EarlierTask",
           "EvalConfig", "GenerateConfig", "ModelConfig", "OutputConfig", "ParamRange", "RLSettings", "ReplayConfig",
           "SearchConfig", "SourceConfig", "SplitConfig", "TrainConfig", "apply_override", "load_config",
           "set_key"]



def _task_fields(task: str) -> set[str]:
    """The data fields a task reads (declared by the task); a field of another task given in a config is an error,
    and is left out of the saved config."""
    return set(TASKS[task].DATA_FIELDS)


def _all_task_fields() -> set[str]:
    return set().union(*(set(t.DATA_FIELDS) for t in TASKS.values()))


class Config(Section):
    model: ModelConfig
    task: str = "classify"
    """What to learn: `classify` (sequence classification), `sft` (instruction / chat tuning of a causal LM),
    `seq2seq` (the same instruction data on an encoder-decoder, T5 style), `causal_lm` (continued pre-training on
    raw text), `reward` (a reward model from preference pairs or rankings), `dpo` (direct preference optimisation
    of a causal LM), `rl` (online RL of a causal LM against a reward: GRPO/RLOO) — each a module in tasks/."""
    data: DataConfig
    method: MethodOptions
    """The fine-tuning method: a name (`lora`) or a mapping with `name` and its options (dpo and rl: lora when
    left out)."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    generate: GenerateConfig = GenerateConfig()
    output: OutputConfig = OutputConfig()
    dpo: DPOSettings | None = None
    """task dpo: its settings (defaults when left out)."""
    rl: RLSettings | None = None
    """task rl: the reward and the sampling/optimisation settings (required for task rl)."""
    compare: CompareConfig | None = None
    """Used by `tunelab compare` only (ignored by `tunelab train`)."""
    search: SearchConfig | None = None
    """Used by `tunelab search` only (ignored by `tunelab train`)."""

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            close = difflib.get_close_matches(value, list(TASKS), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ValueError(f"unknown task {value!r}; {hint}choose one of: {', '.join(TASKS)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, data: Any):
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": {"name": data["method"]}}
        task = TASKS.get(data.get("task", "classify")) if isinstance(data, dict) else None
        if task is not None and "method" not in data and task.DEFAULT_METHOD:
            data = {**data, "method": {"name": task.DEFAULT_METHOD}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self):
        task, method = TASKS[self.task], self.method.name
        problems = []
        given = self.data.model_fields_set
        wrong = sorted(given & (_all_task_fields() - _task_fields(self.task)))
        if wrong:
            problems.append(f"data.{', data.'.join(wrong)} do(es) not apply to task {self.task}")
        if self.eval.metric is not None and self.eval.metric not in task.METRICS:
            problems.append(f"eval.metric {self.eval.metric} does not apply to task {self.task}; it uses "
                            f"{' or '.join(task.METRICS)}")
        allowed = trait(method, "TASKS")
        if allowed and self.task not in allowed:
            hint = trait(method, "TASKS_HINT")
            problems.append(f"method {method} is for task {' / '.join(allowed)}, not {self.task}"
                            + (f"; {hint}" if hint else ""))
        if self.eval.earlier_task is not None and not task.EARLIER_TASK:
            problems.append(f"eval.earlier_task does not apply to task {self.task}; generative tasks measure "
                            f"forgetting by perplexity (eval.forgetting)")
        if self.eval.benchmarks and not task.CAUSAL_LM:
            problems.append(f"eval.benchmarks does not apply to task {self.task}: lm-eval-harness benchmarks score a "
                            f"causal language model")
        for section in ("dpo", "rl"):  # the sections a task owns
            if getattr(self, section) is not None and task.SECTION != section:
                problems.append(f"the `{section}:` section applies to task {section}, not {self.task}")
        if task.SECTION_REQUIRED and getattr(self, task.SECTION) is None:
            problems.append(f"task {self.task} needs an `{task.SECTION}:` section (its settings: tunelab/tasks/"
                            f"{self.task}.py)")
        if not task.PACKING:
            problems += [f"train.{key} applies to tasks {', '.join(n for n, t in TASKS.items() if t.PACKING)}, "
                         f"not {self.task}" for key in ("packing", "compile") if getattr(self.train, key) is True]
        if self.train.early_stopping_patience and not trait(method, "LOAD_BEST"):
            problems.append(f"train.early_stopping_patience cannot be used with method {method}: the Trainer cannot "
                            f"restore its checkpoints, so the final model is kept")
        if self.train.packing and trait(method, "VIRTUAL_TOKENS"):
            problems.append(f"train.packing cannot be used with method {method}: its virtual tokens would be shared by "
                            f"every packed example (PEFT ignores position ids)")
        if self.data.streaming:
            if not task.STREAMING:
                streams = ", ".join(n for n, t in TASKS.items() if t.STREAMING)
                problems.append(f"data.streaming applies to task(s) {streams}, not {self.task}")
            if self.train.max_steps is None:
                problems.append("data.streaming needs train.max_steps: a stream has no known length, so epochs "
                                "cannot be counted")
            if self.data.validation is None and self.data.test is None:
                problems.append("data.streaming needs data.validation and/or data.test: a stream is read once, in "
                                "order, and is not split")
        problems += task.check(self)
        if problems:
            raise ValueError("; ".join(problems))
        no_validation = self.data.validation is None and (self.data.split.validation == 0 or self.data.streaming)
        if self.train.early_stopping_patience is not None and no_validation:
            raise ValueError("train.early_stopping_patience needs validation data (data.validation or "
                             "data.split.validation > 0)")
        return self

    @property
    def packing(self) -> bool:
        """train.packing, resolved: explicit, else on for causal_lm where the method allows it."""
        if self.train.packing is not None:
            return self.train.packing
        return TASKS[self.task].PACKING_DEFAULT and not trait(self.method.name, "VIRTUAL_TOKENS")

    @property
    def group_by_length(self) -> bool:
        """train.group_by_length, resolved: explicit, else on where the Trainer sees unpacked rows."""
        if self.train.group_by_length is not None:
            return self.train.group_by_length
        return TASKS[self.task].GROUP_BY_LENGTH and not self.packing

    @property
    def metric(self) -> str:
        """The metric in effect: `eval.metric` or the task's default."""
        return self.eval.metric or TASKS[self.task].METRICS[0]

    @property
    def lr(self) -> float | None:
        """The learning rate in effect: `train.lr` or the method's default."""
        return self.train.lr if self.train.lr is not None else METHODS[self.method.name].DEFAULT_LR

    def to_dict(self) -> dict:
        """The resolved config, without the data fields of other tasks."""
        out = self.model_dump(mode="json", exclude={"data": _all_task_fields() - _task_fields(self.task)})
        task = TASKS[self.task]
        if task.SECTION and out.get(task.SECTION) is None and not task.SECTION_REQUIRED:  # its defaults, saved
            out[task.SECTION] = task.Settings().model_dump(mode="json")
        for key in ("compare", "search", "dpo", "rl"):  # left out when absent, so they do not change the hash
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        body = yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(f"# resolved by tunelab {__version__}\ntunelab_version: {__version__}\n{body}")


# ---------------------------------------------------------------------------------------------------- loading

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key `{key}` appears twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["no such file" if not path.exists() else "not a file"])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.start}, line {line}); a config is a YAML text "
                                      f"file"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot be read ({exc.strerror})"]) from None
    if "\x00" in text:
        raise ConfigError(str(path), ["holds NUL bytes: it is a binary file, not a YAML config"])
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the file must be a mapping of sections (model:, data:, method:, ...)"])
    raw.pop("tunelab_version", None)  # stamped into saved configs
    problems = []
    for item in overrides:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
    config = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems += [describe_error(err) for err in exc.errors()]
    if problems:
        raise ConfigError(str(path), problems)
    return config


def apply_override(raw: dict, item: str) -> str | None:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw mapping; return a problem or None."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        return f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.lr=1e-4"
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as exc:
        why = str(getattr(exc, "problem", None) or exc).strip()
        return f"--set {item}: the value is not valid YAML ({why}); quote text, e.g. --set {key}='\"...\"'"
    problem = set_key(raw, key, parsed)
    return f"--set {key}: {problem}" if problem else None


def describe_error(err: dict) -> str:
    loc = _clean_loc(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        raw = err["loc"]
        tag = raw[raw.index("method") + 1] if "method" in raw[:-1] and raw[0] == "method" else None
        allowed = sorted(METHODS[tag].Options.model_fields if tag in METHODS else _fields_at(loc[:-1]))
        hint = _suggest(str(loc[-1]), allowed)
        suggestion = f"did you mean `{hint}`? " if hint else ""
        return f"`{where}`: unknown key; {suggestion}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"`{where}`: required key is missing"
    if kind == "union_tag_invalid":
        return f"`{where}.name`: unknown method {err['input'].get('name')!r}; choose one of: {', '.join(METHODS)}"
    if kind == "union_tag_not_found":
        return f"`{where}`: needs `name:` (one of: {', '.join(METHODS)})"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"`{where}`: {msg}{shown}"


# Names users bring from the HF Trainer, PEFT, Axolotl and LLaMA-Factory configs, mapped to tunelab's.
_SYNONYMS = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup", "warmup_steps": "warmup", "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "use_dora": "dora", "lora_target_modules": "target_modules", "output_dir": "dir", "model_name": "name",
    "model_name_or_path": "name", "base_model": "name", "metric_for_best_model": "metric",
}


def _suggest(key: str, allowed: list[str]) -> str | None:
    """The allowed key the user most likely meant, from spelling or from another tool's name for it."""
    close = difflib.get_close_matches(key, allowed + list(_SYNONYMS), n=1, cutoff=0.75)
    if close:
        guess = _SYNONYMS.get(close[0], close[0])
        return guess if guess in allowed else None
    return None


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's internal parts (union tags, type names) so the path reads like the YAML."""
    out, node = [], Config
    for part in loc:
        if isinstance(part, str) and out and out[-1] == "method" and part in METHODS:
            node = _method_class(part)
            continue
        if isinstance(part, str) and "[" in part:  # e.g. 'literal['epoch']' or 'int' branches
            continue
        if part in ("int", "float", "str", "bool"):
            continue
        out.append(part)
        node = _field_class(node, part)
    return tuple(out)


def _method_class(name: str):
    return METHODS[name].Options


def _field_class(node, part):
    """The section class at `part` under `node` (through `X | None` and `list[X]`), or None."""
    import typing

    if node is None or not (isinstance(node, type) and issubclass(node, BaseModel)):
        return None
    if isinstance(part, int):  # an item of a list of sections: `node` is already the item class
        return node
    field = node.model_fields.get(part)
    if field is None:
        return None
    todo = [field.annotation]
    while todo:
        ann = todo.pop()
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
        todo += list(typing.get_args(ann))
    return None


def _fields_at(loc: tuple) -> list[str]:
    node: Any = Config
    for i, part in enumerate(loc):
        if part == "method" and i == len(loc) - 1:
            return ["name"] + sorted({f for m in METHODS.values() for f in m.Options.model_fields} - {"name"})
        node = _field_class(node, part)
        if node is None:
            return []
    return list(node.model_fields)
