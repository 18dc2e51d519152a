"""Loading a run's data: read the files, check columns, types and labels, split, and check for leakage — one loader
per row layout (`classification_splits`, `conversation_splits`, `text_splits`, `preference_splits`); each task
picks its own (`tunelab.tasks.load_splits(config)`).

Every table carries `_row` (row in its source file, for messages), `_text_key` (normalised text, for grouping and
leakage checks) and `label` as a string from the run's label set.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pandas as pd

from ..errors import DataError
from .leakage import find_leaks
from .readers import HUB, ROW, read_hub, read_table, resolve_path
from .splits import add_text_key, split_table
from .types import check_labels, check_text_columns


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    files: dict[str, str] = field(default_factory=dict)
    """Source spec → sha256 of each file read."""
    leaks: dict[str, int] = field(default_factory=dict)
    replay: pd.DataFrame | None = None
    """sft: general text (`text` column) mixed into training against forgetting (data.replay)."""
    stream: object | None = None
    """data.streaming: the training rows as a `data.stream.TextStream` (read while training); `train` is empty."""

    def sizes(self) -> dict[str, int | None]:
        train = None if self.stream is not None else len(self.train)  # a stream's length is not known beforehand
        return {"train": train, "validation": len(self.validation), "test": len(self.test)}


def file_hash(spec: str) -> str:
    if spec.startswith(HUB):  # the Hub dataset's own fingerprint of the rows read (cached, so no second download)
        return read_hub(spec)._fingerprint[:16]
    path = resolve_path(spec)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        with open(p, "rb") as f:  # in chunks: a streamed corpus may not fit in memory
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def _check_columns(frame: pd.DataFrame, spec: str, data) -> pd.DataFrame:
    columns = [c for c in frame.columns if not c.startswith("_")]
    wanted = [("data.text", data.text), ("data.label", data.label)]
    if data.text_pair:
        wanted.append(("data.text_pair", data.text_pair))
    missing = [f"`{col}` (set by {key})" for key, col in wanted if col not in frame.columns]
    if missing:
        raise DataError(f"{spec}: column {' and '.join(missing)} not found; its columns are: {', '.join(columns)}")
    problems = []
    for _, col in wanted:
        blank = frame[col].isna() | (frame[col].astype(str).str.strip() == "")
        for row in frame.loc[blank, ROW].head(5):
            problems.append(f"row {row}: `{col}` is empty")
        if blank.sum() > 5:
            problems.append(f"... and {blank.sum() - 5} more rows with an empty `{col}`")
    if problems:
        raise DataError(f"{spec}: " + "; ".join(problems))
    frame = check_text_columns(frame, spec, [col for key, col in wanted if key != "data.label"],
                               data.numbers_as_text)
    frame = frame.assign(**{data.label: check_labels(frame, spec, data.label)})
    return add_text_key(frame, data.text, data.text_pair)


def _check_labels(frame: pd.DataFrame, spec: str, label_col: str, labels: list[str]) -> None:
    unknown = frame[~frame[label_col].isin(labels)]
    if len(unknown):
        first = unknown.iloc[0]
        raise DataError(
            f"{spec}, row {first[ROW]}: label {first[label_col]!r} is not one of the known labels "
            f"({', '.join(labels)}); {len(unknown)} row(s) affected. Fix the data, or list every label in data.labels"
        )


def _sorted_labels(values) -> list[str]:
    unique = sorted(set(values))
    try:
        return sorted(unique, key=float)
    except ValueError:
        return unique


def classification_splits(config) -> Splits:
    """Texts and labels: read, type-checked, split by label (unless eval files are given), checked for leakage."""
    data = config.data
    train = _check_columns(read_table(data.train), data.train, data)
    files = {data.train: file_hash(data.train)}
    given = {}
    for name in ("validation", "test"):
        spec = getattr(data, name)
        if spec:
            given[name] = _check_columns(read_table(spec), spec, data)
            files[spec] = file_hash(spec)
    labels = list(data.labels) if data.labels else _sorted_labels(train[data.label])
    if len(labels) < 2:
        raise DataError(f"{data.train}: a classifier needs at least two labels in `{data.label}`; found "
                        f"{', '.join(labels) or 'none'}")
    _check_labels(train, data.train, data.label, labels)
    for name, frame in given.items():
        _check_labels(frame, getattr(data, name), data.label, labels)

    fractions = {"validation": data.split.validation, "test": data.split.test}
    for name in given:
        fractions[name] = 0.0
    parts = split_table(train, validation=fractions["validation"], test=fractions["test"], seed=data.split.seed,
                        stratify=data.split.stratify, label=data.label, group_by=data.split.group_by,
                        source=data.train)
    parts.update(given)
    if data.max_train_examples and len(parts["train"]) > data.max_train_examples:
        parts["train"] = subsample(parts["train"], data.max_train_examples, data.split.seed, data.label)
    splits = Splits(parts["train"], parts["validation"], parts["test"], labels, files)
    _check_leakage(splits, data)
    if len(splits.train) == 0:
        raise DataError(f"{data.train}: no training examples are left after the split")
    present = set(splits.train[data.label])
    absent = [lbl for lbl in labels if lbl not in present]
    if absent:
        held = {name: int(getattr(splits, name)[data.label].isin(absent).sum()) for name in ("validation", "test")}
        where = ", ".join(f"{n} in {k}" for k, n in held.items() if n)
        raise DataError(f"{data.train}: label(s) {', '.join(repr(a) for a in absent)} have no training example"
                        f"{' (after the split)' if not data.labels else ''}"
                        f"{f'; evaluation rows with them: {where}' if where else ''}. A classifier cannot learn a "
                        f"class it never sees (it would only be an empty output); add training examples of "
                        f"{'it' if len(absent) == 1 else 'them'} or leave {'it' if len(absent) == 1 else 'them'} "
                        f"out of data.labels")
    return splits


def subsample(frame: pd.DataFrame, n: int, seed: int, label: str | None = None) -> pd.DataFrame:
    """`n` rows of `frame`: nested (the rows kept for a smaller n are among those kept for a larger one, for learning
    curves) and, given a label column, stratified — every label keeps its share. Rows are ordered by a seeded
    permutation, each label's rows spread evenly over the order (their rank within the label, over the label's
    count), and the first n are kept."""
    order = frame.sample(frac=1.0, random_state=seed)
    if label is None:
        return order.head(n)
    rank = order.groupby(label, sort=False).cumcount()
    size = order.groupby(label, sort=False)[label].transform("size")
    key = (rank + 0.5) / size
    return order.assign(_order=key.to_numpy()).sort_values("_order", kind="stable").head(n).drop(columns="_order")


def conversation_table(spec: str, data) -> pd.DataFrame:
    """A table whose `_conv` column holds each row's Conversation and `_text_key` its normalised text."""
    from .conversations import conversations, identity_text
    from .leakage import normalise

    frame = read_table(spec)
    convs, problems = conversations(frame, spec, data)
    if problems:
        print(f"tunelab: dropped {len(problems)} bad row(s) of {spec} (data.bad_rows: drop), e.g. {problems[0]}")
        keep = [c is not None for c in convs]
        frame, convs = frame[keep], [c for c in convs if c is not None]
        if not convs:
            raise DataError(f"{spec}: every row was bad; nothing is left to train on")
    keys = [normalise(identity_text(c)) for c in convs]
    return frame.assign(_conv=convs, _text_key=keys, _label="")


