"""Dotted config keys (`train.lr`, `method.r`), set in a raw config mapping the one way every writer of configs
does it: `--set`, compare's entries and sweeps, search's trials and the UI's form."""
from __future__ import annotations

import copy


def set_key(raw: dict, dotted: str, value) -> str | None:
    """raw[a][b][c] = value for `a.b.c` (a copy of it; missing sections made; `method: lora` shorthand widened to
    `method: {name: lora}`); returns a problem when a part of the path holds a value, not a section, else None."""
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if isinstance(node.get(part), str) and part == "method":  # `method: lora` shorthand
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return f"`{part}` is not a section"
    node[parts[-1]] = copy.deepcopy(value)
    return None
