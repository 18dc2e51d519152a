"""Split one table into train/validation/test: seeded, stratified by label, grouped so no group straddles."""
from __future__ import annotations

import pandas as pd

from ..errors import DataError
from .leakage import normalise


def split_table(frame: pd.DataFrame, *, validation: float, test: float, seed: int, stratify: bool,
                label: str, group_by: str | None, source: str) -> dict[str, pd.DataFrame]:
    """Split by fractions of groups. Groups are `group_by` values, else normalised texts (so duplicates stay
    together and the split itself cannot leak). Stratification uses each group's most common label."""
    if group_by is not None and group_by not in frame.columns:
        raise DataError(f"{source}: data.split.group_by column `{group_by}` not found; columns: "
                        f"{', '.join(c for c in frame.columns if not c.startswith('_'))}")
    from sklearn.model_selection import train_test_split  # scikit-learn costs ~1 s to import; only when splitting

    keys = frame[group_by].astype(str) if group_by else frame["_text_key"]
    groups = pd.DataFrame({"key": keys, "label": frame[label]}).groupby("key", sort=True)["label"]
    table = groups.agg(lambda s: s.mode().iloc[0]).reset_index()

    def cut(part: pd.DataFrame, fraction: float, what: str):
        if fraction == 0:
            return part, part.iloc[:0]
        try:
            return train_test_split(part, test_size=fraction, random_state=seed,
                                    stratify=part["label"] if stratify else None)
        except ValueError as exc:
            raise DataError(f"{source}: cannot split off {what} ({exc}); add data, lower data.split.{what}, "
                            f"or set data.split.stratify: false") from None

    rest, test_groups = cut(table, test, "test")
    train_groups, val_groups = cut(rest, validation / (1 - test) if validation else 0, "validation")
    out = {}
    for name, part in (("train", train_groups), ("validation", val_groups), ("test", test_groups)):
        out[name] = frame[keys.isin(set(part["key"]))].reset_index(drop=True)
    return out


def add_text_key(frame: pd.DataFrame, text: str, text_pair: str | None) -> pd.DataFrame:
    key = frame[text].map(normalise)
    if text_pair:
        key = key + "\x1f" + frame[text_pair].map(normalise)
    return frame.assign(_text_key=key)
