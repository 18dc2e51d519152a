"""The run directory: self-describing, owned by one process at a time, never mistaken for finished when it is not.

- `status.json` says `running`, `failed`, `interrupted` or `completed`; `completed` is written last, after every
  artefact. Loading a run refuses anything else.
- `.lock` is held (an OS file lock, `fcntl.flock`) by the process that trains the run, for as long as it lives;
  the kernel lets go when the process dies, even by `kill -9`. So a second `train` on the same folder is refused
  while the first lives, and a `running` status nobody holds is known for what it is: an interrupted run.
- tunelab only deletes what it wrote: `--overwrite` refuses a folder without `status.json` and removes only the
  entries a run writes (`OWNED`); anything else in the folder is kept and named.
- Folders (the final model, exports) are built under a temporary name beside the target and swapped into place
  (`publish_dir`), so a kill leaves the old folder or the new one, never half of one.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
from pathlib import Path

from .errors import RunError
from .folders import (
    LOCK,
    MARKER,
    RunLock,
    clean_stale,
    describe_holder,
    holder,
    now,
    publish_dir,
    staging_dir,
    write_json,
)

__all__ = ["MARKER", "RunDir", "check_output", "default_dir", "load_run", "now", "open_finished", "read_status",
           "replaceable", "run_status", "write_json"]

STATUS = "status.json"
# Every top-level entry a run directory can hold that tunelab writes (train, eval, merge, export). Only these are
# removed by --overwrite.
OWNED = ("config.yaml", STATUS, LOCK, "progress.json", "metrics.jsonl", "metrics.json", "manifest.json", "model",
         "checkpoints", "loss.png", "rewards.png", "samples.jsonl", "tensorboard", "evaluations", "merged",
         "predictions_*.jsonl", "export-*", "*.tmp", ".*.partial-*", ".*.old-*")


def read_status(path: Path) -> dict | None:
    """The run's status as written, or None if `path` holds no readable status.json."""
    try:
        status = json.loads((Path(path) / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def run_status(path: Path) -> dict | None:
    """The status as it really is: a `running` run whose process is gone (nobody holds its lock) is reported as
    `interrupted`."""
    status = read_status(path)
    if status and status.get("state") == "running" and holder(path) is None:
        pid = f" (pid {status['pid']})" if status.get("pid") else ""
        status = {**status, "state": "interrupted",
                  "error": f"its training process{pid} stopped without finishing (killed, or the machine went down); "
                           f"continue it with --resume"}
    return status


def default_dir(config_path: str | Path | None) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "run")


# -------------------------------------------------------------------------------------------- run folders

def _owned(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED)


def _inspect(path: Path, config, *, resume: bool, overwrite: bool) -> str:
    """What starting a run at `path` means ("new", "resume" or "overwrite"), or a RunError saying why it cannot.
    Reads only; safe to call before any work."""
    if path.exists() and not path.is_dir():
        raise RunError(f"output.dir {path} is a file, not a folder; set output.dir to a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"output.dir {path} is under {parent}, which is a file; set output.dir to a folder")
            break
    if not path.exists() or not any(path.iterdir()):
        if resume:
            raise RunError(f"nothing to resume: {path} does not exist" if not path.exists() else
                           f"nothing to resume: {path} is empty")
        _check_writable(path)
        return "new"
    status = run_status(path)
    if status is None:
        raise RunError(f"{path} already exists and is not a tunelab run (it has no {STATUS}); tunelab does not "
                       f"write into or delete folders it did not create. Set output.dir to a new folder")
    live = holder(path)
    if live is not None:
        raise RunError(f"{path} is in use by another tunelab process ({describe_holder(path)}); wait for it to "
                       f"finish or stop it first")
    _check_writable(path)
    state = status.get("state")
    if resume:
        if state == "completed":
            raise RunError(f"{path} already finished; nothing to resume (use --overwrite to train again)")
        from .config import load_config

        saved = load_config(path / "config.yaml")
        if saved.hash() != config.hash():
            raise RunError(f"{path} was started with a different config; --resume needs the same one "
                           f"(compare with {path / 'config.yaml'}), or use --overwrite")
        return "resume"
    if overwrite:
        return "overwrite"
    if state == "completed":
        raise RunError(f"{path} already holds a finished run; pass --overwrite to replace it, or set output.dir to "
                       f"another folder")
    raise RunError(f"{path} holds an unfinished run ({state}); pass --resume to continue it or --overwrite to start "
                   f"again")


def _check_writable(path: Path) -> None:
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"output.dir {path}: {existing} is not writable; set output.dir to a folder you can write to")


def check_output(path: Path, config, *, resume: bool, overwrite: bool) -> None:
    """Raise now if the run could not start at `path` (before any model or data is loaded)."""
    _inspect(Path(path), config, resume=resume, overwrite=overwrite)


def replaceable(path: Path, owner: str) -> None:
    """For compare entries and search trials, which retrain into folders of their own: `path` is absent, empty, or
    a run whose saved config names `path` as its output.dir (one such a command made). Anything else — a user's
    folder, or a run trained there by hand — is refused, never overwritten."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if read_status(path) is None:
        raise RunError(f"{path} already exists and is not a tunelab run; {owner} does not write into it — move it "
                       f"away or choose another folder")
    try:
        from .config import load_config

        saved = load_config(path / "config.yaml").output.dir
    except Exception:  # noqa: BLE001 - unreadable: not provably ours
        saved = None
    if saved is None or Path(saved).resolve() != path.resolve():
        raise RunError(f"{path} holds a run that {owner} did not make (its output.dir is {saved}); {owner} will not "
                       f"overwrite it — move it away or choose another folder")


class RunDir:
    def __init__(self, path: Path, lock: RunLock | None = None):
        self.path = Path(path)
        self.lock = lock

    @classmethod
    def start(cls, path: Path, config, *, resume: bool, overwrite: bool) -> "RunDir":
        path = Path(path)
        plan = _inspect(path, config, resume=resume, overwrite=overwrite)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"output.dir {path} cannot be created ({exc.strerror}); set output.dir to a folder you "
                           f"can write to") from None
        lock = RunLock(path, "train")
        try:
            previous = read_status(path) or {}
            run = cls(path, lock)
            if plan == "overwrite":
                kept = run.clear()
                if kept:
                    print(f"tunelab: {path}: kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} tunelab did not "
                          f"write: {', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}")
            clean_stale(path, force=True)
            config.save(path / "config.yaml")
            if plan == "resume":
                extra = {"started_at": previous.get("started_at", now()),
                         "resumed_at": previous.get("resumed_at", []) + [now()], "error": None}
            else:
                extra = {"started_at": now()}
            run.set_state("running", pid=os.getpid(), host=socket.gethostname(), **extra)
        except BaseException:
            lock.release()
            raise
        return run

    def clear(self) -> list[str]:
        """Remove every entry a run writes (but the lock this process holds); return the names of those kept."""
        kept = []
        for p in sorted(self.path.iterdir()):
            if p.name == LOCK:
                continue
            if not _owned(p.name):
                kept.append(p.name)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return kept

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def set_state(self, state: str, **extra) -> None:
        status = read_status(self.path) or {}
        status.update(state=state, **extra)
        status = {k: v for k, v in status.items() if v is not None}
        write_json(self.path / STATUS, status)

    def write_json(self, name: str, obj) -> None:
        write_json(self.path / name, obj)

    def write_dir(self, name: str, fill) -> Path:
        """Build the folder RUN/NAME with `fill(folder)` under a temporary name, then swap it into place."""
        tmp = staging_dir(self.path / name)
        try:
            fill(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish_dir(tmp, self.path / name)

    def latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint (the Trainer writes trainer_state.json last)."""
        ckpts = [p for p in (self.path / "checkpoints").glob("checkpoint-*")
                 if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
        ckpts.sort(key=lambda p: int(p.name.split("-")[-1]))
        return str(ckpts[-1]) if ckpts else None


def open_finished(run_path, kind: str | None = None):
    """The path and config of a completed run (whose task loads as `kind` — "classifier", "generator", "reward
    model" — if given); a clear error otherwise."""
    from .config import load_config
    from .tasks import TASKS

    path = Path(run_path)
    if not path.is_dir():
        raise RunError(f"no run directory at {path}")
    status = run_status(path)
    if status is None:
        raise RunError(f"{path} is not a tunelab run directory (no {STATUS})")
    if status.get("state") == "running":
        raise RunError(f"{path} is still training ({describe_holder(path)}); wait for it to finish")
    if status.get("state") != "completed":
        why = f": {status['error']}" if status.get("error") else ""
        raise RunError(f"{path} did not finish (state: {status.get('state')}{why}); it cannot be used. "
                       f"Resume it with `tunelab train CONFIG --resume` or train again")
    config = load_config(path / "config.yaml")
    task = TASKS[config.task]
    if kind is not None and task.KIND != kind:
        raise RunError(f"{path} is a `{config.task}` run ({task.KIND}), not a {kind}; use it with {task.USE}")
    return path, config


def load_run(run_path, kind: str | None = None):
    """A finished run loaded by its task: a Classifier, a Generator or a RewardModel."""
    from .tasks import TASKS

    path, config = open_finished(run_path, kind)
    return TASKS[config.task].load(path, config)