def _split_source(train_spec: str, validation: str | None, test: str | None, config, read) -> tuple[dict, dict]:
    """Read one source with `read(spec)`, split it (unless its eval files are given); return parts and hashes."""
    data = config.data
    train = read(train_spec)
    files = {train_spec: file_hash(train_spec)}
    given = {}
    for name, spec in (("validation", validation), ("test", test)):
        if spec:
            given[name] = read(spec)
            files[spec] = file_hash(spec)
    fractions = {"validation": 0.0 if "validation" in given else data.split.validation,
                 "test": 0.0 if "test" in given else data.split.test}
    parts = split_table(train.assign(_label=""), validation=fractions["validation"], test=fractions["test"],
                        seed=data.split.seed, stratify=False, label="_label", group_by=data.split.group_by,
                        source=train_spec)
    parts.update(given)
    return parts, files


def _weighted(frame: pd.DataFrame, weight: float, seed: int) -> pd.DataFrame:
    """`weight` × the rows: whole copies for the integer part, a seeded sample for the rest."""
    whole, rest = int(weight), weight - int(weight)
    parts = [frame] * whole + [frame.sample(n=round(rest * len(frame)), random_state=seed)] if rest else [frame] * whole
    return pd.concat(parts, ignore_index=True) if parts else frame.iloc[:0]


