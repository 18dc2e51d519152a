"""Read a table of examples from JSON Lines, JSON, CSV, Parquet, a `datasets` folder, a shipped sample, or a
Hugging Face Hub dataset (`hub:ORG/NAME[:split]`)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .. import jsonl
from ..errors import DataError
from .types import ROW

SAMPLES = Path(__file__).parent / "samples"


def resolve_path(spec: str) -> Path:
    """`sample:NAME` → the shipped file; anything else is a path relative to the working directory."""
    if spec.startswith("sample:"):
        name = spec.removeprefix("sample:")
        path = SAMPLES / f"{name}.jsonl"
        if not path.exists():
            known = sorted(p.stem for p in SAMPLES.glob("*.jsonl"))
            raise DataError(f"no shipped sample called `{name}`; samples: {', '.join(known)}")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data file {spec} does not exist (relative paths are read from {Path.cwd()})")
    return path


HUB = "hub:"


def parse_hub(spec: str) -> tuple[str, str, dict]:
    """`hub:ORG/NAME[:SPLIT][?config=C&revision=R]` → (name, split, {"name": C, "revision": R})."""
    from urllib.parse import parse_qs

    body, _, query = spec.removeprefix(HUB).partition("?")
    name, _, split = body.partition(":")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(options) - {"config", "revision"}
    if not name or name.count("/") > 1 or unknown:
        raise DataError(f"{spec}: expected hub:ORG/NAME or hub:ORG/NAME:SPLIT (with data.config and data.revision "
                        f"for the subset and version)")
    return name, split or "train", {"name": options.get("config"), "revision": options.get("revision")}


def read_hub(spec: str):
    """The split of a Hub dataset as a `datasets.Dataset` (cached by `datasets`; offline, only what is cached)."""
    import datasets

    name, split, options = parse_hub(spec)
    try:
        return datasets.load_dataset(name, options["name"], split=split, revision=options["revision"])
    except ConnectionError as exc:
        raise DataError(f"{spec}: the Hugging Face Hub cannot be reached and {name} is not in the local datasets "
                        f"cache ({datasets.config.HF_DATASETS_CACHE}): {exc}. Load it once with network access "
                        f"(HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset), or save it to a file") from None
    except (FileNotFoundError, ValueError) as exc:  # unknown dataset, config or split
        raise DataError(f"{spec}: {str(exc).splitlines()[0]}") from None


def read_table(spec: str) -> pd.DataFrame:
    if spec.startswith(HUB):
        frame = read_hub(spec).to_pandas()
        if len(frame) == 0:
            raise DataError(f"{spec} is empty: it has no rows")
        frame.insert(0, ROW, range(1, len(frame) + 1))
        return frame
    path = resolve_path(spec)
    if path.is_dir():
        frame = _read_datasets_dir(path)
    else:
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
                   ".parquet": pd.read_parquet}
        reader = readers.get(suffix.removesuffix(".gz"))
        if reader is None:
            raise DataError(f"{spec}: unknown file type `{path.suffix}`; use .jsonl, .json, .csv, .tsv, .parquet "
                            f"or a folder saved by datasets' save_to_disk")
        try:
            frame = reader(path)
        except DataError:
            raise
        except Exception as exc:  # pandas/pyarrow parse errors: name the file, keep their detail
            raise DataError(f"{spec}: could not be read as {suffix}: {exc}") from None
    if len(frame) == 0:
        raise DataError(f"{spec} is empty: it has no rows")
    if ROW not in frame.columns:
        frame.insert(0, ROW, range(1, len(frame) + 1))
    return frame


def file_text(path: Path) -> str:
    """The file as text: UTF-8 (gzip-compressed if it ends in .gz), a leading byte-order mark dropped as in every
    format; a byte that is not UTF-8 is reported by line."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        import gzip
        import zlib

        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:  # cut short (EOFError) or damaged (BadGzipFile, zlib)
            raise DataError(f"{path}: the gzip stream is damaged or cut short ({exc}); compress the file again") \
                from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        at = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{path}, line {line}: byte {raw[exc.start]:#04x} (byte {at} of the line) is not UTF-8; save "
                        f"the file as UTF-8") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows, lines = [], []
    for number, line in enumerate(file_text(path).split("\n"), 1):
        if line.strip():
            rows.append(jsonl.parse(path, number, line))
            lines.append(number)
    frame = pd.DataFrame(rows)
    frame.insert(0, ROW, lines)
    return frame


def _read_json(path: Path) -> pd.DataFrame:
    try:
        data = json.loads(file_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or JSON Lines in a .jsonl file)")
    return pd.DataFrame(data)


def _read_csv(path: Path) -> pd.DataFrame:
    import io

    sep = "\t" if ".tsv" in path.suffixes else ","
    frame = pd.read_csv(io.StringIO(file_text(path)), sep=sep, keep_default_na=False, na_values=[""], dtype=str)
    frame.insert(0, ROW, range(2, len(frame) + 2))  # row 1 is the header
    return frame


def _read_datasets_dir(path: Path) -> pd.DataFrame:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: a folder must be written by datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(loaded)}); point at one, e.g. {path}/train")
    return loaded.to_pandas()
