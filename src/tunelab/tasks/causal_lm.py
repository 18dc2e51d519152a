"""`causal_lm`: continued pre-training of a causal LM on raw text (one document per row), every token trained.

Long documents are cut into model.max_length pieces when packing (the default here: nothing is lost), else cut
or dropped by data.overflow. Metrics: test loss and perplexity; forgetting on general text.
"""
from __future__ import annotations

import sys

from . import generative
from .generative import EncodedSplit, encode_text

NAME = "causal_lm"
DATA_FIELDS = frozenset({"text", "overflow"})
METRICS = ("loss",)
KIND, USE = "generator", "`tunelab generate`"
PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_HEAD = "causal-lm"  # the head it builds (checked to exist before any work)
CAUSAL_LM, SERVES, BASELINE = True, "generate", True
PACKING = PACKING_DEFAULT = True  # raw text packs without changing what an example is
STREAMING = True  # a document is one row: nothing needs the whole file before training


def check(config) -> list[str]:
    return []


def load_splits(config):
    from ..data import text_splits

    return text_splits(config)


def eval_table(spec: str, config):
    from ..data import text_table

    return text_table(spec, config.data.text, config.data.numbers_as_text)


def encode(config, frame, tokenizer) -> EncodedSplit:
    data = config.data
    return encode_text(list(frame[data.text]), tokenizer, config.model.max_length, data.overflow,
                       split_long=config.packing)


build_trainer, fit, evaluate, load, evaluate_file, evaluate_base, report, token_lengths = \
    generative.protocol(sys.modules[__name__])
