"""`last_layers`: train the last N transformer blocks plus everything after them (pooler/final norm, head)."""
from typing import Literal

from pydantic import Field
from torch import nn

from ..schema import Section
from .freezing import freeze_all, modules_after_blocks, transformer_blocks, unfreeze

DEFAULT_LR = 1e-4


class Options(Section):
    name: Literal["last_layers"] = "last_layers"
    layers: int = Field(2, ge=1)
    """How many of the last transformer blocks to train."""


def prepare(model: nn.Module, options: Options, new_modules: list[str], **_) -> nn.Module:
    blocks_name, blocks = transformer_blocks(model)
    if options.layers > len(blocks):
        raise ValueError(f"method.layers is {options.layers} but the model has only {len(blocks)} blocks")
    freeze_all(model)
    first = len(blocks) - options.layers
    unfreeze(model, [f"{blocks_name}.{i}" for i in range(first, len(blocks))])
    unfreeze(model, modules_after_blocks(model, blocks_name) + new_modules)
    return model
