"""`prefix`: prefix tuning (Li & Liang, 2021) through PEFT — trained key/value vectors prepended at every layer.

The model's weights stay frozen; only `virtual_tokens` × layers × 2 × hidden numbers train (0.09% of
SmolLM2-135M at 10 tokens). Needs a much higher learning rate than LoRA: PEFT's own examples use 1e-2.
"""
from typing import Literal

from pydantic import Field

from ..schema import Section
from .peft_common import wrap

# transformers cannot load a prompt-learning checkpoint back into the training model (load_best_model_at_end
# raises after training): the final model is kept, and early stopping is refused.
LOAD_BEST = False
# trained vectors outside the network's weights: they cannot be merged or exported as one graph, packed examples
# would share them (PEFT ignores position ids), and TRL's preference trainers do not handle them
VIRTUAL_TOKENS = True
PROBE_SKIP = "prefix tuning changes the attention inputs, not the encoder's weights"
NOT_EXPORTABLE = ("its virtual tokens are not part of the network's weights, so there is no single graph to export; "
                  "serve it with `tunelab serve`")
MERGE_NOTE = "its virtual tokens cannot be folded into the weights; serve it as an adapter on the base model"
DEFAULT_LR = 1e-2
# the base weights stay frozen: with bf16 on they are loaded in bf16 (precision.base_dtype)
FROZEN_BASE = True


class Options(Section):
    name: Literal["prefix"] = "prefix"
    virtual_tokens: int = Field(20, ge=1, le=512)
    """Length of the trained prefix, in positions."""
    projection: bool = False
    """Reparameterise the prefix through a two-layer MLP (the paper's trick for stable training; more
    parameters while training, the same adapter size after)."""


def prepare(model, options: Options, new_modules: list[str], *, task_type: str = "SEQ_CLS", **_):
    from peft import PrefixTuningConfig

    return wrap(model, PrefixTuningConfig, task_type, new_modules, num_virtual_tokens=options.virtual_tokens,
                prefix_projection=options.projection)
