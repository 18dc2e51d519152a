"""`tunelab compare`: run several fine-tuning approaches on the same data, split and seed, and write one report.

Each entry of `compare.methods` becomes an ordinary run config (written to DIR/configs/NAME.yaml) trained in its
own process, so its peak memory is its own and a crash stays a row in the report. A run whose saved config has
the same hash as the one it would get now is reused, so adding a method does not rerun the others.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ICL_ENTRIES, Config, load_config, set_key
from .errors import ConfigError, RunError
from .runs import read_status, replaceable


@dataclass
class Entry:
    name: str
    config: Config | None
    config_path: Path
    run_dir: Path
    status: str = "pending"  # cached | trained | failed
    error: str | None = None
    wall_s: float | None = None
    extra: dict = field(default_factory=dict)
    method: str = ""
    """The compare entry it belongs to (a method or icl entry name); `name` adds the seed and fraction."""
    seed: int | None = None
    fraction: float = 1.0


ZERO_SHOT = ("base", "icl_0")
DETERMINISTIC = ZERO_SHOT + ("icl_retrieved",)  # the same run whatever the seed


def entry_configs(config: Config, config_path: str | Path, out: Path, n_train: int | None = None) -> list[Entry]:
    """One validated run config per compare entry, seed and fraction; every problem of every entry reported at once.
    The first seed at the full training split keeps the entry's plain name (NAME); the others are NAME-fracF,
    NAME-seedS, NAME-fracF-seedS. `n_train`: the size of the training split, for the fractions."""
    from pydantic import ValidationError

    from .config import describe_error
    from .methods import METHODS, trait

    cmp = config.compare
    seeds = cmp.seeds or [config.train.seed]
    fractions = sorted(set(cmp.fractions or [1.0]) | {1.0})
    entries, problems = [], []
    for name in cmp.methods:
        # zero-shot reads no training data; zero-shot and retrieved demonstrations draw nothing at random
        for fraction in ([1.0] if name in ZERO_SHOT else fractions):
            once = name in DETERMINISTIC or (name in METHODS and trait(name, "SEEDLESS"))  # the same run every seed
            for seed in (seeds[:1] if once else seeds):
                suffix = (f"-frac{fraction:g}" if fraction < 1 else "") + (f"-seed{seed}" if seed != seeds[0] else "")
                try:
                    raw = _entry_raw(config, name, out / "runs" / f"{name}{suffix}", seed, seed == seeds[0])
                except ValueError as exc:  # an override's path runs through a value
                    problems.append(str(exc))
                    continue
                if fraction < 1:
                    raw.setdefault("data", {})["max_train_examples"] = max(1, round(fraction * (n_train or 0)))
                try:
                    entry_config = Config.model_validate(raw)
                except ValidationError as exc:
                    problems += [f"compare entry `{name}{suffix}`: {describe_error(err)}" for err in exc.errors()]
                    continue
                entries.append(Entry(f"{name}{suffix}", entry_config, out / "configs" / f"{name}{suffix}.yaml",
                                     out / "runs" / f"{name}{suffix}", method=name, seed=seed, fraction=fraction))
    if problems:
        raise ConfigError(str(config_path), sorted(set(problems)))
    return entries


def _entry_raw(config: Config, name: str, run_dir: Path, seed: int, first_seed: bool) -> dict:
    """The raw run config of one entry (before validation)."""
    cmp = config.compare
    raw = copy.deepcopy(config.to_dict())
    raw.pop("compare", None)
    if name in ICL_ENTRIES:  # the no-training baselines: the (icl) model prompted, zero-shot or with demonstrations
        shots = 0 if name in ZERO_SHOT else cmp.shots
        raw["method"] = {"name": "icl", **copy.deepcopy(cmp.icl), "shots": shots,
                         "demos": "retrieved" if name == "icl_retrieved" else "random"}
        raw["model"] = {**raw["model"], "name": cmp.icl_model or raw["model"]["name"],
                        "max_length": max(raw["model"]["max_length"], 512)}
    elif raw["method"]["name"] != name:
        raw["method"] = {"name": name}  # the base config's method keeps its options; others their defaults
    raw["output"] = {**raw.get("output", {}), "dir": str(run_dir)}
    for key, value in cmp.overrides.get(name, {}).items():
        problem = set_key(raw, key, value)
        if problem:
            raise ValueError(f"compare.overrides.{name}.{key}: {problem}")
    if not first_seed:  # the first seed's configs are those of a one-seed compare (its runs are reused)
        raw.setdefault("train", {})["seed"] = seed
        if name in ICL_ENTRIES:  # no training: the seed draws other random demonstrations
            raw["method"]["seed"] = seed
    return raw


def cached(entry: Entry) -> bool:
    """The run finished with exactly this config (same hash): its results can be reused."""
    status = read_status(entry.run_dir)
    if not status or status.get("state") != "completed":
        return False
    try:
        return load_config(entry.run_dir / "config.yaml").hash() == entry.config.hash()
    except Exception:  # noqa: BLE001 - an unreadable old config simply means "run it again"
        return False


def check_inputs(configs: list[Config]) -> None:
    """The data (columns, types, labels, leakage) and models of the entries about to train, checked once here:
    a problem they share stops compare with one message instead of failing every entry with it."""
    from .methods import trait
    from .models import check_model, resolve
    from .tasks import TASKS, load_splits

    seen = set()
    for cfg in configs:
        key = json.dumps([cfg.task, cfg.to_dict()["data"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            with contextlib.redirect_stdout(io.StringIO()):  # each entry prints its own data notes
                load_splits(cfg)
        if cfg.model.name not in seen:
            seen.add(cfg.model.name)
            head = None if trait(cfg.method.name, "GRADIENT_FREE") else TASKS[cfg.task].AUTO_HEAD
            check_model(resolve(cfg.model.name), head, cfg.task)


def _run_process(entry: Entry, allow_code: bool = False) -> tuple[int, str]:
    """`tunelab train` on the entry's config in a child process; its output is shown live, and the tail of its
    stderr is kept for the error message."""
    cmd = [sys.executable, "-m", "tunelab", "train", str(entry.config_path), "--overwrite"] + \
        ["--allow-code"] * allow_code
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    tail = bytearray()

    def pump():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.extend(chunk)
            del tail[:-8000]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    code = proc.wait()
    reader.join()
    return code, tail.decode("utf-8", "replace")


def _failure(entry: Entry, stderr_tail: str) -> str:
    status = read_status(entry.run_dir)
    if status and status.get("error"):
        return status["error"]
    lines = [x.strip() for x in stderr_tail.replace("\r", "\n").split("\n") if x.strip()]
    errors = [x for x in lines if x.startswith("tunelab: error:")]
    if errors:
        return errors[-1].removeprefix("tunelab: error:").strip()
    return lines[-1] if lines else "the training process exited without a message"


def compare(config_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, methods: list[str] | None = None,
            out: str | Path | None = None, rerun: bool = False, allow_code: bool = False) -> dict:
    """Run (or reuse) every entry, then write report.md / report.html; returns {"dir", "entries", "rows"}."""
    from .report import compare_report, compare_rows
    from .verdict import analyze

    overrides = list(overrides)
    if methods:
        overrides.append(f"compare.methods=[{', '.join(methods)}]")
    config = load_config(config_path, overrides)  # --methods creates the compare section if there is none
    if config.compare is None:
        from .config import CompareConfig

        config = config.model_copy(update={"compare": CompareConfig()})
    out = Path(out or config.compare.dir or Path("runs") / f"compare-{Path(config_path).stem}")
    n_train = None
    if config.compare.fractions:  # fractions are of the training split, which every entry shares
        from .tasks import load_splits

        with contextlib.redirect_stdout(io.StringIO()):
            n_train = len(load_splits(config).train)
    entries = entry_configs(config, config_path, out, n_train)
    if config.train.lr is not None:
        print(f"tunelab compare: train.lr={config.train.lr} is set, so every method uses it; leave it unset for each "
              f"method's own default, or set it per method in compare.overrides", file=sys.stderr)
    todo = [e for e in entries if rerun or not cached(e)]
    check_inputs([e.config for e in todo])
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for entry in entries:
        entry.config.save(entry.config_path)
    for n, entry in enumerate(entries, 1):
        if entry not in todo:
            entry.status = "cached"
            print(f"\n── compare [{n}/{len(entries)}] {entry.name}: cached ({entry.run_dir})", flush=True)
            continue
        print(f"\n── compare [{n}/{len(entries)}] {entry.name}: training ({entry.config_path})", flush=True)
        try:
            replaceable(entry.run_dir, "tunelab compare")
        except RunError as exc:
            entry.status, entry.error = "failed", str(exc)
            print(f"── compare: {entry.name} not run: {entry.error}", flush=True)
            continue
        t0 = time.time()
        code, tail = _run_process(entry, allow_code)
        entry.wall_s = round(time.time() - t0, 1)
        if code == 0 and (read_status(entry.run_dir) or {}).get("state") == "completed":
            entry.status = "trained"
        else:
            entry.status, entry.error = "failed", _failure(entry, tail)
            print(f"── compare: {entry.name} failed: {entry.error}", flush=True)
        if code == 130:
            raise KeyboardInterrupt
    rows = compare_rows(entries)
    analysis = analyze(rows)
    paths = compare_report(rows, analysis, out, title=f"tunelab compare · {Path(config_path).name}", config=config)
    return {"dir": out, "entries": entries, "rows": rows, "analysis": analysis, **paths}
