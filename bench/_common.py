"""Helpers shared by the benchmark scripts: each measurement runs in its own child process (so its peak RSS is
its own), results are JSON, tables are printed compactly and written to bench/results/."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / ".runs"
SAMPLES = ROOT / "src" / "tunelab" / "data" / "samples"
MARK = "BENCH-RESULT "


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far: VmHWM (ru_maxrss survives exec, so a child started from a
    large parent would report the parent's peak), else ru_maxrss (kB on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def emit(result: dict) -> None:
    """Child side: print the measurement for the parent to collect."""
    print(MARK + json.dumps({**result, "peak_rss_mb": peak_rss_mb()}), flush=True)


def run_child(script: str, name: str, *args: str, timeout: int = 3600) -> dict:
    """Run `python bench/SCRIPT --only NAME ARGS` and return what it emitted (or its error)."""
    cmd = [sys.executable, str(ROOT / "bench" / script), "--only", name, *args]
    print(f"\n--- {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    result = None
    for line in proc.stdout:
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
        else:
            sys.stdout.write("    " + line)
    proc.wait(timeout)
    if proc.returncode or result is None:
        return {"error": f"exit {proc.returncode}", "wall_s": round(time.time() - t0, 1)}
    return result


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "cpu": _cpu_name(), "bf16_flags": _bf16_flags()}


def _bf16_flags() -> list[str]:
    """The CPU's bf16 matrix features (AMX tiles are several times faster than AVX512-BF16)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = set(next(line for line in lines if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return []
    return sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio(a, b) -> float | None:
    return round(a / b, 2) if a and b else None
