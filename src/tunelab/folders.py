"""Folders tunelab writes, written safely: an exclusive lock per folder for the life of the process that holds it
(an OS file lock, freed by the kernel even on `kill -9`), folders built under a temporary name and swapped into
place in one step, and the marker of the folders export and merge may replace later.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import time
from pathlib import Path

from .errors import RunError


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file; the temp file is this
    process's own, so two processes writing one shared file (a cache) cannot mix their halves."""
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


LOCK = ".lock"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------------- locks

class RunLock:
    """An exclusive lock on a run directory for the life of this object (or of the process)."""

    def __init__(self, path: Path, purpose: str):
        import fcntl

        self.path = Path(path)
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"{self.path} cannot be written ({exc.strerror}); set output.dir to a folder you can "
                           f"write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{self.path} is in use by another tunelab process ({describe_holder(self.path)}); "
                           f"wait for it to finish or stop it first") from None
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "since": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder(path: Path) -> dict | None:
    """Who holds the run's lock ({pid, host, purpose, since}), or None when nobody does."""
    import fcntl

    try:
        fd = os.open(Path(path) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
    finally:
        os.close(fd)
    return None


def describe_holder(path: Path) -> str:
    h = holder(path) or {}
    parts = [f"pid {h['pid']}" if "pid" in h else None, f"on {h['host']}" if "host" in h else None,
             f"{h['purpose']}" if "purpose" in h else None, f"since {h['since']}" if "since" in h else None]
    return ", ".join(p for p in parts if p) or "unknown process"


# ----------------------------------------------------------------------------------------- atomic folders

def staging_dir(target: Path) -> Path:
    """A fresh empty folder beside `target` to build it in (hidden, named after this process)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent, target.name)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish_dir(tmp: Path, target: Path) -> Path:
    """Put the finished folder `tmp` at `target`, replacing what is there: at every moment `target` is the old
    folder or the new one (atomic exchange where the OS has it)."""
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        os.replace(tmp, target)
        return target
    if _exchange(tmp, target):  # tmp now holds the old folder
        shutil.rmtree(tmp)
        return target
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old)
    return target


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine — also when it belongs to another user (signal 0 is then refused
    with PermissionError: the process is there, and its folders or jobs are not to be taken over)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # a pid outside the system's range
        return False
    return True


def clean_stale(folder: Path, name: str | None = None, *, force: bool = False) -> None:
    """Remove leftovers of interrupted folder writes (`.NAME.partial-PID`, `.NAME.old-PID`) whose process is gone
    (`force`: all of them — the caller holds the folder's lock, so no other process is writing there)."""
    for pattern in (".*.partial-*", ".*.old-*"):
        for p in Path(folder).glob(pattern):
            stem, _, pid = p.name.rpartition("-")
            if name is not None and not stem.startswith(f".{name}."):
                continue
            if force or (pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid)))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def check_target(target: Path, marker: str, what: str) -> None:
    """An output folder a command is about to replace must be empty or one it wrote before (holds `marker`)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise RunError(f"{target} is a file; {what} writes a folder there. Choose another --out")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).exists():
        raise RunError(f"{target} already holds files that tunelab did not write (no {marker}); it will not "
                       f"replace them. Choose another --out, or empty that folder")


MARKER = "export.json"
"""Written into every folder that merge and export make: such a folder may be replaced by them later."""


def write_output_dir(target: Path, fill, what: str, run: Path | None = None) -> Path:
    """Build `target` with `fill(folder)` (which writes MARKER) beside it and swap it into place. A non-empty
    target without MARKER is refused; while writing inside a run directory, that run is locked."""
    target = Path(target)
    check_target(target, MARKER, what)
    inside = run is not None and Path(run).resolve() in target.resolve().parents
    lock = RunLock(Path(run), what) if inside else None
    try:
        tmp = staging_dir(target)
        try:
            fill(tmp)
            if not (tmp / MARKER).exists():
                raise RuntimeError(f"{what} wrote no {MARKER}")  # a bug, not a user mistake
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish_dir(tmp, target)
    finally:
        if lock is not None:
            lock.release()
