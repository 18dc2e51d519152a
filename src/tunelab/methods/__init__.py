"""Fine-tuning methods: one module each, registered here.

Each module defines `Options` (its config section, discriminated by `name`) and `DEFAULT_LR`. Gradient methods
define `prepare(model, options, new_modules, *, task_type, model_dir) -> model`, which freezes or wraps the model
for training (`task_type`: PEFT's task type, declared by the task). Optional hooks: `check(options, *, model_dir,
model_name)` (can this machine run it? called before any work), `load_kwargs(options)` (extra `from_pretrained`
arguments), `save(model, dir)` / `load(base, dir)` with `SAVED_FILE` (a saved format other than a PEFT adapter or
a full model), `train_run(ctx)` (a method that replaces the training loop: features, icl).

A method declares its traits in its own module; code elsewhere reads them with `trait(name, TRAIT)`:

| trait | meaning (default) |
| --- | --- |
| `FROZEN_BASE` | the base weights stay frozen: loaded in bf16 when bf16 is on (False) |
| `LOAD_BEST` | the Trainer can restore its best checkpoint at the end (True) |
| `GRADIENT_FREE` | nothing takes a gradient step: no data parallelism, nothing to merge or export (False) |
| `TASKS` | the tasks it works for (all); `TASKS_HINT`: what to use instead elsewhere |
| `VIRTUAL_TOKENS` | trained tokens outside the weights: no packing, merging, export or preference tasks (False) |
| `MERGEABLE` | `tunelab merge` folds it into the base weights (False); else `MERGE_NOTE` says why not |
| `FULL_MODEL` | the run's model/ folder is a whole model (False) |
| `FROZEN_CACHE` | its frozen prefix can be cached across epochs (train.cache_frozen) (False) |
| `PROBE_SKIP` | why the earlier-task forgetting probe does not apply (None) |
| `NOT_EXPORTABLE` | why it cannot be exported (None) |
| `SEEDLESS` | train.seed changes nothing it computes: a several-seed compare trains it once (False) |
"""
from typing import Annotated, Union

from pydantic import Field

from . import adapter, dora, features, full, head, ia3, icl, last_layers, lora, prefix, prompt, qlora

_ALL = (features, head, last_layers, full, lora, dora, qlora, prefix, prompt, ia3, adapter, icl)
METHODS = {m.Options.model_fields["name"].default: m for m in _ALL}

MethodOptions = Annotated[Union[tuple(m.Options for m in METHODS.values())], Field(discriminator="name")]

_DEFAULTS = {"FROZEN_BASE": False, "LOAD_BEST": True, "GRADIENT_FREE": False, "TASKS": None, "TASKS_HINT": None,
             "VIRTUAL_TOKENS": False, "MERGEABLE": False, "MERGE_NOTE": None, "FULL_MODEL": False,
             "FROZEN_CACHE": False, "PROBE_SKIP": None, "NOT_EXPORTABLE": None, "SAVED_FILE": None,
             "SEEDLESS": False}


def trait(name: str, key: str):
    """Method `name`'s declared trait `key` (see the table above), or its default."""
    return getattr(METHODS[name], key, _DEFAULTS[key])


def with_trait(key: str) -> list[str]:
    """The methods whose `key` trait is set (for messages that list them)."""
    return [name for name in METHODS if trait(name, key)]


__all__ = ["METHODS", "MethodOptions", "trait", "with_trait"]