def conversation_splits(config) -> Splits:
    """Instruction / chat rows as conversations (sft, seq2seq), from one file or a multitask mix of several."""
    data = config.data
    sources = data.datasets or [None]
    parts = {"train": [], "validation": [], "test": []}
    files = {}
    for source in sources:
        if source is None:
            spec, val, test, task_data, name, weight = data.train, data.validation, data.test, data, "", 1.0
        else:
            overrides = {k: v for k, v in source.model_dump(exclude={"train", "validation", "test", "name",
                                                                     "weight"}).items() if v is not None}
            task_data = data.model_copy(update=overrides)
            spec, val, test, name, weight = source.train, source.validation, source.test, source.label(), source.weight
        split, hashes = _split_source(spec, val, test, config, lambda s, d=task_data: conversation_table(s, d))
        files.update(hashes)
        for key in parts:
            frame = split[key].assign(_task=name)
            if key == "train" and weight != 1.0:
                frame = _weighted(frame, weight, data.split.seed)
            parts[key].append(frame)
    merged = {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}
    if data.max_train_examples and len(merged["train"]) > data.max_train_examples:
        merged["train"] = subsample(merged["train"], data.max_train_examples, data.split.seed)
    splits = Splits(merged["train"], merged["validation"], merged["test"], [], files)
    _check_leakage(splits, data)
    if data.replay is not None:
        replay = text_table(data.replay.train, data.replay.text, data.numbers_as_text)
        splits.files[data.replay.train] = file_hash(data.replay.train)
        n = min(len(replay), max(1, round(data.replay.fraction * len(splits.train))))
        splits.replay = replay.sample(n=n, random_state=data.split.seed).reset_index(drop=True)
    return splits


def text_table(spec: str, column: str, numbers_as_text: bool = False) -> pd.DataFrame:
    """Raw text rows (causal_lm, replay): the column must exist and hold text; empty rows are errors naming the
    row."""
    frame = read_table(spec)
    if column not in frame.columns:
        raise DataError(f"{spec}: column `{column}` not found; its columns are: "
                        f"{', '.join(c for c in frame.columns if not c.startswith('_'))}")
    frame = check_text_columns(frame, spec, [column], numbers_as_text)
    blank = frame[column].isna() | (frame[column].astype(str).str.strip() == "")
    if blank.any():
        rows = ", ".join(str(r) for r in frame.loc[blank, ROW].head(5))
        raise DataError(f"{spec}: {int(blank.sum())} row(s) with an empty `{column}` (rows {rows})")
    return add_text_key(frame, column, None)


