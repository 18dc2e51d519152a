"""Peak memory per phase of a run (startup, data, load, train, evaluate), for manifest.json.

Linux keeps a process's peak resident set (VmHWM in /proc/self/status) and lets the process reset it by writing
5 to /proc/self/clear_refs, so each phase's own peak is read without a sampling thread. Where that reset is not
available the phase peaks are the running maximum since the process started (`peak_rss_reset: false`). On a GPU,
torch's peak allocated memory is reset and read the same way.
"""
from __future__ import annotations

import resource
from pathlib import Path


def _vm_hwm_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _gpu():
    import sys

    torch = sys.modules.get("torch")  # a phase before torch was imported used no GPU
    return torch if torch is not None and torch.cuda.is_available() else None


_running: "_Phase | None" = None  # the phase now measured, for split()


def split(name: str) -> None:
    """Record the running phase's peak so far as its own phase `name` and measure the rest afresh: the Trainer's
    on_train_begin splits `load` (model loaded, data tokenized, trainer built) off `train`. No phase running: no-op."""
    phase = _running
    if phase is None:
        return
    phase.peaks.mark(name)
    _gpu_mark(phase.peaks, name)
    phase.__enter__()


class PhasePeaks:
    """`with peaks.phase("train"): ...`; `peaks.record()` → {"peak_rss_mb": MB, "peak_rss_mb_by_phase": {phase: MB},
    "peak_rss_reset": bool, "peak_gpu_mb_by_phase": {...}}. The whole run's peak is the largest phase's: resetting
    VmHWM also resets what getrusage's ru_maxrss reads, so that is no whole-run figure once a phase began."""

    def __init__(self):
        self.rss: dict[str, float] = {}
        self.gpu: dict[str, float] = {}
        self.reset_works = True

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    def mark(self, name: str) -> None:
        """The peak since the process started (or the last phase), as phase `name` (e.g. imports and checks)."""
        peak = _vm_hwm_mb()
        self.rss[name] = peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def record(self) -> dict:
        out = {"peak_rss_mb": round(max(self.rss.values(), default=0.0), 1),
               "peak_rss_mb_by_phase": {k: round(v, 1) for k, v in self.rss.items()},
               "peak_rss_reset": self.reset_works}
        if self.gpu:
            out["peak_gpu_mb_by_phase"] = {k: round(v, 1) for k, v in self.gpu.items()}
        return out


def _gpu_mark(peaks: PhasePeaks, name: str) -> None:
    gpu = _gpu()
    if gpu is not None:
        peaks.gpu[name] = gpu.cuda.max_memory_allocated() / 2**20


class _Phase:
    def __init__(self, peaks: PhasePeaks, name: str):
        self.peaks, self.name = peaks, name

    def __enter__(self):
        global _running
        _running = self
        self.peaks.reset_works &= _reset()
        gpu = _gpu()
        if gpu is not None:
            gpu.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        global _running
        _running = None
        self.peaks.mark(self.name)
        _gpu_mark(self.peaks, self.name)
        return False


def release() -> None:
    """Give back what a finished phase freed, before the next one allocates: Python's reference cycles (a Trainer
    and its callbacks hold each other, and with them the trained model) collected, glibc's free heap returned to
    the system (`malloc_trim`; other C libraries have no such call and are left alone), torch's cached GPU blocks
    released. Without it the evaluation's reloaded model is stacked on the training's leftovers."""
    import ctypes
    import ctypes.util
    import gc
    import sys

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
