"""JSON Lines, read in one place: a user's data file, a run's own predictions, demonstrations and logs.

`parse(where, number, line)` is one line as its JSON object, or a DataError naming the file and line (not valid
JSON, or valid JSON that is not an object — data of the wrong type is refused, never read as its repr).
`rows(path)` yields (line number, object) for a file, blank lines skipped; `on_bad(number, reason)` turns a bad
line into a call and a skip (the UI shows what it could read of a damaged log and says what it could not).
`read(path)` is the list, `missing_ok` giving [] for a file that is not there (a run that never wrote it).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DataError


def _object(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row


def parse(where, number: int, line: str) -> dict:
    """One line of a JSON Lines file as its object; DataError naming the line otherwise."""
    try:
        return _object(line)
    except ValueError as exc:
        raise DataError(f"{where}, line {number}: {exc}") from None


def rows(path: Path, *, on_bad: Callable[[int, str], None] | None = None,
         limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a UTF-8 file, up to `limit` objects. A bad line raises
    DataError, or with `on_bad` is reported to it and skipped."""
    count = 0
    with open(path, encoding="utf-8-sig", errors="strict" if on_bad is None else "replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = _object(line)
            except ValueError as exc:
                if on_bad is None:
                    raise DataError(f"{path}, line {number}: {exc}") from None
                on_bad(number, str(exc))
                continue
            yield number, row
            count += 1
            if limit is not None and count >= limit:
                return


def read(path: Path, *, missing_ok: bool = False, on_bad: Callable[[int, str], None] | None = None,
         limit: int | None = None) -> list[dict]:
    """The objects of a JSON Lines file (see `rows`); [] for a missing file with `missing_ok`."""
    if missing_ok and not Path(path).exists():
        return []
    return [row for _, row in rows(path, on_bad=on_bad, limit=limit)]
