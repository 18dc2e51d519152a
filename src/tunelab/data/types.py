"""Type checks on the values of a data file: a text column holds strings, a label column names or integers.

Data of the wrong type is refused with the file, the row, the column and what was found — never read as its
Python repr (a list of strings would otherwise train as "['a', 'b']", a float label 0.25 become the class
"0.25"). Numbers in a text column are accepted only with `data.numbers_as_text: true`.
"""
from __future__ import annotations

import numbers

from ..errors import DataError

ROW = "_row"
"""Column added to every table: the 1-based row (for JSON Lines, the line number) used in error messages."""


def kind(value) -> str:
    """What a value is, in words a user recognises from their file."""
    import numpy as np
    if isinstance(value, (bool, np.bool_)):
        return "true/false"
    if isinstance(value, numbers.Integral):
        return "an integer"
    if isinstance(value, numbers.Real):
        return "a number"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "a list"
    if isinstance(value, dict):
        return "an object (mapping)"
    if isinstance(value, bytes):
        return "bytes"
    return f"a {type(value).__name__}"


def is_missing(value) -> bool:
    import numpy as np
    import pandas as pd

    if value is None:
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, (list, tuple, dict, np.ndarray)) else False
    except (TypeError, ValueError):
        return False


def as_list(value):
    """A list-like cell (JSON list, or a Parquet/Arrow array) as a Python list; anything else unchanged."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def text_value(value, column: str, numbers_ok: bool = False) -> str:
    """`value` as text for `column`, or ValueError saying what it is instead."""
    import numpy as np

    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and numbers_ok:
        return _number_text(value)
    hint = " (set data.numbers_as_text: true to read numbers as text)" if isinstance(value, numbers.Real) \
        and not isinstance(value, (bool, np.bool_)) else ""
    raise ValueError(f"`{column}` holds {kind(value)} ({_short(value)}), not text{hint}")


def _number_text(value) -> str:
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _short(value) -> str:
    text = repr(as_list(value))
    return text if len(text) <= 40 else text[:37] + "..."


def check_text_columns(frame, spec: str, columns: list[str], numbers_ok: bool):
    """Refuse (DataError) a non-missing cell of `columns` that is not text; numbers become text when allowed."""
    import pandas as pd

    out = {}
    for col in columns:
        values = frame[col]
        if values.dtype == object and all(isinstance(v, str) or is_missing(v) for v in values):
            continue
        problems, converted = [], []
        for row, value in zip(frame[ROW], values):
            if is_missing(value):
                converted.append(value)
                continue
            try:
                converted.append(text_value(value, col, numbers_ok))
            except ValueError as exc:
                problems.append((row, str(exc)))
        if problems:
            row, what = problems[0]
            more = f"; {len(problems)} row(s) like this" if len(problems) > 1 else ""
            raise DataError(f"{spec}, row {row}: {what}{more}. A text column must hold strings")
        out[col] = pd.Series(converted, index=frame.index, dtype=object)
    return frame.assign(**out) if out else frame


def label_value(value) -> str:
    """A class label as text: strings as they are, integers (and integer-valued numbers, e.g. 1.0) as digits;
    ValueError for a fraction, true/false, a list or a mapping."""
    import numpy as np

    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        raise ValueError("is true/false; write the class names as strings (e.g. \"yes\"/\"no\") or integers")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if float(value).is_integer():
            return str(int(value))
        raise ValueError(f"is the number {float(value)!r}; a class label is a name or an integer class id — a "
                         f"fractional value looks like a score for regression (not a classification task), so it is "
                         f"not turned into a class name")
    raise ValueError(f"holds {kind(value)} ({_short(value)}), not a class name or integer")


def check_labels(frame, spec: str, column: str):
    """The label column as text (a pandas Series); DataError naming the first bad row."""
    import pandas as pd

    labels, problems = [], []
    for row, value in zip(frame[ROW], frame[column]):
        try:
            labels.append(label_value(value))
        except ValueError as exc:
            labels.append(None)
            problems.append((row, str(exc)))
    if problems:
        row, what = problems[0]
        more = f"; {len(problems)} row(s) like this" if len(problems) > 1 else ""
        raise DataError(f"{spec}, row {row}: label `{column}` {what}{more}")
    return pd.Series(labels, index=frame.index, dtype=object)
