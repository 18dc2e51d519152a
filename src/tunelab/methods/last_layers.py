"""`last_layers`: train the last N transformer blocks plus everything after them (pooler/final norm, head)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..schema import Section
from .freezing import freeze_all, modules_after_blocks, transformer_blocks, unfreeze

DEFAULT_LR = 1e-4
FULL_MODEL = True  # model/ holds the whole model: nothing to merge
# the frozen embeddings and blocks are run once per example and cached (train.cache_frozen)
FROZEN_CACHE = True


class Options(Section):
    name: Literal["last_layers"] = "last_layers"
    layers: int = Field(2, ge=1)
    """How many of the last transformer blocks to train."""


def prepare(model, options: Options, new_modules: list[str], **_):
    blocks_name, blocks = transformer_blocks(model)
    if options.layers > len(blocks):
        raise ValueError(f"method.layers is {options.layers} but the model has only {len(blocks)} blocks")
    freeze_all(model)
    first = len(blocks) - options.layers
    unfreeze(model, [f"{blocks_name}.{i}" for i in range(first, len(blocks))])
    unfreeze(model, modules_after_blocks(model, blocks_name) + new_modules)
    return model
