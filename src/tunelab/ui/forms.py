"""The New-run form, generated from the typed config: every field of the sections a run reads, its docstring as
help text, its default, a choice list for closed sets (task, method, Literal options, true/false), and the
chosen method's own options. A submitted form becomes the raw config mapping (only what the user changed), which
is validated by `load_config` — the CLI's own code, so the messages are the CLI's."""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel

from ..config import Config
from ..methods import METHODS, trait
from ..tasks import TASKS

PREFIX = "f:"  # form input names: f:train.lr


@dataclass
class Field:
    key: str
    """Dotted config key, e.g. train.lr."""
    help: str
    default: Any
    choices: list[str] | None = None
    """A closed set (select box); None: free text, read as YAML like `--set`."""
    value: str = ""
    """What the form shows: the submitted text (or choice)."""
    error: str | None = None
    multiline: bool = False

    @property
    def default_text(self) -> str:
        return _text(self.default)


@dataclass
class Section:
    name: str
    help: str
    fields: list[Field] = field(default_factory=list)


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def _unwrap(annotation):
    """(the annotation without None, whether None was allowed)."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(get_args(annotation))
    return annotation, False


def _section_class(annotation):
    inner, _ = _unwrap(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _fields(model: type[BaseModel], prefix: str, keep) -> list[Field]:
    out = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        if not keep(key):
            continue
        inner, optional = _unwrap(info.annotation)
        nested = _section_class(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if nested is not None and not optional and get_origin(info.annotation) is None:
            out += _fields(nested, f"{key}.", keep)  # a sub-section (data.split): its own fields
            continue
        choices = None
        if get_origin(inner) is Literal:
            choices = [_text(c) for c in get_args(inner)]
        elif inner is bool:
            choices = ["true", "false"]
        if choices is not None and optional:
            choices = [""] + choices
        complex_ = nested is not None or get_origin(inner) in (list, dict) or (
            get_origin(inner) in (typing.Union, types.UnionType) and choices is None)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        out.append(Field(key, (info.description or "").strip(), default, choices, multiline=complex_))
    return out


def sections(task: str, method: str) -> list[Section]:
    """The form's sections for `task` and `method` (the method's own Options; the task's data fields only)."""
    task_mod = TASKS[task]
    own = set(task_mod.DATA_FIELDS)
    others = set().union(*(set(t.DATA_FIELDS) for t in TASKS.values())) - own

    def keep(key: str) -> bool:
        parts = key.split(".")
        return not (parts[0] == "data" and len(parts) == 2 and parts[1] in others)

    out = [Section("model", "The pretrained model.", _fields(Config.model_fields["model"].annotation, "model.", keep)),
           Section("data", "Training data and how it is split.",
                   _fields(Config.model_fields["data"].annotation, "data.", keep)),
           Section("method", f"Options of method {method}.",
                   [f for f in _fields(METHODS[method].Options, "method.", keep) if f.key != "method.name"]),
           Section("train", "Optimisation.", _fields(Config.model_fields["train"].annotation, "train.", keep)),
           Section("eval", "Evaluation.", _fields(Config.model_fields["eval"].annotation, "eval.", keep)),
           Section("generate", "What writes the text (test answers, generate).",
                   _fields(Config.model_fields["generate"].annotation, "generate.", keep)),
           Section("output", "Where the run goes.", _fields(Config.model_fields["output"].annotation, "output.",
                                                            keep))]
    if task_mod.SECTION:  # dpo / rl settings, owned by the task
        cls = _section_class(Config.model_fields[task_mod.SECTION].annotation)
        out.append(Section(task_mod.SECTION, f"Settings of task {task}.", _fields(cls, f"{task_mod.SECTION}.", keep)))
    for name in ("compare", "search"):  # used by `tunelab compare` / `tunelab search` only
        cls = _section_class(Config.model_fields[name].annotation)
        out.append(Section(name, f"Used by {name} jobs only.", _fields(cls, f"{name}.", keep)))
    return out


def methods_for(task: str) -> list[str]:
    return [m for m in METHODS if not trait(m, "TASKS") or task in trait(m, "TASKS")]


def fill(secs: list[Section], form: dict[str, str]) -> None:
    for sec in secs:
        for f in sec.fields:
            f.value = form.get(PREFIX + f.key, f.default_text if f.choices else "")


def raw_config(task: str, method: str, secs: list[Section], form: dict[str, str]) -> tuple[dict, list[str]]:
    """The config mapping of a submitted form — task, method and every field whose value differs from its default
    (text read as YAML, as `--set` reads it) — and the problems of values that are not valid YAML."""
    raw: dict = {"task": task, "method": {"name": method}}
    problems = []
    for sec in secs:
        for f in sec.fields:
            text = form.get(PREFIX + f.key, "").strip()
            if text == "" or (f.choices is not None and text == f.default_text):
                continue
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                problems.append(f"{f.key}: the value is not valid YAML ({getattr(exc, 'problem', exc)})")
                continue
            node = raw
            parts = f.key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    return raw, problems


def attach_errors(secs: list[Section], problems: list[str]) -> list[str]:
    """Put each problem beside its field (a problem names its key first: `train.lr: ...`); return the others."""
    by_key = {f.key: f for sec in secs for f in sec.fields}
    rest = []
    for problem in problems:
        key = problem.split(":", 1)[0].strip().strip("`")
        target = by_key.get(key)
        if target is None:
            rest.append(problem)
        else:
            target.error = problem.split(":", 1)[1].strip() if ":" in problem else problem
    return rest


def validate(raw: dict, where: Path):
    """(Config, []) or (None, problems): the raw mapping written as YAML at `where` and read with load_config."""
    from ..config import load_config
    from ..errors import ConfigError

    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = where.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    tmp.replace(where)
    try:
        return load_config(where), []
    except ConfigError as exc:
        return None, list(exc.problems)
