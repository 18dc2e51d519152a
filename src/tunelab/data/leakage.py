"""Find evaluation examples whose normalised text also appears in the training data."""
from __future__ import annotations

import re
import unicodedata

import pandas as pd

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Case, accents' composition, punctuation and whitespace do not make a text new."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def find_leaks(train: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    """Rows of `other` whose `_text_key` is also in `train`."""
    return other[other["_text_key"].isin(set(train["_text_key"]))]
