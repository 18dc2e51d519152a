"""`full`: update every weight (the articles' "finetuning II")."""
from __future__ import annotations

from typing import Literal

from ..schema import Section

DEFAULT_LR = 5e-5
FULL_MODEL = True  # model/ holds the whole model: nothing to merge


class Options(Section):
    name: Literal["full"] = "full"


def prepare(model, options: Options, new_modules: list[str], **_):
    for p in model.parameters():
        p.requires_grad_(True)
    return model
