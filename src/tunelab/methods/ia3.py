"""`ia3`: (IA)³ (Liu et al., 2022) through PEFT — trained vectors that rescale keys, values and the FFN.

Fewer parameters than LoRA (57,600 on SmolLM2-135M) and can be merged into the weights. PEFT knows the layers
for common architectures (Llama: k_proj, v_proj, down_proj; BERT: key, value, output.dense); name them for
others. The IA3 paper trains at 3e-3.
"""
from typing import Literal

from ..schema import Section
from .peft_common import wrap

DEFAULT_LR = 3e-3
MERGEABLE = True  # `tunelab merge` folds the rescaling vectors into the weights
# the base weights stay frozen: with bf16 on they are loaded in bf16 (precision.base_dtype)
FROZEN_BASE = True


class Options(Section):
    name: Literal["ia3"] = "ia3"
    target_modules: Literal["auto"] | list[str] = "auto"
    """Layers whose output is rescaled; `auto`: PEFT's choice for the architecture."""
    feedforward_modules: list[str] | None = None
    """Which of `target_modules` are feed-forward layers (rescaled on their input); needed with a list."""


def prepare(model, options: Options, new_modules: list[str], *, task_type: str = "SEQ_CLS", **_):
    from peft import IA3Config

    if options.target_modules == "auto":
        kwargs = {}
    else:
        if options.feedforward_modules is None:
            raise ValueError("method.feedforward_modules must name which target_modules are feed-forward layers "
                             "(e.g. [down_proj]) when target_modules is a list")
        kwargs = {"target_modules": options.target_modules, "feedforward_modules": options.feedforward_modules}
    return wrap(model, IA3Config, task_type, new_modules, **kwargs)
