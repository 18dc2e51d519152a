"""Fine-tuning methods: one module each, registered here.

Each module defines `Options` (its config section, discriminated by `name`) and `DEFAULT_LR`. Gradient methods
define `prepare(model, options, new_modules) -> model`, which freezes or wraps the model for training;
`features` instead fits a classifier on frozen embeddings.
"""
from typing import Annotated, Union

from pydantic import Field

from . import features, full, head, last_layers, lora

METHODS = {m.Options.model_fields["name"].default: m for m in (features, head, last_layers, full, lora)}

MethodOptions = Annotated[Union[tuple(m.Options for m in METHODS.values())], Field(discriminator="name")]

__all__ = ["METHODS", "MethodOptions"]
