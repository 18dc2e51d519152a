"""The machine's measured matmul peak in fp32 and bf16 (2048² × 2048², best of several runs), the denominator of
model-FLOPs utilisation in the other benchmarks. Writes bench/results/matmul.json.

    python bench/matmul.py
"""
from __future__ import annotations

import time

import torch


def peak_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 40) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return round(2 * n ** 3 / best / 1e9, 1)


def measure() -> dict:
    fp32, bf16 = peak_gflops(torch.float32), peak_gflops(torch.bfloat16)
    return {"fp32_gflops": fp32, "bf16_gflops": bf16, "bf16_over_fp32": round(bf16 / fp32, 2)}


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _common import write

    m = measure()
    print(f"matmul 2048²: fp32 {m['fp32_gflops']} GFLOP/s, bf16 {m['bf16_gflops']} GFLOP/s "
          f"({m['bf16_over_fp32']}× fp32)")
    print(f"wrote {write('matmul', {'results': m})}")
