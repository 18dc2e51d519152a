"""What the UI knows about runs and the jobs it started: background `tunelab train|compare|search` processes (never
inside the web server), their logs, and the run folders read defensively — a page shows what a damaged file is,
it does not fail on it.

Layout under the runs folder: each run is a folder with status.json (tunelab's run directory); the UI keeps its
own files in `.ui/`: `configs/NAME.yaml` (the YAML a job runs), `jobs/NAME.json` + `jobs/NAME.log` (the command,
its pid and output), `uploads/` (files sent from the browser)."""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..folders import pid_alive
from ..runs import run_status

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
KINDS = ("train", "compare", "search")


class NotAllowed(Exception):
    """A name or path from the browser that does not resolve inside the allowed folders."""


def check_name(name: str) -> str:
    if not NAME.match(name or "") or ".." in name:
        raise NotAllowed(f"{name!r} is not a run name (letters, digits, . _ -; at most 80 characters)")
    return name


def run_path(root: Path, run_id: str) -> Path:
    """The folder of run `run_id` (its path under the runs folder, e.g. `mine` or `compare-x/runs/lora`)."""
    parts = run_id.split("/")
    if not 1 <= len(parts) <= 4:
        raise NotAllowed(f"{run_id!r} is not a run under {root}")
    for part in parts:
        check_name(part)
    return inside(root / run_id, [root.resolve()])


def inside(path: Path, roots: list[Path]) -> Path:
    """`path` resolved, if it lies under one of `roots`; else NotAllowed."""
    resolved = Path(path).expanduser().resolve()
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise NotAllowed(f"{path} is outside the folders the UI may read ({', '.join(str(r) for r in roots)})")
    return resolved


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(content, None), (None, None) when absent, or (None, what is wrong with it)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} cannot be read ({exc})"
    return (data, None) if isinstance(data, dict) else (None, f"{path.name} does not hold a JSON object")


@dataclass
class RunInfo:
    name: str
    path: Path
    state: str
    error: str | None = None
    task: str | None = None
    method: str | None = None
    model: str | None = None
    metric: tuple[str, float] | None = None
    seconds: float | None = None
    size_mb: float | None = None
    started: str | None = None
    problems: list[str] = field(default_factory=list)
    kind: str = "train"


@functools.lru_cache(maxsize=4096)
def _size_mb(path: Path, stamp: float) -> float:
    """Megabytes under `path`; `stamp` (status.json's mtime) keys the cache, so the runs page, which refreshes
    every two seconds while a job runs, walks a finished run's model folder once."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return round(total / 2 ** 20, 1)


def key_metric(metrics: dict | None) -> tuple[str, float] | None:
    test = (metrics or {}).get("test") or {}
    for key in ("accuracy", "f1_macro", "chrf", "perplexity", "loss", "pairwise_accuracy", "reward_accuracy"):
        if isinstance(test.get(key), (int, float)):
            return key, float(test[key])
    return None


def run_info(path: Path, full: bool = False) -> RunInfo:
    status = run_status(path)
    info = RunInfo(path.name, path, (status or {}).get("state", "unknown"), (status or {}).get("error"))
    if status is None:
        info.problems.append("status.json is missing or unreadable")
    info.started = (status or {}).get("started_at")
    try:
        import yaml

        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        method = config.get("method")
        info.task = config.get("task", "classify")
        info.method = method.get("name") if isinstance(method, dict) else method
        info.model = (config.get("model") or {}).get("name")
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 — a damaged file is shown, not raised
        info.problems.append(f"config.yaml cannot be read ({exc})")
    metrics, problem = read_json(path / "metrics.json")
    if problem:
        info.problems.append(problem)
    info.metric = key_metric(metrics)
    manifest, problem = read_json(path / "manifest.json")
    if problem:
        info.problems.append(problem)
    if manifest:
        info.seconds = manifest.get("wall_time_s")
    if full or info.state == "completed":
        stamp = (path / "status.json").stat().st_mtime if status is not None else 0.0
        info.size_mb = _size_mb(path / "model", stamp) if (path / "model").exists() else None
    return info


def list_runs(root: Path) -> list[RunInfo]:
    """Every run folder under `root` (also those a compare or search folder holds), newest first; `name` is the
    run's path under `root`."""
    found = []
    for folder in _run_folders(root):
        info = run_info(folder)
        info.name = folder.relative_to(root).as_posix()
        found.append(info)
    found.sort(key=lambda r: r.started or "", reverse=True)
    return found


