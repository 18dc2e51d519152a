"""`prompt`: soft prompt tuning (Lester et al., 2021) through PEFT — trained embeddings prepended to the input.

The smallest method: `virtual_tokens` × hidden numbers (5,760 for SmolLM2-135M at 10 tokens). `init_text`
starts the soft prompt from the embeddings of a text such as "Translate English to French:", which trains far
faster than a random start on small models. Needs a high learning rate (PEFT's examples: 3e-2).
"""
from typing import Literal

from pydantic import Field

from ..schema import Section
from .peft_common import wrap

# transformers cannot load a prompt-learning checkpoint back into the training model (load_best_model_at_end
# raises after training): the final model is kept, and early stopping is refused.
LOAD_BEST = False
DEFAULT_LR = 3e-2
# the base weights stay frozen: with bf16 on they are loaded in bf16 (train.base_dtype())
FROZEN_BASE = True


class Options(Section):
    name: Literal["prompt"] = "prompt"
    virtual_tokens: int = Field(20, ge=1, le=512)
    """Length of the soft prompt, in embeddings."""
    init_text: str | None = None
    """Initialise the soft prompt from this text's token embeddings (repeated or cut to `virtual_tokens`);
    default: random."""


def prepare(model, options: Options, new_modules: list[str], *, task: str = "classify", model_dir=None, **_):
    from peft import PromptTuningConfig

    init = {}
    if options.init_text:
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": options.init_text,
                "tokenizer_name_or_path": str(model_dir)}
    return wrap(model, PromptTuningConfig, task, new_modules, num_virtual_tokens=options.virtual_tokens, **init)
