"""Train a run from a config: check everything a user can get wrong first, then train, evaluate and save.

Order matters for "nothing is lost": config, model and data are checked before the run directory exists,
so a user mistake never leaves a directory behind; anything that fails later marks the run `failed`.
"""
from __future__ import annotations

import json
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .config import Config, load_config
from .data import Splits, load_splits
from .errors import TunelabError
from .methods import METHODS
from .methods.freezing import count_parameters
from .models import resolve
from .report import plot_loss, read_jsonl
from .runs import RunDir, default_dir
from .tasks import classify


@dataclass
class RunResult:
    path: Path
    config: Config
    metrics: dict
    manifest: dict


def fast_bf16() -> bool:
    """bf16 autocast pays off: a bf16-capable GPU, or a CPU with AVX512-BF16 or AMX tiles."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def use_bf16(config: Config) -> bool:
    if config.train.precision == "auto":
        return fast_bf16()
    return config.train.precision == "bf16"


def train(config: str | Path | Config, overrides: list[str] | tuple[str, ...] = (), *, resume: bool = False,
          overwrite: bool = False, config_path: str | Path | None = None) -> RunResult:
    """Run the config end to end; return the run path and its final metrics."""
    if not isinstance(config, Config):
        config_path = config
        config = load_config(config, overrides)
    model_dir = resolve(config.model.name)
    splits = load_splits(config)
    out = Path(config.output.dir) if config.output.dir else default_dir(config_path)
    run = RunDir.start(out, config, resume=resume, overwrite=overwrite)
    started = time.time()
    try:
        if config.method.name == "features":
            outcome = _train_features(config, splits, model_dir, run)
        elif config.task == "sft":
            outcome = _train_sft(config, splits, model_dir, run, resume)
        else:
            outcome = _train_with_trainer(config, splits, model_dir, run, resume)
        result = _finish(config, splits, run, started, *outcome)
    except KeyboardInterrupt:
        run.set_state("interrupted", error="stopped by the user; continue with --resume")
        raise
    except BaseException as exc:
        run.set_state("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return result


# ------------------------------------------------------------------------------------------------- features

def _train_features(config: Config, splits: Splits, model_dir: str, run: RunDir):
    from transformers import AutoModel, AutoTokenizer

    from .methods import features

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    data, opts = config.data, config.method
    t0 = time.time()
    pairs = splits.train[data.text_pair].astype(str).tolist() if data.text_pair else None
    x = features.embed(model, tokenizer, splits.train[data.text].astype(str).tolist(), pairs, opts.pooling,
                       config.model.max_length, config.train.eval_batch_size)
    y = splits.train[data.label].map({n: i for i, n in enumerate(splits.labels)}).to_numpy()
    head = features.fit(x, y, opts, config.train.seed)
    train_time = time.time() - t0
    save_dir = run.path / "model"
    save_dir.mkdir(exist_ok=True)
    features.save(head, save_dir)
    tokenizer.save_pretrained(save_dir)
    params = count_parameters(model)
    head_params = sum(t.numel() for t in head.values())
    params = {"trainable": head_params, "total": params["total"] + head_params,
              "percent": round(100 * head_params / (params["total"] + head_params), 4)}
    train_stats = {"runtime_s": round(train_time, 2), "examples_per_s": round(len(x) / train_time, 2)}
    return params, train_stats


# -------------------------------------------------------------------------------------------------- trainer

def _train_with_trainer(config: Config, splits: Splits, model_dir: str, run: RunDir, resume: bool):
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from .evaluate import trainer_metrics

    # Seed before the model exists: the new head (and LoRA's A matrices) are initialised at creation,
    # before the Trainer seeds anything, and would otherwise differ run to run.
    set_seed(config.train.seed)
    tokenizer, model, new_modules = classify.load_model(model_dir, splits.labels)
    model, params = _prepare_method(config, model, new_modules)
    train_ds = classify.encode(splits.train, tokenizer, config, splits.labels)
    val_ds = classify.encode(splits.validation, tokenizer, config, splits.labels) if len(splits.validation) else None
    at_limit = {name: classify.count_at_limit(ds, config.model.max_length)
                for name, ds in (("train", train_ds), ("validation", val_ds)) if ds is not None}
    if any(at_limit.values()):
        print(f"tunelab: examples cut at model.max_length={config.model.max_length} tokens: "
              + ", ".join(f"{n} {k}" for k, n in at_limit.items()) + " (raise model.max_length to keep them whole)")
    args = _training_args(config, run, has_validation=val_ds is not None)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                      compute_metrics=trainer_metrics(splits.labels),
                      callbacks=_callbacks(config, run, val_ds is not None))
    stats = _fit(trainer, config, run, resume, tokenizer)
    return params, {**stats, "best_checkpoint": trainer.state.best_model_checkpoint, "truncated_examples": at_limit}


def _prepare_method(config: Config, model, new_modules: list[str]):
    """Apply the configured method (freeze / wrap) and report what trains."""
    try:
        model = METHODS[config.method.name].prepare(model, config.method, new_modules)
    except ValueError as exc:
        raise TunelabError(f"method `{config.method.name}`: {exc}") from None
    params = count_parameters(model)
    new = f"; new modules: {', '.join(new_modules)}" if new_modules else ""
    print(f"tunelab: {config.method.name} on {config.model.name}: {params['trainable']:,} of {params['total']:,} "
          f"parameters trainable ({params['percent']:.3g}%){new}")
    return model, params


def _callbacks(config: Config, run: RunDir, has_validation: bool) -> list:
    from transformers import EarlyStoppingCallback

    from .trainer_callbacks import JsonlLogger

    callbacks = [JsonlLogger(run.path / "metrics.jsonl")]
    if config.train.early_stopping_patience and has_validation:
        callbacks.append(EarlyStoppingCallback(config.train.early_stopping_patience))
    return callbacks


def _fit(trainer, config: Config, run: RunDir, resume: bool, tokenizer) -> dict:
    """Train (resuming from the last checkpoint if asked), save model + tokenizer, return the common stats."""
    from transformers.trainer_callback import ProgressCallback

    from .trainer_callbacks import LossProgress

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress(metric=config.metric))
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        print(f"tunelab: no checkpoint in {run.path}/checkpoints yet; starting from the beginning")
    output = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.model.save_pretrained(run.path / "model")
    tokenizer.save_pretrained(run.path / "model")
    return {"runtime_s": round(output.metrics["train_runtime"], 2),
            "examples_per_s": round(output.metrics["train_samples_per_second"], 2),
            # the Trainer's own train_loss averages only the steps since a resume; the last logged loss
            # (log history is restored from the checkpoint) means the same with or without one
            "final_loss": next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None),
            "steps": output.global_step, "epochs": output.metrics.get("epoch"), "lr": config.lr,
            "bf16": bool(trainer.args.bf16)}


def _training_args(config: Config, run: RunDir, has_validation: bool, cls=None, **extra):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    t = config.train
    bf16 = use_bf16(config)
    every = "epoch" if t.eval_every == "epoch" else "steps"
    steps = t.eval_every if every == "steps" else None
    metric = config.metric
    return cls(
        output_dir=str(run.path / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=config.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup,  # a float below 1 is a fraction of the total steps in transformers 5
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        eval_strategy=every if has_validation else "no",
        eval_steps=steps,
        save_strategy=every,
        save_steps=steps,
        save_total_limit=1,
        load_best_model_at_end=has_validation,
        metric_for_best_model=f"eval_{metric}" if has_validation else None,
        greater_is_better=metric != "loss",
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=[],
        dataloader_num_workers=0,
        disable_tqdm=False,
        **extra,
    )


# ------------------------------------------------------------------------------------------------------ sft

def _train_sft(config: Config, splits: Splits, model_dir: str, run: RunDir, resume: bool):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from .tasks import sft

    set_seed(config.train.seed)  # before the model exists (LoRA's matrices are drawn at creation)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model, params = _prepare_method(config, model, [])
    max_length = config.model.max_length
    encoded = {name: sft.encode(list(getattr(splits, name)["_conv"]), tokenizer, config.data, max_length)
               for name in ("train", "validation") if len(getattr(splits, name))}
    counts = {name: {"examples": len(e.rows), "truncated": e.truncated, "dropped": e.dropped}
              for name, e in encoded.items()}
    for name, c in counts.items():
        if c["truncated"] or c["dropped"]:
            print(f"tunelab: {name}: {c['truncated']} example(s) cut and {c['dropped']} dropped at "
                  f"model.max_length={max_length} (data.overflow: {config.data.overflow})")
    if not encoded["train"].rows:
        raise TunelabError(f"no training example fits in model.max_length={max_length}")
    train_ds = datasets.Dataset.from_list(encoded["train"].rows)
    val_ds = datasets.Dataset.from_list(encoded["validation"].rows) if "validation" in encoded else None
    args = _training_args(config, run, has_validation=val_ds is not None, cls=SFTConfig, max_length=max_length,
                          completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                         processing_class=tokenizer, callbacks=_callbacks(config, run, val_ds is not None))
    stats = _fit(trainer, config, run, resume, tokenizer)
    real_tokens = sum(len(r["input_ids"]) for r in encoded["train"].rows) * (stats["epochs"] or 1)
    stats["tokens_per_s"] = round(real_tokens / stats["runtime_s"], 1)
    stats["encoded"] = counts
    # the Trainer evaluated every checkpoint and restored the best: its loss is the best metric, no extra pass
    stats["validation_loss"] = trainer.state.best_metric if val_ds is not None else None
    return params, stats


# --------------------------------------------------------------------------------------------------- finish

def _finish(config: Config, splits: Splits, run: RunDir, started: float, params: dict,
            train_stats: dict) -> RunResult:
    """Evaluate the saved model with the code `tunelab predict` uses, write every artefact, mark completed."""
    metrics = {"train": train_stats, "params": params}
    if config.task == "sft":
        metrics.update(_evaluate_sft(config, splits, run, train_stats))
    else:
        metrics.update(_evaluate_classifier(config, splits, run))
    run.write_json("metrics.json", metrics)
    plot_loss(read_jsonl(run.path / "metrics.jsonl"), run.path / "loss.png",
              title=f"{config.method.name} · {config.model.name}")
    manifest = _manifest(config, splits, params, train_stats, time.time() - started)
    run.write_json("manifest.json", manifest)
    if not config.output.keep_checkpoints:
        shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    run.set_state("completed", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return RunResult(run.path, config, metrics, manifest)


def _evaluate_classifier(config: Config, splits: Splits, run: RunDir) -> dict:
    """Metrics of the saved classifier, reloaded (fp32), on validation and test; per-row predictions."""
    (run.path / "model" / "labels.json").write_text(json.dumps(splits.labels))
    clf = classify.Classifier.from_saved(run.path, config)
    metrics = {}
    for name in ("validation", "test"):
        frame = getattr(splits, name)
        if len(frame):
            metrics[name], predictions = clf.evaluate(frame)
            predictions.to_json(run.path / f"predictions_{name}.jsonl", orient="records", lines=True,
                                force_ascii=False)
    return metrics


def _evaluate_sft(config: Config, splits: Splits, run: RunDir, train_stats: dict) -> dict:
    """Validation loss/perplexity, and generation metrics of the saved model on the test conversations."""
    import math

    from .tasks.generate import Generator

    metrics = {}
    if train_stats.get("validation_loss") is not None:
        loss = train_stats.pop("validation_loss")
        metrics["validation"] = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    if len(splits.test):
        convs = list(splits.test["_conv"])[: config.eval.max_generate]
        generator = Generator.from_saved(run.path, config)
        metrics["test"], rows = generator.evaluate(convs, config.eval.max_new_tokens)
        rows.to_json(run.path / "predictions_test.jsonl", orient="records", lines=True, force_ascii=False)
    return metrics


def _manifest(config: Config, splits: Splits, params: dict, train_stats: dict, wall: float) -> dict:
    import datasets
    import peft
    import sklearn
    import transformers

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    manifest = {
        "tunelab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "datasets": datasets.__version__,
        "scikit_learn": sklearn.__version__, "config_hash": config.hash(), "data_files": splits.files,
        "examples": splits.sizes(), "labels": splits.labels, "leakage": splits.leaks, "parameters": params,
        "wall_time_s": round(wall, 2), "train_time_s": train_stats.get("runtime_s"),
        "examples_per_s": train_stats.get("examples_per_s"), "peak_rss_mb": round(peak_mb, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "bf16": use_bf16(config),
    }
    if torch.cuda.is_available():
        manifest["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return manifest