def text_splits(config) -> Splits:
    """Raw text documents (causal_lm); with data.streaming, the train documents stay a stream (read while
    training) and validation/test are the given files."""
    data = config.data
    if data.streaming:
        return _streamed_text_splits(config)
    split, files = _split_source(data.train, data.validation, data.test, config,
                                 lambda s: text_table(s, data.text, data.numbers_as_text))
    if data.max_train_examples and len(split["train"]) > data.max_train_examples:
        split["train"] = subsample(split["train"], data.max_train_examples, data.split.seed)
    splits = Splits(split["train"], split["validation"], split["test"], [], files)
    _check_leakage(splits, data)
    return splits


def _streamed_text_splits(config) -> Splits:
    from .readers import parse_hub
    from .stream import TextStream

    data = config.data
    files, given = {}, {}
    for name in ("validation", "test"):
        spec = getattr(data, name)
        given[name] = text_table(spec, data.text, data.numbers_as_text) if spec else None
        if spec:
            files[spec] = file_hash(spec)
    if data.train.startswith(HUB):  # not downloaded to be hashed: the revision read is what identifies it
        files[data.train] = f"streamed@{parse_hub(data.train)[2]['revision'] or 'latest'}"
    else:
        files[data.train] = file_hash(data.train)
    empty = pd.DataFrame({ROW: [], data.text: [], "_text_key": []})
    held_out = frozenset(k for f in given.values() if f is not None for k in f["_text_key"])
    stream = TextStream(data.train, data.text, data.numbers_as_text, held_out, data.max_train_examples)
    return Splits(empty, given["validation"] if given["validation"] is not None else empty,
                  given["test"] if given["test"] is not None else empty, [], files, stream=stream)


def preference_splits(config, prompts_only: bool = False) -> Splits:
    """Preference rows (reward, dpo) or, with `prompts_only`, prompts (rl), split by row; a ranking's pairs stay
    in one split."""
    from .preferences import expand_pairs, preference_table, prompt_table

    data = config.data
    read = (lambda s: prompt_table(s, data)) if prompts_only else (lambda s: preference_table(s, data))
    split, files = _split_source(data.train, data.validation, data.test, config, read)
    if data.max_train_examples and len(split["train"]) > data.max_train_examples:
        split["train"] = subsample(split["train"], data.max_train_examples, data.split.seed)
    if not prompts_only:
        split = {name: expand_pairs(frame) for name, frame in split.items()}
    splits = Splits(split["train"], split["validation"], split["test"], [], files)
    _check_leakage(splits, data)
    if len(splits.train) == 0:
        raise DataError(f"{data.train}: no training example is left after the split")
    return splits


def _check_leakage(splits: Splits, data) -> None:
    messages = []
    for name in ("validation", "test"):
        frame = getattr(splits, name)
        leaks = find_leaks(splits.train, frame)
        splits.leaks[name] = len(leaks)
        if len(leaks):
            examples = "; ".join(f"row {r[ROW]}: {r['_text_key'][:60]!r}" for _, r in leaks.head(3).iterrows())
            messages.append(f"{len(leaks)} {name} example(s) also appear in train (e.g. {examples})")
            if data.leakage == "drop":
                setattr(splits, name, frame[~frame["_text_key"].isin(set(leaks["_text_key"]))])
                print(f"tunelab: leakage: dropped {len(frame) - len(getattr(splits, name))} of {len(frame)} {name} "
                      f"example(s) whose text also appears in train (data.leakage: drop)")
    if messages and data.leakage == "error":
        raise DataError("train/eval leakage: " + "; ".join(messages) +
                        ". Remove the duplicates, or set data.leakage: drop to remove them from the evaluation "
                        "splits (or warn to go on anyway)")
    if messages and data.leakage == "warn":
        for m in messages:
            print(f"tunelab: warning: leakage: {m}; the evaluation overstates how the model does on new data")


def load_eval_table(spec: str, config, labels: list[str]) -> pd.DataFrame:
    """Read and check an extra evaluation file against a run's columns and label set."""
    frame = _check_columns(read_table(spec), spec, config.data)
    _check_labels(frame, spec, config.data.label, labels)
    return frame
