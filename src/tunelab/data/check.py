"""`tunelab data check CONFIG`: what the data of a config looks like before anything trains — split sizes,
label balance, lengths in the model's tokens (and how many exceed model.max_length), duplicates, and texts that
appear both in train and in validation/test (leakage)."""
from __future__ import annotations

from .leakage import find_leaks


def check(config) -> dict:
    """The report as a dict (printed by `format_report`, or as JSON)."""
    import numpy as np
    from transformers import AutoTokenizer

    from ..models import resolve
    from ..tasks import TASKS

    task = TASKS[config.task]
    quiet = config.model_copy(update={"data": config.data.model_copy(update={"leakage": "ignore"})})
    splits = task.load_splits(quiet)
    tokenizer = AutoTokenizer.from_pretrained(resolve(config.model.name))
    # lengths are counted before truncation on purpose; without this, transformers warns that a text is longer
    # than the model takes (the report counts those: over_max_length)
    tokenizer.model_max_length = int(1e9)
    report = {"task": config.task, "max_length": config.model.max_length, "splits": {}, "leakage": {}}
    if splits.stream is not None:  # data.streaming: the first rows of the stream stand for train (checked as read)
        splits.train = stream_head(splits.stream, STREAM_HEAD)
        report["streamed_head"] = STREAM_HEAD
    for name in ("train", "validation", "test"):
        frame = getattr(splits, name)
        if not len(frame):
            continue
        info = {"examples": len(frame)}
        if splits.labels:
            counts = frame[config.data.label].astype(str).value_counts()
            info["labels"] = {label: int(counts.get(label, 0)) for label in splits.labels}
        lengths = task.token_lengths(config, frame, tokenizer)
        info["tokens"] = {"min": int(lengths.min()), "median": int(np.median(lengths)),
                          "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max()),
                          "over_max_length": int((lengths > config.model.max_length).sum())}
        if len(lengths) != len(frame):  # sft chats: one training row per assistant turn
            info["rows"] = len(lengths)
        if "_text_key" in frame:
            dup = frame[frame["_text_key"].duplicated(keep=False)]
            info["duplicates"] = int(frame["_text_key"].duplicated().sum())
            if splits.labels and len(dup):
                labels = dup.groupby("_text_key")[config.data.label].nunique()
                info["conflicting_duplicates"] = int((labels > 1).sum())
        report["splits"][name] = info
        if name != "train" and "_text_key" in frame:
            leaks = find_leaks(splits.train, frame)
            report["leakage"][name] = {"examples": len(leaks),
                                       "rows": [int(r) for r in leaks["_row"].head(5)] if "_row" in leaks else [],
                                       "texts": [t[:80] for t in leaks["_text_key"].head(3)]}
    return report


STREAM_HEAD = 1000


def stream_head(stream, n: int):
    """The first `n` train documents of a stream as a table (leaked ones kept, so the check can report them)."""
    import dataclasses

    import pandas as pd

    from .splits import add_text_key
    from .types import ROW

    head = dataclasses.replace(stream, held_out=frozenset(), limit=n, counts={"read": 0, "leaked": 0})
    frame = pd.DataFrame({stream.column: list(head.texts())})
    frame.insert(0, ROW, range(1, len(frame) + 1))
    return add_text_key(frame, stream.column, None)


def format_report(report: dict, source: str) -> str:
    lines = [f"{source}: task {report['task']}, model.max_length {report['max_length']}"]
    if "streamed_head" in report:
        lines.append(f"  train is streamed (data.streaming): its first {report['streamed_head']:,} documents are "
                     f"checked here; the rest are checked as training reads them")
    for name, info in report["splits"].items():
        t = info["tokens"]
        rows = f" → {info['rows']:,} rows (one per assistant turn)" if "rows" in info else ""
        line = (f"  {name:>10}: {info['examples']:>6,} examples{rows} · tokens min {t['min']} / median {t['median']} / "
                f"p95 {t['p95']} / max {t['max']}")
        if t["over_max_length"]:
            line += f" · {t['over_max_length']} over max_length (cut or dropped)"
        if t["over_max_length"] and "rows" in info:
            line = line.replace("over max_length", "rows over max_length")
        lines.append(line)
        if "labels" in info:
            total = sum(info["labels"].values()) or 1
            lines.append("              labels: " + ", ".join(f"{k} {v} ({100 * v / total:.0f}%)"
                                                          for k, v in info["labels"].items()))
        if info.get("duplicates"):
            conflict = info.get("conflicting_duplicates")
            lines.append(f"              duplicates: {info['duplicates']} repeated text(s)"
                         + (f", {conflict} with conflicting labels" if conflict else ""))
    leaks = {k: v for k, v in report["leakage"].items() if v["examples"]}
    if leaks:
        for name, v in leaks.items():
            lines.append(f"  LEAKAGE: {v['examples']} {name} example(s) also in train (rows {v['rows']}, e.g. "
                         f"{v['texts'][0]!r}); their scores would overstate the model")
    else:
        lines.append("  leakage: none (no validation/test text also in train)")
    return "\n".join(lines)
