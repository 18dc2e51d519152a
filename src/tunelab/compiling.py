"""train.compile: torch.compile each transformer block for training (regional compilation), and the `auto` rule.

Compiling fuses the elementwise work of a block (norms, SiLU·up, rotary embeddings, residual adds) into a few
generated kernels: fewer passes over memory and fewer saved activations. It costs a one-off compile at the first
step (Inductor keeps the generated code in its on-disk cache, so a second run of the same shapes compiles in a few
seconds) and pays back per step. `auto` compiles when the platform has what Inductor needs and the run has enough
optimizer steps to pay the compile back: MIN_STEPS, the largest break-even bench/compile.py has measured (a cold
cache, the sft LoRA benchmark job), so the rule errs towards not compiling.
"""
from __future__ import annotations

import math
import os
import platform
import shutil
import sysconfig
from pathlib import Path

MIN_STEPS = 130
"""Optimizer steps from which `auto` compiles. bench/compile.py (smollm2 LoRA, batch 4 × 256, 40 steps) measured a
cold-cache break-even of 61 steps on a 2-core AMX Xeon in bf16 (1.57× per step, 37 s to compile) and, earlier, of
121 steps on a 2-core AVX2-only EPYC in fp32 (1.09× per step, 54 s to compile — measured when an epoch's short last
batch still recompiled every block, which the AMX machine then paid 43 of its 91 s for); warm-cache break-evens 6
and 18 steps. Rounded up from the larger, since single steps vary by ±10% on those machines."""


def unsupported() -> str | None:
    """Why Inductor cannot compile here (None: it can). CPU: Linux with a C++ compiler and Python's headers; GPU:
    CUDA with Triton importable."""
    import torch

    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (Inductor generates Triton kernels for CUDA)"
        return None
    if platform.system() != "Linux":
        return f"Inductor's CPU backend is only relied on under Linux here, not {platform.system()}"
    compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if compiler is None:
        return "no C++ compiler found (g++, c++ or clang++; Inductor compiles CPU kernels with it)"
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        return f"Python's C headers are missing ({include}/Python.h; e.g. the python3-dev package)"
    return None


def planned_steps(trainer) -> int | None:
    """Optimizer steps the run will take, as the Trainer counts them (None: unknown, e.g. a stream of rows)."""
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    try:
        rows = len(trainer.train_dataset)
    except TypeError:  # an iterable dataset has no length
        return None
    batches = math.ceil(rows / (args.per_device_train_batch_size * args.world_size))
    return math.ceil(max(batches // args.gradient_accumulation_steps, 1) * args.num_train_epochs)


def decide(setting, steps: int | None, why_not: str | None) -> tuple[bool, str]:
    """(compile or not, the reason in words) for train.compile `setting` (True, False or "auto")."""
    if setting is False:
        return False, "off (train.compile: false)"
    if setting is True:
        return True, "on (train.compile: true)"
    if why_not:
        return False, f"off: {why_not}"
    if steps is None:
        return False, "off: the number of steps is unknown"
    if steps < MIN_STEPS:
        return False, f"off: {steps} steps are too few to pay back the compile time (auto compiles from {MIN_STEPS})"
    return True, f"on: {steps} steps (auto compiles from {MIN_STEPS}, bench/compile.py)"


def compile_blocks(model) -> None:
    """torch.compile every transformer block in place: the state dict, checkpoints and the saved model keep their
    keys (`Module.compile`, not a wrapper module)."""
    from .methods.freezing import transformer_blocks

    for block in transformer_blocks(model)[1]:
        block.compile()


def drops_out(model) -> bool:
    """Whether the model trains with adapter dropout (p > 0). Compiled blocks then draw the masks with Inductor's
    CPU generator: on examples/translate-fr-lora.yaml packed (dropout 0.05, all-linear) compiled steps took
    4.9–5.3 s against 4.0–4.4 s eager with PyTorch's masks, and tunelab's eager masks (tunelab/dropout.py) are
    faster still; bench/compile.py's job has dropout 0."""
    from .dropout import CpuDropout

    return any(isinstance(m, CpuDropout) and m.p > 0 for m in model.modules())


def apply(trainer, setting, shape_varies: str | None = None) -> dict:
    """Decide for this trainer's run and compile if so; the decision (for metrics.json) is kept as
    `trainer.compile_decision` and returned. `auto` does not compile where Inductor cannot run, where the batches
    change shape (`shape_varies`, the caller's reason: every new shape recompiles every block) or where adapters
    drop out (`drops_out`)."""
    why_not = None
    if setting == "auto":
        why_not = shape_varies or unsupported() or (
            "adapter dropout: compiled dropout masks measured slower than tunelab's eager ones"
            if drops_out(trainer.model) else None)
    on, reason = decide(setting, planned_steps(trainer), why_not)
    if on:
        compile_blocks(trainer.model)
    if setting == "auto":
        print(f"tunelab: train.compile auto: {reason}")
    trainer.compile_decision = {"on": on, "reason": reason}
    return trainer.compile_decision
