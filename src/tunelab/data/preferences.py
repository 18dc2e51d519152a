"""Preference data (tasks reward, dpo) and prompt lists (task rl).

Two layouts, told apart by the columns:
- pairs: `prompt`, `chosen`, `rejected` (one comparison per row);
- rankings: `prompt` and `responses` — a list ordered best first, or with a `scores` column (higher is better) —
  turned into pairs by `data.ranking_pairs`.
A prompt is a string or chat messages ([{role, content}, ...] ending with a user message); a response is a string
(or one assistant message). Rows are split into train/validation/test *before* a ranking becomes pairs, so the
pairs of one ranking never straddle two splits. Bad rows are dropped and counted (or refused: data.bad_rows).
"""
from __future__ import annotations

import json
import numbers
from collections import Counter

import pandas as pd

from ..errors import DataError
from .conversations import prompt_text
from .leakage import normalise
from .readers import ROW, read_table
from .types import as_list, kind


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (
        isinstance(value, str) and not value.strip())


def parse_prompt(value):
    """A prompt as a string or a list of {role, content} messages ending with a user message; ValueError if bad."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a prompt that merely starts with "[{" is text
    value = as_list(value)
    if isinstance(value, list):
        if not value:
            raise ValueError("the prompt is an empty list of messages")
        for i, m in enumerate(value, 1):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"prompt message {i} is not a {{role: system|user|assistant, content}} mapping")
            if _blank(m.get("content")) or not isinstance(m.get("content"), str):
                raise ValueError(f"prompt message {i} ({m.get('role')}) has no content")
        if value[-1]["role"] != "user":
            raise ValueError("a chat prompt must end with a user message (the responses answer it)")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if _blank(value):
        raise ValueError("the prompt is missing or empty")
    if not isinstance(value, str):
        raise ValueError(f"the prompt holds {kind(value)}, not text or a list of chat messages")
    return value


def _response(value, what: str) -> str:
    value = as_list(value)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0].get("content")  # TRL's conversational layout: one assistant message
    if isinstance(value, dict):
        value = value.get("content")
    if _blank(value):
        raise ValueError(f"{what} is missing or empty")
    if not isinstance(value, str):
        raise ValueError(f"{what} holds {kind(value)}, not text")
    return value


def _ranking_pairs(responses: list[str], scores: list[float] | None, mode: str) -> list[tuple[str, str]]:
    """Better/worse pairs of one ranking (best first, or by score; equal scores make no pair)."""
    if scores is None:
        scores = [-i for i in range(len(responses))]
    order = sorted(range(len(responses)), key=lambda i: -scores[i])
    pairs = []
    for a_pos, a in enumerate(order):
        for b in order[a_pos + 1:]:
            if scores[a] > scores[b]:
                pairs.append((responses[a], responses[b]))
        if mode == "best_vs_rest":
            break
    return pairs


def _listed(value, problem: str):
    """A list cell as a list: a JSON list, an Arrow array, or (CSV) the list written as JSON text."""
    value = as_list(value)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(problem) from None
    return value


def _parse_row(record: dict, data, layout: str) -> tuple[object, list[tuple[str, str]]]:
    prompt = parse_prompt(record.get(data.prompt))
    if layout == "pairs":
        chosen, rejected = _response(record.get(data.chosen), "chosen"), _response(record.get(data.rejected),
                                                                                   "rejected")
        if normalise(chosen) == normalise(rejected):
            raise ValueError("chosen and rejected are the same text")
        return prompt, [(chosen, rejected)]
    responses = _listed(record.get(data.responses), f"`{data.responses}` is not a list of responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError(f"`{data.responses}` must list at least two responses")
    texts = [_response(r, f"response {i}") for i, r in enumerate(responses, 1)]
    if len({normalise(t) for t in texts}) < len(texts):
        raise ValueError("two responses of the ranking are the same text")
    scores = None
    if data.scores:
        scores = _listed(record.get(data.scores), f"`{data.scores}` is text, not a list of numbers")
        if not isinstance(scores, list) or len(scores) != len(texts):
            raise ValueError(f"`{data.scores}` must hold one number per response ({len(texts)})")
        if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in scores):
            raise ValueError(f"`{data.scores}` holds a value that is not a number")
        scores = [float(x) for x in scores]
    pairs = _ranking_pairs(texts, scores, data.ranking_pairs)
    if not pairs:
        raise ValueError("every response has the same score: the ranking makes no pair")
    return prompt, pairs


def _report(spec: str, problems: list[str], data, total: int, kept: int, what: str) -> None:
    """Refuse (bad_rows: error) or count the dropped rows; when none is left, say why in the error."""
    if not problems:
        return
    if (data.bad_rows or "drop") == "error":
        more = f" (and {len(problems) - 5} more rows)" if len(problems) > 5 else ""
        raise DataError(f"{spec}: " + "; ".join(problems[:5]) + more +
                        ". Fix the rows, or set data.bad_rows: drop to skip them (they are counted)")
    reasons = Counter(p.split(": ", 1)[1] for p in problems)
    summary = "; ".join(f"{n} × {reason}" for reason, n in reasons.most_common(4))
    if not kept:
        raise DataError(f"{spec}: no usable {what} is left: all {total} row(s) were dropped as bad — {summary} "
                        f"(first: {problems[0].split(':', 1)[0]})")
    print(f"tunelab: dropped {len(problems)} of {total} row(s) of {spec} (data.bad_rows: drop): {summary} "
          f"(first: {problems[0].split(':', 1)[0]})")


def preference_table(spec: str, data) -> pd.DataFrame:
    """One row per source row: `_prompt`, `_pairs` [(chosen, rejected), ...], `_text_key` (the row's identity)."""
    frame = read_table(spec)
    columns = [c for c in frame.columns if not c.startswith("_")]
    if {data.chosen, data.rejected} <= set(columns):
        layout, needed = "pairs", [data.prompt, data.chosen, data.rejected]
    elif data.responses in columns:
        layout, needed = "ranking", [data.prompt, data.responses] + ([data.scores] if data.scores else [])
    else:
        raise DataError(f"{spec}: preference data needs `{data.prompt}` with `{data.chosen}` + `{data.rejected}` "
                        f"(pairs) or `{data.responses}` (a ranking); its columns are: {', '.join(columns)}. Set "
                        f"data.prompt / data.chosen / data.rejected / data.responses to the column names")
    if data.prompt not in columns:  # a missing prompt column is a file problem, not a row problem
        raise DataError(f"{spec}: column `{data.prompt}` (data.prompt) not found; its columns are: "
                        f"{', '.join(columns)}")
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{spec}: column {', '.join(f'`{c}`' for c in missing)} not found; its columns are: "
                        f"{', '.join(columns)}")
    keep, prompts, pairs, keys, problems = [], [], [], [], []
    for i, record in enumerate(frame.to_dict("records")):
        try:
            prompt, row_pairs = _parse_row(record, data, layout)
        except ValueError as exc:
            problems.append(f"row {record[ROW]}: {exc}")
            continue
        keep.append(i)
        prompts.append(prompt)
        pairs.append(row_pairs)
        keys.append(normalise(prompt_text(prompt) + " " + " ".join(c + " " + r for c, r in row_pairs)))
    _report(spec, problems, data, len(frame), len(keep), "preference row")
    return frame.iloc[keep].assign(_prompt=prompts, _pairs=pairs, _text_key=keys).reset_index(drop=True)


