"""`full`: update every weight (the articles' "finetuning II")."""
from typing import Literal

from torch import nn

from ..schema import Section

DEFAULT_LR = 5e-5


class Options(Section):
    name: Literal["full"] = "full"


def prepare(model: nn.Module, options: Options, new_modules: list[str], **_) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
