"""The memory allocator of a tunelab process: jemalloc where the system has it, the C library's otherwise.

glibc's malloc keeps much of what a training step frees inside the process, in pieces the next step does not fit
back into, so the peak RSS of a CPU run grows well past what its tensors need (making glibc hand every freed page
back shows the difference, at twice the step time). jemalloc — the allocator PyTorch's own CPU launcher,
`torch.backends.xeon.run_cpu`, preloads — hands freed memory back without that cost. So the `tunelab` command,
on Linux, re-executes itself once with jemalloc preloaded (`LD_PRELOAD`) when libjemalloc is installed
(Debian/Ubuntu: `apt-get install libjemalloc2`); without it nothing changes. `TUNELAB_MALLOC=system` keeps the C
library's allocator. Which one a run used is in its manifest (`allocator`); bench/peers.py measures the effect.
Only the console command does this: `tunelab.cli.main([...])` called from Python runs in the caller's process.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

MARKER = "_TUNELAB_ALLOCATOR"  # set in the re-executed process: never re-execute twice
PLACES = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def library() -> str | None:
    """The path of libjemalloc, if the system has one."""
    for folder in PLACES:
        for name in ("libjemalloc.so.2", "libjemalloc.so"):
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return None


def loaded() -> str:
    """'jemalloc' when this process runs on jemalloc, else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


CHOICES = ("jemalloc", "system")


def plan(env: dict, found: str | None, platform: str = sys.platform) -> dict | None:
    """The environment to re-execute with, or None to stay as we are; a TUNELAB_MALLOC that names neither
    allocator is a TunelabError (not silently the C library's)."""
    choice = env.get("TUNELAB_MALLOC", "jemalloc")
    if choice not in CHOICES:
        from .errors import TunelabError

        raise TunelabError(f"environment variable TUNELAB_MALLOC={choice!r}: expected one of {', '.join(CHOICES)} "
                          "(unset: jemalloc where libjemalloc is installed)")
    if platform != "linux" or found is None or env.get(MARKER) or choice != "jemalloc":
        return None
    preload = env.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return None
    return {**env, MARKER: "jemalloc", "LD_PRELOAD": f"{found} {preload}".strip()}


def use_jemalloc() -> None:
    """Re-execute this process (same interpreter, same arguments) with jemalloc preloaded, where `plan` says so.
    Call it before anything heavy is imported: the process starts over."""
    env = plan(dict(os.environ), library())
    if env is None or loaded() == "jemalloc":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