def _run_folders(root: Path, depth: int = 4):
    """Folders holding a status.json, at most `depth` levels under `root`, hidden folders left out. A run folder is
    not entered (runs hold no runs; its model and checkpoints can be thousands of files, and the runs page lists
    the runs every two seconds while a job runs); compare and search folders are (DIR/runs/NAME, DIR/trials/NNN)."""
    stack = [(root, 0)]
    while stack:
        folder, level = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        if any(e.name == "status.json" and e.is_file() for e in entries):
            yield folder
        elif level < depth:
            stack += [(Path(e.path), level + 1) for e in entries
                      if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]


def list_groups(root: Path) -> list[dict]:
    """compare / search folders under `root`: their name, kind and whether the report is there."""
    out = []
    if root.exists():
        for child in sorted(root.iterdir()):
            if child.is_dir() and (child / "report.html").exists():
                out.append({"name": child.name, "kind": "compare", "report": True})
            elif child.is_dir() and (child / "study.db").exists():
                out.append({"name": child.name, "kind": "search", "report": False})
    return out


# ------------------------------------------------------------------------------------------------ jobs


class Jobs:
    def __init__(self, root: Path):
        self.root = root
        self.dir = root / ".ui" / "jobs"
        self.configs = root / ".ui" / "configs"
        self.uploads = root / ".ui" / "uploads"
        self.procs: dict[str, subprocess.Popen] = {}

    def out_dir(self, kind: str, name: str) -> Path:
        return self.root / (name if kind == "train" else f"{kind}-{name}")

    def start(self, kind: str, name: str, config_path: Path, resume: bool = False) -> dict:
        """Start `tunelab KIND CONFIG` as its own process (its own session: Stop reaches its children too)."""
        if kind not in KINDS:
            raise NotAllowed(f"unknown job kind {kind!r}")
        check_name(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        running = self.job(name)
        if running and running.get("alive"):
            raise NotAllowed(f"job {name} is still running (pid {running['pid']}); stop it first")
        cmd = [sys.executable, "-m", "tunelab", kind, str(config_path)]
        if kind == "train":
            cmd += ["--resume"] if resume else []
        else:
            cmd += ["--out", str(self.out_dir(kind, name))]
        log = self.dir / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n$ {' '.join(cmd)}\n".encode())
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "2"}
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, cwd=Path.cwd())
        self.procs[name] = proc
        record = {"name": name, "kind": kind, "pid": proc.pid, "cmd": cmd, "config": str(config_path),
                  "out": str(self.out_dir(kind, name)), "started": time.time()}
        tmp = self.dir / f"{name}.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.replace(self.dir / f"{name}.json")
        return record

    def _alive(self, name: str, pid: int) -> bool:
        proc = self.procs.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None  # reaps it when done
        return pid_alive(pid)

    def job(self, name: str) -> dict | None:
        record, _ = read_json(self.dir / f"{name}.json")
        if record is None or not isinstance(record.get("pid"), int):
            return None
        proc = self.procs.get(name)
        record["alive"] = self._alive(name, record["pid"])
        record["returncode"] = proc.poll() if proc is not None and proc.pid == record["pid"] else None
        return record

    def jobs(self) -> list[dict]:
        if not self.dir.exists():
            return []
        out = [self.job(p.stem) for p in sorted(self.dir.glob("*.json"))]
        return sorted([j for j in out if j], key=lambda j: -j.get("started", 0))

    def stop(self, name: str) -> bool:
        """Ctrl-C to the job's process group: tunelab marks the run `interrupted` (resumable) and exits."""
        job = self.job(check_name(name))
        if not job or not job["alive"]:
            return False
        try:
            os.killpg(job["pid"], signal.SIGINT)
        except OSError:
            return False
        return True

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.dir / f"{check_name(name)}.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 64_000))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # terminal cursor moves of nested progress bars
        # progress bars rewrite their line with \r: keep the last state of each line
        shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
        return "\n".join(shown[-lines:])
