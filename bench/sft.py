"""Instruction tuning, tunelab vs the articles' recipe: SmolLM2-135M + LoRA on the shipped EN→FR instructions.

Recipe: transformers `Trainer`, every example padded to 512 tokens (`padding="max_length"`), fp32, the same
LoRA (peft), data, batch size and number of steps. tunelab: its own trainer as `tunelab train` builds it
(TRL SFTTrainer; packing into rows of --seq tokens, padding-free; bf16 where the CPU has it; LM head only on
completion tokens). Each side runs in its own child process (its peak RSS is its own).

Reported: real (non-padding) tokens/s over the timed steps, peak RSS, and model-FLOPs utilisation against the
measured bf16 matmul peak (bench/matmul.py). Model FLOPs of a LoRA step (frozen base weights: forward 2·N, backward
to the activations 2·N, no weight gradients) = 4·N_body·tokens + 4·N_head·completion_tokens, where N_body is every
matmul weight except the LM head (N_head = vocab × hidden), which runs only on tokens that carry a label;
attention-score FLOPs are left out (under 7% at 256 tokens).

    python bench/sft.py [--steps 12] [--batch 8] [--seq 256]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, WORK, emit, ratio, run_child, table, write  # noqa: E402

CONFIG = {
    "model": {"name": "smollm2-135m", "max_length": 256},
    "task": "sft",
    "data": {"train": "sample:translate_en_fr", "split": {"validation": 0.1, "test": 0.2, "seed": 42},
             "prompt": "en", "response": "fr",
             "instruction": "Translate this English user-interface text into French."},
    "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "train": {"batch_size": 8, "max_steps": 12, "packing": True, "logging_steps": 1000},
}
WARMUP = 2  # untimed steps (allocator and kernel warm-up)


class Timer:
    """A TrainerCallback timing steps after WARMUP, and a collator wrapper counting real and label tokens."""

    def __init__(self, collator):
        from transformers import TrainerCallback

        self.collator, self.tokens, self.labelled, self.step_times = collator, [], [], []
        timer = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                from _common import peak_rss_mb

                timer.rss_before = peak_rss_mb()

            def on_step_begin(self, args, state, control, **kw):
                timer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.step_times.append(time.perf_counter() - timer._t0)

        self.callback = _CB()

    def __call__(self, features):
        batch = self.collator(features)
        if "attention_mask" in features[0]:  # the recipe's examples come padded
            self.tokens.append(sum(sum(f["attention_mask"]) for f in features))
        else:
            self.tokens.append(sum(len(f["input_ids"]) for f in features))
        labels = batch["labels"]
        self.labelled.append(int((labels[:, 1:] != -100).sum()))
        return batch

    def result(self, n_body: int, n_head: int, peak_gflops: float | None) -> dict:
        steps = len(self.step_times)
        timed = self.step_times[WARMUP:]
        tokens, labelled = sum(self.tokens[WARMUP:steps]), sum(self.labelled[WARMUP:steps])
        seconds = sum(timed)
        flops = 4 * n_body * tokens + 4 * n_head * labelled
        out = {"peak_rss_before_training_mb": getattr(self, "rss_before", None), "timed_steps": len(timed),
               "seconds": round(seconds, 2), "real_tokens": tokens,
               "completion_tokens": labelled, "tokens_per_s": round(tokens / seconds, 1),
               "model_gflops_per_s": round(flops / seconds / 1e9, 1)}
        if peak_gflops:
            out["mfu_bf16_peak"] = round(flops / seconds / 1e9 / peak_gflops, 3)
        return out


def train_timed(trainer) -> Timer:
    """Train `trainer` (no saving, no evaluation) with its steps timed and its tokens counted."""
    timer = Timer(trainer.data_collator)
    trainer.data_collator = timer
    trainer.add_callback(timer.callback)
    trainer.args.save_strategy = "no"
    trainer.args.eval_strategy = "no"
    trainer.train()
    return timer


def build_tunelab(config, name: str) -> tuple:
    """tunelab's trainer for `config` (a Config) as `tunelab train` builds it, writing under bench/.runs/NAME;
    returns build_trainer's (trainer, tokenizer, params, encoded, datasets)."""
    from tunelab.models import resolve
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    run = RunDir(WORK / name)
    run.path.mkdir(parents=True, exist_ok=True)
    return TASKS[config.task].build_trainer(config, load_splits(config), resolve(config.model.name), run)


