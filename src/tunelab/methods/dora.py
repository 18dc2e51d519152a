"""`dora`: weight-decomposed low-rank adaptation (Liu et al., 2024) — LoRA on the direction of each weight plus a
trained magnitude vector. Same options as `lora`; PEFT implements it (`use_dora`)."""
from typing import Literal

from . import lora

DEFAULT_LR = lora.DEFAULT_LR
MERGEABLE = True
# the base weights stay frozen: with bf16 on they are loaded in bf16 (precision.base_dtype)
FROZEN_BASE = True


class Options(lora.Options):
    name: Literal["dora"] = "dora"
    dora: bool = True
    """Always on for this method (kept so a `lora` config can switch method by name alone)."""


def prepare(model, options: Options, new_modules: list[str], **context):
    return lora.prepare(model, options.model_copy(update={"dora": True}), new_modules, **context)
