"""Dropout for adapters (LoRA's `lora_dropout`) with its random mask drawn faster on the CPU — the same
distribution, the same seeding.

PyTorch draws a CPU dropout mask with its Mersenne Twister, one element after another on one thread: 7.5 ms for a
1,024 × 576 activation on a 2-core AMX Xeon, 60 times a multiplication of the same tensor, and LoRA draws one per
adapted module per step. On examples/translate-fr-lora.yaml (all-linear, dropout 0.05, packed) a step took about
twice as long as with dropout 0. Here the mask comes from NumPy's PCG64 generator — 16 random bits per element, four
elements per 64-bit draw — seeded on every call from PyTorch's default generator, so `torch.manual_seed` and the
Trainer's saved RNG state decide it as they decide PyTorch's own dropout (a resumed run draws what an uninterrupted
one does). The backward keeps the mask as one byte per element, as PyTorch's dropout does. The drop probability is
p rounded to a multiple of 1/65,536 and the kept values are scaled by the inverse of the kept fraction, so the
expected output is the input. Outside training, at p = 0, on other devices and inside compiled code (train.compile)
it is PyTorch's dropout.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LEVELS = 1 << 16  # the mask compares 16 random bits per element with p · LEVELS


class _Keep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


def keep_mask(shape, dropped: int) -> torch.Tensor:
    """A boolean mask of `shape`, each element False with probability dropped / LEVELS, from 16 bits of a PCG64
    stream seeded by PyTorch's default generator."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    bits = np.random.PCG64(seed).random_raw((n + 3) // 4).view(np.uint16)[:n]
    return torch.from_numpy(bits >= dropped).reshape(shape)


class CpuDropout(torch.nn.Dropout):
    """`torch.nn.Dropout` whose training-mode mask on a CPU tensor comes from `keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * LEVELS)
        if not self.training or dropped == 0 or dropped >= LEVELS or self.inplace or x.device.type != "cpu" \
                or torch.compiler.is_compiling():  # compiled blocks: Inductor draws its own masks, in the graph
            return super().forward(x)
        return _Keep.apply(x, keep_mask(x.shape, dropped), LEVELS / (LEVELS - dropped))


def use_cpu_dropout(model) -> int:
    """Every adapter dropout of `model` (PEFT's `lora_dropout` dictionaries) made a `CpuDropout` with its p; returns
    how many."""
    count = 0
    for module in model.modules():
        layers = getattr(module, "lora_dropout", None)
        if not isinstance(layers, torch.nn.ModuleDict):
            continue
        for name, layer in layers.items():
            if type(layer) is torch.nn.Dropout:
                layers[name] = CpuDropout(layer.p)
                count += 1
    return count
