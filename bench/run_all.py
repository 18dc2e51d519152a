"""The whole benchmark suite in one command: the machine's matmul peak, then instruction tuning, classification
and frozen-backbone runs, each against the articles' recipe in the same invocation; prints the targets of issue 7
next to what was measured and writes bench/results/summary.json and summary.md (the README's table).

    python bench/run_all.py            (or: make bench)   ~35 min on a 2-core CPU, most of it the recipe,
                                                          plus bench/peers.py (3 × both tools: an hour or more)
    python bench/run_all.py --summary-only                 summary.md from the results already in bench/results/'s
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, ROOT, machine  # noqa: E402


def _run(script: str, *args: str) -> dict:
    t0 = time.time()
    subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], check=True, cwd=ROOT)
    print(f"[{script}: {time.time() - t0:.0f} s]", flush=True)
    return json.loads((RESULTS / script.replace(".py", ".json")).read_text())


def _saved(script: str, *_args: str) -> dict:  # --summary-only: the arguments a run would take
    return json.loads((RESULTS / script.replace(".py", ".json")).read_text())


def main() -> None:
    run = _saved if "--summary-only" in sys.argv else _run  # --summary-only: rebuild summary.md from results/
    mm = run("matmul.py")["results"]
    sft = run("sft.py", "--batch", "4", "--steps", "12") if run is _run else _saved("sft.py")
    cls = run("classify.py")
    frozen = run("frozen.py")["results"]
    peers = run("peers.py", "--repeats", "3")  # LLaMA-Factory side by side; its venv is created once
    run("llamacpp.py")  # llama.cpp on the exported GGUF next to tunelab generate (its table is in docs/performance.md)
    run("generation.py")  # tunelab's generation engines next to each engine driven directly (docs/performance.md)
    run("serving.py")  # the server's latency under load, continuous vs static batches (docs/ship.md)
    run("chat_turns.py")  # multi-turn chat in one pass vs one example per answer (README, docs/generative.md)
    comp = run("compile.py")  # train.compile's break-even: the rule behind `auto` (tunelab/compiling.py)
    ceil = run("ceiling.py")  # the MFU a step of only its GEMMs would reach (docs/performance.md)
    run("dropout.py")  # what LoRA dropout costs a step, PyTorch's mask against tunelab's (docs/performance.md)
    pr, pt, pl = peers["ratios"], peers["summary"]["tunelab"], peers["summary"]["llamafactory"]
    t, r = sft["results"]["tunelab"], sft["results"]["recipe"]
    tc = sft["results"].get("tunelab+compile", {})
    c = cls["results"]
    rows = [
        ("bf16 / fp32 matmul peak (2048²)", "≈6.5× on AMX", f"{mm['bf16_over_fp32']}× ({mm['bf16_gflops']} vs "
         f"{mm['fp32_gflops']} GFLOP/s)"),
        ("sft LoRA smollm2: real tokens/s vs recipe", "≥ 10×",
         f"{sft['speedup_tokens_per_s']}× ({t.get('tokens_per_s')} vs {r.get('tokens_per_s')})"),
        ("sft LoRA smollm2: MFU of bf16 peak, seq 256", "≥ 35%", f"{100 * (t.get('mfu_bf16_peak') or 0):.1f}%"),
        ("sft LoRA smollm2: peak RSS", "≤ 2 GB", f"{t.get('peak_rss_mb')} MB (recipe {r.get('peak_rss_mb')} MB)"),
        ("sft LoRA smollm2: MFU if the step ran only its GEMMs (as timed in it / at their rates alone)", "—",
         f"{100 * ceil['ceilings']['gemm_in_step']['mfu']:.1f}% / {100 * ceil['ceilings']['gemm_isolated']['mfu']:.1f}%"
         f" (the step: {100 * ceil['step']['mfu']:.1f}%)"),
        ("sft LoRA smollm2 with train.compile: tokens/s, MFU, peak RSS", "—",
         f"{sft.get('speedup_compiled_tokens_per_s')}× ({tc.get('tokens_per_s')} tok/s), "
         f"{100 * (tc.get('mfu_bf16_peak') or 0):.1f}%, {tc.get('peak_rss_mb')} MB"),
        ("train.compile: steady speed-up, break-even steps (empty / filled compile cache)", "—",
         f"{comp.get('steady_speedup')}×, {comp['break_even_steps']['cold']} / {comp['break_even_steps']['warm']} "
         f"steps"),
        ("classify full minilm: examples/s vs recipe", "≥ 5×, accuracy ≥ recipe",
         f"{cls['speedup_examples_per_s'].get('full')}× ({c['tunelab-full'].get('examples_per_s')} vs "
         f"{c['recipe-full'].get('examples_per_s')}); accuracy {c['tunelab-full'].get('accuracy')} vs "
         f"{c['recipe-full'].get('accuracy')}"),
        ("classify LoRA minilm: examples/s vs recipe", "—",
         f"{cls['speedup_examples_per_s'].get('lora')}× ({c['tunelab-lora'].get('examples_per_s')} vs "
         f"{c['recipe-lora'].get('examples_per_s')}); accuracy {c['tunelab-lora'].get('accuracy')} vs "
         f"{c['recipe-lora'].get('accuracy')}"),
        ("head: epoch 1 / later epochs", "≥ 10×", f"{frozen['head'].get('first_over_later')}× "
         f"({frozen['head'].get('first_epoch_s')} s → {frozen['head'].get('later_epoch_s')} s)"),
        ("last_layers 2: epoch 1 / later epochs", "≥ 10×", f"{frozen['last_layers'].get('first_over_later')}× "
         f"({frozen['last_layers'].get('first_epoch_s')} s → {frozen['last_layers'].get('later_epoch_s')} s)"),
        ("features: one pass + logistic regression", "—", f"{frozen['features'].get('train_s')} s"),
        ("sft LoRA smollm2 vs LLaMA-Factory: real tokens/s", "≥ 2×",
         f"{pr['tokens_per_s']}× ({pt['tokens_per_s']['median']} vs {pl['tokens_per_s']['median']})"),
        ("sft LoRA smollm2 vs LLaMA-Factory: whole-process peak RSS", "≤ 1×",
         f"{pr['peak_rss']}× ({pt['peak_rss_mb']['median']} vs {pl['peak_rss_mb']['median']} MB)"),
    ]
    md = ["| measure | target | measured |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
    (RESULTS / "summary.md").write_text("\n".join(md) + "\n")
    (RESULTS / "summary.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    print("\n" + "\n".join(md))


if __name__ == "__main__":
    main()
