"""Data: readers for every file format (readers.py), type checks on values (types.py), row layouts — conversations
(conversations.py) and preference pairs / rankings (preferences.py) —, splits and leakage, and the loaders that
put them together for a run (load.py). `tunelab data check` is check.py.

The loaders are imported on first use (the names below), so reading a config does not import pandas.
"""
from __future__ import annotations

_LAZY = ("Splits", "classification_splits", "conversation_splits", "text_splits", "preference_splits",
         "load_eval_table", "conversation_table", "text_table", "file_hash")
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        from . import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
