"""What the PEFT-based methods share: wrapping the model, keeping new modules trainable."""
from __future__ import annotations

import dataclasses


def wrap(model, config_cls, task_type: str, new_modules: list[str], **options):
    """`get_peft_model` with PEFT's `task_type` (each tunelab task declares its own); modules the checkpoint
    lacked (a new classification head) are trained and saved with the adapter, so a reload predicts the same."""
    from peft import get_peft_model

    fields = {f.name for f in dataclasses.fields(config_cls)}
    if new_modules and "modules_to_save" in fields:
        options["modules_to_save"] = new_modules
    return get_peft_model(model, config_cls(task_type=task_type, **options))
