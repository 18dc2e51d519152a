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
# the base weights stay frozen: with bf16 on they are loaded in bf16 (precision.base_dtype)
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
    target_modules: Literal["auto", "all-linear"] | list[str] | str = "auto"
    """Linear layers to adapt: `auto` (attention projections found in the model), `all-linear`, a list of names
    (the last part of a module's name, e.g. [q_proj, v_proj]), or one regular expression matched against the
    whole module name (PEFT's rule), e.g. `.*layers\\.(1[0-9]|2[0-9])\\.self_attn\\.(q|v)_proj`."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): slower per step, sometimes better at low rank."""
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """How the adapter starts (PEFT's `init_lora_weights`); every choice starts as the unchanged model.
    `default`: A Kaiming-uniform, B zero. `gaussian`: A Gaussian (scaled by rank), B zero. `pissa`: A and B from the
    top-r singular vectors of each weight, which keeps only the residual (PiSSA: often converges faster). `olora`:
    A and B from a QR decomposition of each weight (OLoRA). pissa and olora change the base weights they adapt, so
    loading the adapter repeats the decomposition (seconds on small models). LoftQ is not offered: PEFT computes
    it on CUDA only."""
    rslora: bool = False
    """Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r, so higher ranks keep
    learning instead of being scaled down."""


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
    init = True if options.init == "default" else options.init
    return wrap(model, LoraConfig, task_type, new_modules, r=options.r, lora_alpha=options.alpha,
                lora_dropout=options.dropout, target_modules=targets, use_dora=options.dora,
                init_lora_weights=init, use_rslora=options.rslora)
