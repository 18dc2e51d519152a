"""Measure what the docs report: run the shipped examples and collect their numbers, as the code wrote them, into
docs/results/NAME.json. `scripts/docs_tables.py` renders the docs' tables from those files.

    python scripts/docs_results.py                  # list the measurements and whether each has a result file
    python scripts/docs_results.py compare-sentiment translate-fr ...

Each measurement trains real runs (minutes to an hour on a 2-core CPU); runs go to runs/docs/ and are reused when
they finished with the same config. The machine each file was measured on is recorded in it.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
RUNS = ROOT / "runs" / "docs"


def _tunelab(*args: str) -> None:
    cmd = [sys.executable, "-m", "tunelab", *args]
    print("$ tunelab " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _train(config: str, name: str, *sets: str) -> dict:
    """Train `config` into runs/docs/NAME (reused when it finished with the same config); its record."""
    out = RUNS / name
    status = out / "status.json"
    args = ["train", config, "--set", f"output.dir={out}", *[a for s in sets for a in ("--set", s)]]
    if not (status.exists() and json.loads(status.read_text()).get("state") == "completed"):
        _tunelab(*args, "--overwrite")
    return _record(out)


def _record(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    config = (run / "config.yaml").read_text()
    return {"run": str(run.relative_to(ROOT)), "metrics": metrics, "peak_rss_mb": manifest.get("peak_rss_mb"),
            "wall_time_s": manifest.get("wall_time_s"), "device": manifest.get("device"),
            "bf16": manifest.get("bf16"), "config": config}


def _base(config: str, *sets: str) -> dict:
    """`tunelab eval --base`: the untrained model's test metrics, as the code prints and returns them."""
    from tunelab.evaluate import evaluate_base

    return evaluate_base(ROOT / config, list(sets))


def _compare(name: str) -> dict:
    """`tunelab compare examples/NAME.yaml` (finished entries are reused: same config hash) and its results.json,
    with the wall time of this invocation."""
    import shutil

    t0 = time.time()
    _tunelab("compare", f"examples/{name}.yaml")
    out = ROOT / "runs" / f"compare-{name}"
    result = json.loads((out / "results.json").read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    for plot in out.glob("*.png"):  # the report's plots, for the docs pages
        shutil.copyfile(plot, RESULTS / f"{name}-{plot.name}")
    return {**result, "compare_wall_s": round(time.time() - t0)}


def compare_sentiment() -> dict:
    return _compare("compare-sentiment")


def compare_sentiment_curves() -> dict:
    return _compare("compare-sentiment-curves")


def compare_translate_fr() -> dict:
    return _compare("compare-translate-fr")


def translate_fr() -> dict:
    return {"base": _base("examples/translate-fr-lora.yaml"), "lora": _train("examples/translate-fr-lora.yaml",
                                                                            "translate-fr-lora")}


def benchmarks() -> dict:
    """`tunelab eval RUN --benchmark` with tunelab's two shipped harness tasks on the EN→FR LoRA run (and its base):
    what the run printed as JSON, with the two commands' wall times (the second reads the caches)."""
    run = RUNS / "translate-fr-lora"
    _train("examples/translate-fr-lora.yaml", "translate-fr-lora")
    args = [sys.executable, "-m", "tunelab", "eval", str(run), "--benchmark", "tunelab_sentiment,tunelab_translate_de"]
    out = {}
    for call in ("first", "cached"):
        t0 = time.time()
        print("$ tunelab " + " ".join(args[3:]) + " --json", flush=True)
        done = subprocess.run([*args, "--json"], check=True, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        out[f"{call}_wall_s"] = round(time.time() - t0, 1)
        out["results"] = json.loads(done.stdout)
    out["printed"] = subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True).stdout
    return out


def peft_methods() -> dict:
    """Every PEFT method on the same short EN→FR job (examples/sft-*.yaml), and the untrained model."""
    out = {"base": _base("examples/sft-ia3.yaml")}
    for method in ("prefix", "prompt", "ia3", "adapter", "qlora", "full"):
        out[method] = _train(f"examples/sft-{method}.yaml", f"sft-{method}")
    return out


def forgetting() -> dict:
    """A narrow task, full vs LoRA, at two lengths: task accuracy next to perplexity on general prose."""
    runs = {"full-40": ("full", 40, None), "lora-40": ("lora", 40, None), "full-120": ("full", 120, None),
            "lora-120": ("lora", 120, None), "lora-120-lr1e-4": ("lora", 120, "1e-4")}
    out = {}
    for name, (method, steps, lr) in runs.items():
        sets = [f"method={method}", f"train.max_steps={steps}", f"train.eval_every={steps}"] + \
            ([f"train.lr={lr}"] if lr else [])
        out[name] = _train("examples/forgetting-sentiment.yaml", f"forgetting-{name}", *sets)
    return out


def preferences() -> dict:
    out = {name: _train(f"examples/{name}.yaml", name) for name in ("reward-reviews", "reward-chat-rankings",
                                                                  "dpo-reviews")}
    out["sentiment-full"] = _train("examples/sentiment-full.yaml", "sentiment-full")
    out["rl-positive-reviews"] = _train("examples/rl-positive-reviews.yaml", "rl-positive-reviews",
                                        f"rl.reward.run={RUNS / 'sentiment-full'}")
    samples = RUNS / "rl-positive-reviews" / "samples.jsonl"
    out["rl-samples"] = [json.loads(x) for x in samples.read_text().splitlines()[:6] if x.strip()]
    return out


def export_onnx() -> dict:
    """ONNX export with its parity check and timing, of a LoRA classifier and a full fine-tune."""
    out = {}
    for name in ("sentiment-lora", "sentiment-full"):
        _train(f"examples/{name}.yaml", name)
        target = RUNS / name / "export-onnx"
        _tunelab("export", str(RUNS / name), "--format", "onnx")
        out[name] = json.loads((target / "export.json").read_text())
    return out


MEASUREMENTS = {"compare-sentiment": compare_sentiment, "compare-sentiment-curves": compare_sentiment_curves,
                "compare-translate-fr": compare_translate_fr, "translate-fr": translate_fr,
                "peft-methods": peft_methods, "benchmarks": benchmarks,
                "forgetting": forgetting, "preferences": preferences, "export-onnx": export_onnx}


def commit() -> str:
    """The tunelab commit measured (+ "with uncommitted changes" when src/ differs from it)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain", "src")
                                                   else "")


def machine() -> dict:
    import torch

    from tunelab.precision import fast_bf16

    flags = [f for f in ("avx512_bf16", "amx_tile", "avx512f", "avx2")
             if f in Path("/proc/cpuinfo").read_text(errors="replace")]
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "cpu_flags": flags, "fast_bf16": fast_bf16(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(names: list[str]) -> int:
    if not names:
        for name in MEASUREMENTS:
            path = RESULTS / f"{name}.json"
            when = json.loads(path.read_text()).get("measured_at") if path.exists() else "not measured"
            print(f"{name:<20} {when}")
        return 0
    unknown = [n for n in names if n not in MEASUREMENTS]
    if unknown:
        print(f"unknown measurement(s): {', '.join(unknown)}; known: {', '.join(MEASUREMENTS)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.time()
        result = MEASUREMENTS[name]()
        record = {"measured_at": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0), "machine": machine(),
                  "commit": commit(), "result": result}
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"wrote docs/results/{name}.json ({record['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main(sys.argv[1:]))
