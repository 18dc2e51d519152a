"""Fine-tuning methods: one module each, registered here.

Each module defines `Options` (its config section, discriminated by `name`) and `DEFAULT_LR`. Gradient methods
define `prepare(model, options, new_modules, *, task, model_dir) -> model`, which freezes or wraps the model for
training; `features` instead fits a classifier on frozen embeddings. Optional hooks: `check(options)` (can this
machine run it? called before any work), `load_kwargs(options)` (extra `from_pretrained` arguments),
`save(model, dir)` / `load(base, dir)` (a saved format other than a PEFT adapter or a full model). `icl`
trains nothing: it scores label words with prompts (see its module).
"""
from typing import Annotated, Union

from pydantic import Field

from . import adapter, dora, features, full, head, ia3, icl, last_layers, lora, prefix, prompt, qlora

_ALL = (features, head, last_layers, full, lora, dora, qlora, prefix, prompt, ia3, adapter, icl)
METHODS = {m.Options.model_fields["name"].default: m for m in _ALL}

MethodOptions = Annotated[Union[tuple(m.Options for m in METHODS.values())], Field(discriminator="name")]

__all__ = ["METHODS", "MethodOptions"]
