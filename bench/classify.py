"""Sequence classification, tunelab vs the articles' recipe: minilm full fine-tune and LoRA on the shipped
sentiment data (UCI sentiment sentences).

Recipe: transformers `Trainer`, every example padded to 512 tokens (`padding="max_length"`), fp32; LoRA through
peft with the same rank and targets. tunelab: `tunelab.train` with the same model, data, batch size, epochs,
learning rate and seed (its defaults: dynamic padding, bf16 autocast where the CPU has it). Each side runs in its
own child process. Measured: examples/s over the timed steps (the first two are warm-up), peak RSS, and test
accuracy after the same number of epochs. The recipe is slow (~1 example/s here), so both train on the first
--train examples of tunelab's train split and are tested on the first --test of its test split.

    python bench/classify.py [--train 256] [--test 200] [--epochs 1] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, WORK, emit, ratio, run_child, table, write  # noqa: E402

WARMUP = 2
LR = {"full": 5e-5, "lora": 5e-4}  # tunelab's defaults for the two methods


def _peak() -> float | None:
    mm = RESULTS / "matmul.json"
    return json.loads(mm.read_text())["results"]["bf16_gflops"] if mm.exists() else None


def _data(n_train: int, n_test: int) -> tuple[Path, Path]:
    """The same examples for both sides: a prefix of tunelab's own train / test split of the shipped data."""
    from tunelab.config import Config
    from tunelab.tasks import load_splits

    config = Config.model_validate({"model": {"name": "minilm"}, "data": {"train": "sample:sentiment_uci",
                                    "split": {"validation": 0.1, "test": 0.2, "seed": 42}}, "method": "full"})
    splits = load_splits(config)
    WORK.mkdir(parents=True, exist_ok=True)
    out = []
    for name, frame, n in (("train", splits.train, n_train), ("test", splits.test, n_test)):
        path = WORK / f"classify-{name}-{n}.jsonl"
        rows = frame[["text", "label"]].head(n).to_dict("records")
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(path)
    return out[0], out[1]


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t0)

        def examples_per_s(self, batch: int) -> float:
            timed = self.times[WARMUP:]
            return round(len(timed) * batch / sum(timed), 2)

    return StepTimer()


def run_tunelab(args, method: str) -> dict:
    from tunelab.train import train

    train_file, test_file = _data(args.train, args.test)
    config = {"model": {"name": "minilm", "max_length": 128},
              "data": {"train": str(train_file), "test": str(test_file), "split": {"validation": 0.0}},
              "method": {"name": "lora", "r": 8, "alpha": 16} if method == "lora" else "full",
              "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": LR[method], "seed": 42,
                        "logging_steps": 1000},
              "eval": {"earlier_task": None},
              "output": {"dir": str(WORK / f"classify-tunelab-{method}")}}
    timer = _step_timer()
    result = train(_write_config(config, method), overwrite=True, callbacks=(timer,))
    return {"side": "tunelab", "method": method, "bf16": result.metrics["train"]["bf16"],
            "examples_per_s": timer.examples_per_s(args.batch), "steps": len(timer.times),
            "accuracy": round(result.metrics["test"]["accuracy"], 4)}


def _write_config(config: dict, method: str) -> Path:
    import yaml

    path = WORK / f"classify-tunelab-{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_recipe(args, method: str) -> dict:
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    from tunelab.models import resolve

    train_file, test_file = _data(args.train, args.test)
    labels = ["negative", "positive"]
    path = resolve("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load(file):
        rows = [json.loads(line) for line in file.read_text().split("\n") if line]
        enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True, max_length=512)
        return datasets.Dataset.from_dict({**enc, "labels": [labels.index(r["label"]) for r in rows]})

    train_ds, test_ds = load(train_file), load(test_file)
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS",
                                                 target_modules=["query", "key", "value"]))
    timer = _step_timer()
    targs = TrainingArguments(output_dir=str(WORK / f"classify-recipe-{method}"), num_train_epochs=args.epochs,
                              per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
                              learning_rate=LR[method], use_cpu=True, report_to="none", save_strategy="no",
                              logging_steps=1000, seed=42, warmup_steps=0.1, weight_decay=0.01)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, callbacks=[timer])
    trainer.train()
    predicted = np.argmax(trainer.predict(test_ds).predictions, -1)
    accuracy = float((predicted == np.array(test_ds["labels"])).mean())
    return {"side": "recipe", "method": method, "bf16": False, "examples_per_s": timer.examples_per_s(args.batch),
            "steps": len(timer.times), "accuracy": round(accuracy, 4)}


def _work(args) -> dict:
    """Matmul weights N (every nn.Linear: embeddings are lookups, not matmuls) and real tokens per example."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.models import resolve

    path = resolve("minilm")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    train_file, _ = _data(args.train, args.test)
    texts = [json.loads(line)["text"] for line in train_file.read_text().split("\n") if line]
    tokens = sum(len(ids) for ids in AutoTokenizer.from_pretrained(path)(texts, truncation=True,
                                                                        max_length=128)["input_ids"])
    return {"n_matmul": n, "tokens_per_example": round(tokens / len(texts), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=256)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--only")
    args = ap.parse_args()
    if args.only:
        side, method = args.only.split("-")
        emit((run_tunelab if side == "tunelab" else run_recipe)(args, method))
        return
    common = ["--train", str(args.train), "--test", str(args.test), "--epochs", str(args.epochs),
              "--batch", str(args.batch)]
    work = _work(args)
    peak = _peak()
    res, rows = {}, []
    for method in args.methods.split(","):
        for side in ("recipe", "tunelab"):
            res[f"{side}-{method}"] = r = run_child("classify.py", f"{side}-{method}", *common)
            if r.get("examples_per_s"):  # useful work only: real tokens, not the recipe's padding
                per_token = (6 if method == "full" else 4) * work["n_matmul"]
                r["model_gflops_per_s"] = round(per_token * work["tokens_per_example"] * r["examples_per_s"] / 1e9, 2)
                r["mfu_bf16_peak"] = round(r["model_gflops_per_s"] / peak, 4) if peak else None
            rows.append([f"{method} {side}", r.get("bf16"), r.get("examples_per_s"), r.get("accuracy"),
                         r.get("mfu_bf16_peak"), r.get("peak_rss_mb"), r.get("error")])
    print("\n" + table(rows, ["minilm classify", "bf16", "examples/s", "test accuracy", "MFU", "peak RSS MB",
                              "error"]))
    print(f"MFU: (6 full | 4 lora)·N·real tokens/s over the bf16 matmul peak {peak} GFLOP/s; N = {work['n_matmul']:,} "
          f"matmul weights, {work['tokens_per_example']} real tokens per example")
    speedups = {m: ratio(res[f"tunelab-{m}"].get("examples_per_s"), res[f"recipe-{m}"].get("examples_per_s"))
                for m in args.methods.split(",")}
    print("tunelab / recipe examples/s: " + ", ".join(f"{m} {s}×" for m, s in speedups.items()))
    payload = {"settings": vars(args), "work": work, "bf16_peak_gflops": peak, "results": res,
               "speedup_examples_per_s": speedups}
    print(f"wrote {write('classify', payload)}")


if __name__ == "__main__":
    main()
