"""RUN/engines.json: each generation engine's parity with the trained model, as its check recorded it (the
engines write their entry; `tunelab generate`, compare's report and the UI read it through generation.parity_table)."""
from __future__ import annotations

import json
from pathlib import Path

RECORD = "engines.json"


def read_record(path: Path) -> dict:
    try:
        return json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def record_parity(path: Path, engine: str, result: dict) -> None:
    """RUN/engines.json[engine] = result (written atomically; other engines' entries kept)."""
    from ..folders import write_json

    record = read_record(path)
    record[engine] = result
    write_json(Path(path) / RECORD, record)
