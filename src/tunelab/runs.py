"""The run directory: self-describing, and never mistaken for finished when it is not.

`status.json` says `running`, `failed`, `interrupted` or `completed`; `completed` is written last, after
every artefact. Loading a run refuses anything else.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .config import Config, load_config
from .errors import RunError

STATUS = "status.json"


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def read_status(path: Path) -> dict | None:
    try:
        return json.loads((path / STATUS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def default_dir(config_path: str | Path | None) -> Path:
    return Path("runs") / (Path(config_path).stem if config_path else "run")


class RunDir:
    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def start(cls, path: Path, config: Config, *, resume: bool, overwrite: bool) -> "RunDir":
        status = read_status(path)
        if path.exists() and any(path.iterdir()):
            if resume:
                if status is None:
                    raise RunError(f"{path} is not a tunelab run directory; cannot --resume it")
                if status["state"] == "completed":
                    raise RunError(f"{path} already finished; nothing to resume (use --overwrite to train again)")
                saved = load_config(path / "config.yaml")
                if saved.hash() != config.hash():
                    raise RunError(f"{path} was started with a different config; --resume needs the same one "
                                   f"(compare with {path / 'config.yaml'}), or use --overwrite")
            elif overwrite:
                shutil.rmtree(path)
            elif status and status["state"] == "completed":
                raise RunError(f"{path} already holds a finished run; pass --overwrite to replace it, or set "
                               f"output.dir to another folder")
            else:
                state = status["state"] if status else "not a tunelab run"
                raise RunError(f"{path} holds an unfinished run ({state}); pass --resume to continue it or "
                               f"--overwrite to start again")
        elif resume:
            raise RunError(f"nothing to resume: {path} does not exist")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        config.save(path / "config.yaml")
        run.set_state("running", started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), pid=os.getpid())
        return run

    def set_state(self, state: str, **extra) -> None:
        status = read_status(self.path) or {}
        status.update(state=state, **extra)
        write_json(self.path / STATUS, status)

    def write_json(self, name: str, obj) -> None:
        write_json(self.path / name, obj)

    def latest_checkpoint(self) -> str | None:
        ckpts = sorted((self.path / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return str(ckpts[-1]) if ckpts else None


_USE = {"classify": "`tunelab predict` / `tunelab.load`", "sft": "`tunelab generate`",
        "seq2seq": "`tunelab generate`", "causal_lm": "`tunelab generate`", "dpo": "`tunelab generate`",
        "rl": "`tunelab generate`", "reward": "`tunelab score` / rl.reward.run"}


def open_finished(run_path, task: str | tuple[str, ...] | None = None) -> tuple[Path, Config]:
    """The path and config of a completed run (of `task` or one of them, if given); a clear error otherwise."""
    path = Path(run_path)
    if not path.is_dir():
        raise RunError(f"no run directory at {path}")
    status = read_status(path)
    if status is None:
        raise RunError(f"{path} is not a tunelab run directory (no {STATUS})")
    if status.get("state") != "completed":
        why = f": {status['error']}" if status.get("error") else ""
        raise RunError(f"{path} did not finish (state: {status.get('state')}{why}); it cannot be used. "
                       f"Resume it with `tunelab train CONFIG --resume` or train again")
    config = load_config(path / "config.yaml")
    tasks = (task,) if isinstance(task, str) else task
    if tasks is not None and config.task not in tasks:
        use = _USE.get(config.task, "its own task's commands")
        raise RunError(f"{path} is a `{config.task}` run, not `{'/'.join(tasks)}`; use it with {use}")
    return path, config