def prompt_table(spec: str, data) -> pd.DataFrame:
    """task rl: one prompt per row (`_prompt`), other columns kept (a reward function receives them)."""
    frame = read_table(spec)
    if data.prompt not in frame.columns:
        raise DataError(f"{spec}: column `{data.prompt}` (data.prompt) not found; its columns are: "
                        f"{', '.join(c for c in frame.columns if not c.startswith('_'))}")
    keep, prompts, problems = [], [], []
    for i, record in enumerate(frame.to_dict("records")):
        try:
            prompts.append(parse_prompt(record.get(data.prompt)))
            keep.append(i)
        except ValueError as exc:
            problems.append(f"row {record[ROW]}: {exc}")
    _report(spec, problems, data, len(frame), len(keep), "prompt")
    return frame.iloc[keep].assign(_prompt=prompts, _text_key=[normalise(prompt_text(p)) for p in prompts]) \
        .reset_index(drop=True)


def expand_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (chosen, rejected) pair, with its source `_row` and `_prompt`."""
    rows = [{ROW: r[ROW], "_prompt": r["_prompt"], "_chosen": c, "_rejected": j, "_text_key": r["_text_key"]}
            for r in frame.to_dict("records") for c, j in r["_pairs"]]
    return pd.DataFrame(rows, columns=[ROW, "_prompt", "_chosen", "_rejected", "_text_key"])
