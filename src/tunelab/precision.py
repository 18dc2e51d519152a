"""Numeric precision: whether bf16 pays off on this machine, and the dtypes a run loads and trains in."""
from __future__ import annotations


def fast_bf16() -> bool:
    """bf16 autocast pays off: a bf16-capable GPU, or a CPU with AVX512-BF16 or AMX tiles (on a CPU without them
    bf16 matrix products are emulated and far slower than fp32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def use_bf16(config) -> bool:
    if config.train.precision == "auto":
        return fast_bf16()
    return config.train.precision == "bf16"


def base_dtype(config, frozen: bool):
    """bf16 for the base of a method that keeps it `frozen` (its module sets FROZEN_BASE) when bf16 is on: half the
    memory, no per-step casts under autocast; the trainable parameters keep fp32 copies (bench/sft.py)."""
    import torch

    return torch.bfloat16 if use_bf16(config) and frozen else torch.float32


def fp32_trainable(model) -> None:
    """Trainable parameters in fp32 (the optimizer's updates are lost in bf16)."""
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
