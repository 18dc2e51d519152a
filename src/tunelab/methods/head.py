"""`head`: freeze every transformer block and the embeddings; train only the output layers above them.

The articles' "finetuning I" (DistilBERT's pre_classifier + classifier). Generically: every module after the
last transformer block — BERT's pooler and the new classifier, a decoder's final norm and score head — plus
any module the checkpoint did not contain, so nothing randomly initialised stays frozen.
"""
from __future__ import annotations

from typing import Literal

from ..schema import Section
from .freezing import freeze_all, modules_after_blocks, transformer_blocks, unfreeze

# Chosen on minilm validation: 3e-3 (86.8%) over 1e-2 (85.5%, bumpy val loss); 1e-3 under-trains the head.
DEFAULT_LR = 3e-3
FULL_MODEL = True  # model/ holds the whole model: nothing to merge
# the frozen embeddings and blocks are run once per example and cached (train.cache_frozen)
FROZEN_CACHE = True


class Options(Section):
    name: Literal["head"] = "head"


def prepare(model, options: Options, new_modules: list[str], **_):
    blocks_name, _ = transformer_blocks(model)
    freeze_all(model)
    unfreeze(model, modules_after_blocks(model, blocks_name) + new_modules)
    return model
