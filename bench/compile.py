"""Where train.compile pays off: the break-even number of steps behind `train.compile: auto` (tunelab/compiling.py).

The job: the LoRA SFT job of bench/peers.py (SmolLM2-135M, shipped EN→FR, LoRA r 8 on q,k,v,o, batch 4,
sequence 256, packing; bf16 where the CPU is fast at it). Three children, each timing every optimizer step:
eager (train.compile: false); compiled with an empty Inductor cache (`TORCHINDUCTOR_CACHE_DIR` a new folder: the
first run of a machine); compiled again with that cache filled (every later run of the same shapes).

    compile overhead = Σ compiled step times − steps × compiled steady step time
    break-even steps = compile overhead / (eager steady step time − compiled steady step time)

where a steady step time is the median of the second half of the steps. Below the break-even, compiling loses time.

    python bench/compile.py [--steps 40]       → bench/results/compile.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, emit, run_child, table, write  # noqa: E402


def config(steps: int, compiled: bool) -> dict:
    from peers import JOB, tunelab_config

    from tunelab.precision import fast_bf16

    cfg = tunelab_config(steps, fast_bf16(), WORK / "compile")
    cfg["train"].update(compile=compiled, logging_steps=1000)
    assert cfg["model"]["max_length"] == JOB["seq"]
    return cfg


def run_side(steps: int, compiled: bool) -> dict:
    from sft import build_tunelab, train_timed

    from tunelab.config import Config

    trainer, *_ = build_tunelab(Config.model_validate(config(steps, compiled)), "compile")
    timer = train_timed(trainer)
    times = timer.step_times
    return {"compiled": trainer.compiled, "bf16": bool(trainer.args.bf16), "step_s": [round(t, 3) for t in times],
            "steady_step_s": round(statistics.median(times[len(times) // 2:]), 3), "total_s": round(sum(times), 2),
            "real_tokens": sum(timer.tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", choices=["eager", "compiled"])
    args = ap.parse_args()
    if args.only:
        emit(run_side(args.steps, args.only == "compiled"))
        return
    steps = ["--steps", str(args.steps)]
    res = {"eager": run_child("compile.py", "eager", *steps)}
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # the children inherit it: cold, then warm
        try:
            res["compiled, cold cache"] = run_child("compile.py", "compiled", *steps)
            res["compiled, warm cache"] = run_child("compile.py", "compiled", *steps)
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    eager = res["eager"].get("steady_step_s")
    rows = []
    for side, r in res.items():
        if "error" in r:
            rows.append([side, None, None, None, None, r.get("peak_rss_mb"), r["error"]])
            continue
        n, steady = len(r["step_s"]), r["steady_step_s"]
        overhead = r["total_s"] - n * steady if r["compiled"] else 0.0
        r["compile_overhead_s"] = round(overhead, 1)
        gain = eager - steady if eager else None
        r["break_even_steps"] = (round(overhead / gain) if gain and gain > 0 else None) if r["compiled"] else None
        rows.append([side, r["step_s"][0], steady, round(overhead, 1) if r["compiled"] else None,
                     r["break_even_steps"], r.get("peak_rss_mb"), None])
    print("\n" + table(rows, [f"LoRA SFT, {args.steps} steps", "first step s", "steady step s",
                              "compile overhead s", "break-even steps", "peak RSS MB", "error"]))
    cold = res["compiled, cold cache"]
    speedup = round(eager / cold["steady_step_s"], 2) if eager and "steady_step_s" in cold else None
    print(f"steady-state speed-up of the compiled blocks: {speedup}×; break-even with a cold cache: "
          f"{cold.get('break_even_steps')} steps, warm: {res['compiled, warm cache'].get('break_even_steps')} steps")
    payload = {"settings": vars(args), "results": res, "steady_speedup": speedup,
               "break_even_steps": {"cold": cold.get("break_even_steps"),
                                    "warm": res["compiled, warm cache"].get("break_even_steps")}}
    print(f"wrote {write('compile', payload)}")


if __name__ == "__main__":
    main()
