"""`prompt`: soft prompt tuning (Lester et al., 2021) through PEFT — trained embeddings prepended to the input.

The smallest method: `virtual_tokens` × hidden numbers (5,760 for SmolLM2-135M at 10 tokens). `init_text`
starts the soft prompt from the embeddings of a text such as "Translate English to French:", which trains far
faster than a random start on small models. Needs a high learning rate (PEFT's examples: 3e-2).
"""
from typing import Literal

from pydantic import Field

from ..schema import Section
from .peft_common import wrap

# prompt learning: what prefix tuning declares holds for it too (no best-checkpoint reload, virtual tokens, a
# frozen base)
from .prefix import FROZEN_BASE, LOAD_BEST, MERGE_NOTE, NOT_EXPORTABLE, VIRTUAL_TOKENS  # noqa: E402, F401

DEFAULT_LR, PROBE_SKIP = 3e-2, "prompt tuning changes the input, not the encoder"


class Options(Section):
    name: Literal["prompt"] = "prompt"
    virtual_tokens: int = Field(20, ge=1, le=512)
    """Length of the soft prompt, in embeddings."""
    init_text: str | None = None
    """Initialise the soft prompt from this text's token embeddings (repeated or cut to `virtual_tokens`);
    default: random."""


def prepare(model, options: Options, new_modules: list[str], *, task_type: str = "SEQ_CLS", model_dir=None, **_):
    from peft import PromptTuningConfig

    init = {}
    if options.init_text:
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": options.init_text,
                "tokenizer_name_or_path": str(model_dir)}
    return wrap(model, PromptTuningConfig, task_type, new_modules, num_virtual_tokens=options.virtual_tokens, **init)
