"""How far the sft LoRA step could go on this machine if everything but its matrix products were free: the
ceiling on model-FLOPs utilisation (MFU) and tokens/s that the GEMMs themselves set.

The job is bench/sft.py's (SmolLM2-135M, LoRA r 8 on q,k,v,o, the shipped EN→FR split, packing, bf16 where the CPU
has it, --batch × --seq tokens), built as `tunelab train` builds it. Steps are timed without a profiler; then a few
steps run under PyTorch's profiler (shapes recorded), which gives the time the step spends in its GEMMs
(`aten::mm` / `addmm` / `bmm`) and in the attention kernel. Every GEMM shape of the step is then replayed alone,
bf16, best of several calls with the weight in either layout — a rate no fusion of the other operations can beat.

Reported (bench/results/ceiling.json): the step's real tokens/s and MFU (bench/sft.py's model FLOPs: 4·N_body per
token + 4·N_head per labelled token; attention scores left out) against the bf16 matmul peak measured right before
and after (the higher), the GEMMs' share of the step, and the ceilings: MFU and tokens/s if the step took only
(a) its GEMMs as timed inside the step, (b) those plus the attention kernel, (c) its GEMMs at their best isolated
rates.

    python bench/ceiling.py [--batch 4] [--seq 256]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write  # noqa: E402

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = "aten::_scaled_dot_product_flash_attention"  # its CPU forward and backward kernels start so
TIMED, PROFILED = 6, 3  # steps after sft.WARMUP


def _gemm_flops(name: str, shapes: list) -> tuple[int, tuple]:
    """FLOPs of one call and the (m, k, n[, batch]) it multiplies."""
    if name == "aten::addmm":
        shapes = shapes[1:]
    a, b = shapes[0], shapes[1]
    if name == "aten::bmm":
        return 2 * a[0] * a[1] * a[2] * b[2], (a[1], a[2], b[2], a[0])
    return 2 * a[0] * a[1] * b[1], (a[0], a[1], b[1], 1)


def _best_time(m: int, k: int, n: int, batch: int, dtype) -> float:
    """Seconds of the fastest of several calls of this product, weight contiguous or transposed."""
    import torch

    a = torch.randn(batch, m, k, dtype=dtype) if batch > 1 else torch.randn(m, k, dtype=dtype)
    layouts = [torch.randn(n, k, dtype=dtype).t(), torch.randn(k, n, dtype=dtype)]
    if batch > 1:
        layouts = [w.expand(batch, k, n).contiguous() for w in layouts[1:]]
    best = float("inf")
    for w in layouts:
        for _ in range(3):
            a @ w
        for _ in range(12):
            t0 = time.perf_counter()
            a @ w
            best = min(best, time.perf_counter() - t0)
    return best


def measure(args) -> dict:
    import torch
    from matmul import peak_gflops
    from sft import WARMUP, Timer, _config, _param_split, build_tunelab
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from tunelab.config import Config

    args.steps = WARMUP + TIMED + PROFILED
    args.compile = False
    peak_before = peak_gflops(torch.bfloat16)
    trainer, *_ = build_tunelab(Config.model_validate(_config(args)), "ceiling")
    timer = Timer(trainer.data_collator)
    trainer.data_collator = timer
    trainer.add_callback(timer.callback)
    state: dict = {}

    class Profile(TrainerCallback):  # profiles the last PROFILED steps only
        def on_step_begin(self, a, st, control, **kw):
            if st.global_step == WARMUP + TIMED:
                state["prof"] = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
                state["prof"].__enter__()

        def on_train_end(self, a, st, control, **kw):
            state["prof"].__exit__(None, None, None)

    trainer.add_callback(Profile())
    trainer.args.save_strategy = "no"
    trainer.args.eval_strategy = "no"
    trainer.train()
    peak_after = peak_gflops(torch.bfloat16)
    peak = max(peak_before, peak_after)
    dtype = torch.bfloat16 if trainer.args.bf16 else torch.float32

    n_body, n_head = _param_split(trainer.model)
    timed = slice(WARMUP, WARMUP + TIMED)
    step_s = statistics.median(timer.step_times[timed])
    tokens = statistics.mean(timer.tokens[timed])
    labelled = statistics.mean(timer.labelled[timed])
    flops = 4 * n_body * tokens + 4 * n_head * labelled  # per step, as bench/sft.py counts them

    prof = state["prof"]
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    gemm_us, attention_us, gemm_flops = 0.0, 0.0, 0
    shapes: dict = defaultdict(int)
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in GEMMS and e.input_shapes:
            f, mkn = _gemm_flops(e.key, e.input_shapes)
            gemm_us += e.self_cpu_time_total
            gemm_flops += f * e.count
            shapes[mkn] += e.count
        elif e.key.startswith(ATTENTION):
            attention_us += e.self_cpu_time_total
    gemm_share = gemm_us / total_us
    attention_share = attention_us / total_us
    isolated_s = sum(count * _best_time(*mkn, dtype) for mkn, count in shapes.items()) / PROFILED

    def ceiling(seconds: float) -> dict:
        return {"step_s": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                "mfu": round(flops / seconds / 1e9 / peak, 3)}

    return {
        "settings": {"batch": args.batch, "seq": args.seq, "bf16": dtype == torch.bfloat16,
                     "timed_steps": TIMED, "profiled_steps": PROFILED},
        "bf16_peak_gflops": {"before": peak_before, "after": peak_after, "used": peak},
        "step": {**ceiling(step_s), "real_tokens": round(tokens, 1), "labelled_tokens": round(labelled, 1),
                 "model_gflop": round(flops / 1e9, 2)},
        "shares": {"gemm": round(gemm_share, 3), "attention": round(attention_share, 3),
                   "other": round(1 - gemm_share - attention_share, 3)},
        "gemm": {"calls_per_step": round(sum(shapes.values()) / PROFILED), "shapes": len(shapes),
                 "gflop_per_step": round(gemm_flops / PROFILED / 1e9, 2),
                 "in_step_gflops": round(gemm_flops / (gemm_us / 1e6) / 1e9, 1),
                 "isolated_gflops": round(gemm_flops / PROFILED / isolated_s / 1e9, 1)},
        "ceilings": {"gemm_in_step": ceiling(step_s * gemm_share),
                     "gemm_and_attention_in_step": ceiling(step_s * (gemm_share + attention_share)),
                     "gemm_isolated": ceiling(isolated_s)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    res = measure(args)
    s, c = res["step"], res["ceilings"]
    rows = [["this step", s["step_s"], s["tokens_per_s"], s["mfu"]]] + [
        [f"only {name.replace('_', ' ')}", v["step_s"], v["tokens_per_s"], v["mfu"]] for name, v in c.items()]
    print("\n" + table(rows, [f"sft LoRA step, {args.batch} × {args.seq}", "step s", "real tok/s", "MFU"]))
    print(f"GEMMs {100 * res['shares']['gemm']:.0f}% of the step, attention {100 * res['shares']['attention']:.0f}%; "
          f"GEMM rate in the step {res['gemm']['in_step_gflops']} GFLOP/s, alone {res['gemm']['isolated_gflops']}; "
          f"bf16 peak {res['bf16_peak_gflops']['used']} GFLOP/s")
    print(f"wrote {write('ceiling', res)}")


if __name__ == "__main__":
    main()
