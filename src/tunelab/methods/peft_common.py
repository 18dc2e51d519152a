"""What the PEFT-based methods share: the PEFT task type of a tunelab task, and keeping new modules trainable."""
from __future__ import annotations

import dataclasses

TASK_TYPES = {"classify": "SEQ_CLS", "sft": "CAUSAL_LM", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM",
              "reward": "SEQ_CLS", "dpo": "CAUSAL_LM", "rl": "CAUSAL_LM"}


def wrap(model, config_cls, task: str, new_modules: list[str], **options):
    """`get_peft_model` with the task type of `task`; modules the checkpoint lacked (a new classification head)
    are trained and saved with the adapter, so a reload predicts the same."""
    from peft import get_peft_model

    fields = {f.name for f in dataclasses.fields(config_cls)}
    if new_modules and "modules_to_save" in fields:
        options["modules_to_save"] = new_modules
    return get_peft_model(model, config_cls(task_type=TASK_TYPES[task], **options))
