"""data.streaming: the training rows of a large corpus read one at a time while training consumes them — JSON
Lines and CSV/TSV line by line, Parquet batch by batch (pyarrow), a `datasets` folder memory-mapped, a Hub dataset
through `datasets` streaming (offline: from the local datasets cache) — never the whole file in memory.

Each row is checked as it is read (the text column exists and holds non-empty text), with the file and row in the
message, the same rules as the whole-file readers."""
from __future__ import annotations

import csv
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import jsonl
from ..errors import DataError
from .readers import HUB, parse_hub, resolve_path


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as f:
        number = 0
        while True:
            number += 1
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise DataError(f"{path}, line {number}: not UTF-8; save the file as UTF-8") from None
            except (EOFError, OSError, zlib.error) as exc:  # gzip: cut short (EOFError) or damaged (BadGzipFile)
                raise DataError(f"{path}, line {number}: the gzip stream is damaged or cut short ({exc}); "
                                f"compress the file again") from None
            if not line:
                return
            if line.strip():
                yield number, jsonl.parse(path, number, line)


def _csv(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t" if ".tsv" in path.suffixes else ",")
        for number, row in enumerate(reader, 2):  # row 1 is the header
            yield number, {k: (v if v != "" else None) for k, v in row.items()}


def _parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _datasets(rows) -> Iterator[tuple[int, dict]]:
    yield from enumerate(rows, 1)


def _hub(spec: str):
    import datasets

    name, split, options = parse_hub(spec)
    try:
        return datasets.load_dataset(name, options["name"], split=split, revision=options["revision"],
                                     streaming=True)
    except (ConnectionError, FileNotFoundError, ValueError):
        pass  # offline (or the Hub unreachable): the copy in the local datasets cache, memory-mapped
    from .readers import read_hub

    return read_hub(spec).to_iterable_dataset()


def open_rows(spec: str) -> Iterator[tuple[int, dict]]:
    """(row number in the source, row) of a training source, one at a time."""
    if spec.startswith(HUB):
        return _datasets(_hub(spec))
    path = resolve_path(spec)
    if path.is_dir():
        import datasets

        try:
            return _datasets(datasets.load_from_disk(str(path)))
        except Exception as exc:
            raise DataError(f"{spec}: a folder must be written by datasets' save_to_disk ({exc})") from None
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    readers = {".jsonl": _jsonl, ".csv": _csv, ".tsv": _csv, ".parquet": _parquet}
    if suffix not in readers or (path.suffix == ".gz" and suffix != ".jsonl"):
        raise DataError(f"{spec}: data.streaming reads .jsonl (or .jsonl.gz), .csv, .tsv, .parquet, a datasets "
                        f"folder or hub: data; not `{''.join(path.suffixes)}`")
    return readers[suffix](path)


@dataclass
class TextStream:
    """The training documents of a streamed causal_lm run: `texts()` yields each document's text, checked, and
    skips (and counts) documents whose normalised text is in validation/test."""
    spec: str
    column: str
    numbers_as_text: bool = False
    held_out: frozenset = frozenset()
    """Normalised texts of validation and test (`_text_key`)."""
    limit: int | None = None
    """data.max_train_examples: the first n documents."""
    counts: dict = field(default_factory=lambda: {"read": 0, "leaked": 0})

    def texts(self) -> Iterator[str]:
        from .leakage import normalise
        from .types import is_missing, text_value

        taken = 0
        for number, row in open_rows(self.spec):
            if self.limit is not None and taken >= self.limit:
                return
            if self.column not in row:
                raise DataError(f"{self.spec}, row {number}: column `{self.column}` not found; its columns are: "
                                f"{', '.join(row)}")
            value = row[self.column]
            if is_missing(value):
                raise DataError(f"{self.spec}, row {number}: `{self.column}` is empty")
            try:
                value = text_value(value, self.column, self.numbers_as_text)
            except ValueError as exc:
                raise DataError(f"{self.spec}, row {number}: {exc}. A text column must hold strings") from None
            if not value.strip():
                raise DataError(f"{self.spec}, row {number}: `{self.column}` is empty")
            self.counts["read"] += 1
            if self.held_out and normalise(value) in self.held_out:
                self.counts["leaked"] += 1
                continue
            taken += 1
            yield value
