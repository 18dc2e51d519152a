"""What LoRA dropout costs a CPU step, with PyTorch's dropout and with tunelab's (tunelab/dropout.py: the mask from
NumPy's PCG64 instead of PyTorch's one-element-at-a-time Mersenne Twister).

The job is bench/sft.py's (SmolLM2-135M, LoRA r 8, the shipped EN→FR split, packing, bf16 where the CPU has it,
batch 4 × 256), on tunelab's default targets (q,k,v,o) and on `all-linear`, each with dropout 0, with dropout 0.1 as
tunelab runs it, and with dropout 0.1 on PyTorch's `nn.Dropout` (what PEFT puts there). Every side runs in its own
process, the sides alternate, and each reports the median of its timed steps (after sft.WARMUP).

    python bench/dropout.py [--steps 12] [--repeats 2]       → bench/results/dropout.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, run_child, table, write  # noqa: E402

SIDES = {"dropout 0": (0.0, False), "dropout 0.1": (0.1, False), "dropout 0.1, PyTorch's mask": (0.1, True)}


def run_side(args) -> dict:
    import copy

    from sft import CONFIG, WARMUP, build_tunelab, train_timed

    import tunelab.dropout
    from tunelab.config import Config

    p, native = SIDES[args.only]
    if native:  # PEFT's nn.Dropout left in place
        tunelab.dropout.use_cpu_dropout = lambda model: 0
    cfg = copy.deepcopy(CONFIG)
    cfg["method"].update(dropout=p, target_modules=args.targets)
    cfg["train"].update(batch_size=4, max_steps=args.steps)
    trainer, *_ = build_tunelab(Config.model_validate(cfg), "dropout")
    times = train_timed(trainer).step_times[WARMUP:]
    return {"step_s": round(statistics.median(times), 3), "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--targets", default="auto")
    ap.add_argument("--only", choices=list(SIDES))
    args = ap.parse_args()
    if args.only:
        emit(run_side(args))
        return
    results: dict = {}
    for targets in ("auto", "all-linear"):
        runs: dict = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side in SIDES:
                r = run_child("dropout.py", side, "--steps", str(args.steps), "--targets", targets)
                if "step_s" in r:
                    runs[side].append(r["step_s"])
        results[targets] = {side: {"step_s": round(statistics.median(v), 3) if v else None, "runs": v}
                            for side, v in runs.items()}
    rows = [[t, side, r["step_s"], " / ".join(map(str, r["runs"]))] for t, sides in results.items()
            for side, r in sides.items()]
    print("\n" + table(rows, ["LoRA targets", "side", "median step s", "runs"]))
    print(f"wrote {write('dropout', {'settings': {'steps': args.steps, 'repeats': args.repeats}, 'results': results})}")


if __name__ == "__main__":
    main()