def _param_split(model) -> tuple[int, int]:
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "embed_tokens" not in n and "lora_" not in n and "lm_head" not in n)
    return body, head


def _config(args) -> dict:
    import copy

    cfg = copy.deepcopy(CONFIG)
    cfg["model"]["max_length"] = args.seq
    cfg["train"].update(batch_size=args.batch, max_steps=args.steps, compile=bool(getattr(args, "compile", False)))
    return cfg


def run_tunelab(args) -> dict:
    from tunelab.config import Config

    trainer, *_ = build_tunelab(Config.model_validate(_config(args)), "sft-tunelab")
    timer = train_timed(trainer)
    # the matmul peak measured again in this process, right after the timed steps (it drifts between runs on a
    # shared machine); MFU uses the higher of that and the suite's own measurement
    import torch
    from matmul import peak_gflops

    peak = max(args.peak or 0, peak_gflops(torch.bfloat16))
    return {"side": "tunelab", "compile": args.compile, "bf16": bool(trainer.args.bf16), "packing": True,
            "seq": args.seq,
            "bf16_peak_gflops": peak, **timer.result(*_param_split(trainer.model), peak)}


def run_recipe(args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from tunelab.config import Config
    from tunelab.models import resolve
    from tunelab.tasks import load_splits, sft

    config = Config.model_validate(_config(args))
    path = resolve(config.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    splits = load_splits(config)
    rows = sft.encode_conversations(list(splits.train["_conv"]), tokenizer, config.data, 512).rows
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def padded(r):  # the recipe: every example padded to 512, loss on the response only
        n = len(r["input_ids"])
        labels = [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]
        return {"input_ids": r["input_ids"] + [pad] * (512 - n), "attention_mask": [1] * n + [0] * (512 - n),
                "labels": labels + [-100] * (512 - n)}

    ds = datasets.Dataset.from_list([padded(r) for r in rows])
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]  # what tunelab's lora `auto` picks on this model
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=config.method.dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    from transformers import default_data_collator

    timer = Timer(default_data_collator)
    targs = TrainingArguments(output_dir=str(WORK / "sft-recipe"), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=5e-4, use_cpu=True, report_to="none",
                              save_strategy="no", logging_steps=1000, dataloader_num_workers=0, seed=42)
    trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=timer, callbacks=[timer.callback])
    trainer.train()
    return {"side": "recipe", "bf16": False, "packing": False, "seq": 512,
            **timer.result(*_param_split(model), args.peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--peak", type=float, default=None, help="bf16 matmul GFLOP/s (default: bench/results/matmul.json)")
    ap.add_argument("--only", choices=["tunelab", "recipe"])
    ap.add_argument("--compile", action="store_true", help="tunelab side with train.compile: true")
    args = ap.parse_args()
    if args.peak is None:
        import json

        mm = RESULTS / "matmul.json"
        args.peak = json.loads(mm.read_text())["results"]["bf16_gflops"] if mm.exists() else None
    if args.only:
        emit((run_tunelab if args.only == "tunelab" else run_recipe)(args))
        return
    if args.peak is None:
        from matmul import measure

        args.peak = measure()["bf16_gflops"]
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--peak", str(args.peak)]
    res = {side: run_child("sft.py", side, *common) for side in ("recipe", "tunelab")}
    res["tunelab+compile"] = run_child("sft.py", "tunelab", *common, "--compile")
    rows = [[side, r.get("seq"), r.get("bf16"), r.get("tokens_per_s"), r.get("model_gflops_per_s"),
             r.get("mfu_bf16_peak"), r.get("peak_rss_mb"), r.get("error")] for side, r in res.items()]
    print("\n" + table(rows, ["sft smollm2 LoRA", "seq", "bf16", "real tok/s", "GFLOP/s", "MFU", "peak RSS MB",
                              "error"]))
    speedup = ratio(res["tunelab"].get("tokens_per_s"), res["recipe"].get("tokens_per_s"))
    compiled = ratio(res["tunelab+compile"].get("tokens_per_s"), res["recipe"].get("tokens_per_s"))
    print(f"tunelab / recipe real tokens/s: {speedup}× (train.compile: {compiled}×)  (bf16 matmul peak {args.peak} "
          "GFLOP/s)")
    payload = {"settings": vars(args), "results": res, "speedup_tokens_per_s": speedup,
               "speedup_compiled_tokens_per_s": compiled}
    print(f"wrote {write('sft', payload)}")


if __name__ == "__main__":
    main()
