"""`lora`: low-rank adapters through PEFT (DoRA with `dora: true`); the new head is trained and saved with them.

PEFT only saves what is listed in `modules_to_save`; a randomly initialised module left out of it would be
re-initialised differently on reload and the model would predict differently. So every module the checkpoint
did not contain (head, and pooler if missing) goes into `modules_to_save`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..schema import Section
from .freezing import transformer_blocks
from .peft_common import wrap

DEFAULT_LR = 5e-4
MERGEABLE = True  # `tunelab merge` folds the adapter into the base weights
# the base weights stay frozen: with bf16 on they are loaded in bf16 (train.base_dtype())
FROZEN_BASE = True

# Linear layers inside the blocks that LoRA adapts by default: the attention projections.
_ATTENTION_NAMES = {"query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "qkv_proj",
                    "Wqkv", "q", "k", "v", "q_lin", "k_lin", "v_lin", "in_proj"}


class Options(Section):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1)
    """Rank of the update matrices."""
    alpha: float = Field(16, gt=0)
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: Literal["auto", "all-linear"] | list[str] = "auto"
    """Linear layers to adapt: `auto` (attention projections found in the model), `all-linear`, or names."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): slower per step, sometimes better at low rank."""


def auto_targets(model) -> list[str]:
    """Names (last component) of the attention projections inside the transformer blocks."""
    from torch import nn

    blocks_name, _ = transformer_blocks(model)
    found = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if name.startswith(blocks_name + ".") and isinstance(m, nn.Linear)
        and name.rsplit(".", 1)[-1] in _ATTENTION_NAMES
    }
    if not found:
        raise ValueError(f"could not find attention projections in {type(model).__name__}; set "
                         f"method.target_modules to a list of linear layer names or `all-linear`")
    return sorted(found)


def prepare(model, options: Options, new_modules: list[str], *, task_type: str = "SEQ_CLS", **_):
    from peft import LoraConfig

    targets = auto_targets(model) if options.target_modules == "auto" else options.target_modules
    return wrap(model, LoraConfig, task_type, new_modules, r=options.r, lora_alpha=options.alpha,
                lora_dropout=options.dropout, target_modules=targets, use_dora=options.dora)
