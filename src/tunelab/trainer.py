"""What every task's training shares: the method's checks and preparation, the Trainer's arguments and callbacks,
and `fit` — train (resuming if asked), save the model as one folder swapped into place, return the common stats.
The tasks build their own Trainer (HF, or TRL's SFT / Reward / DPO / GRPO / RLOO trainers) from these parts.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import TunelabError
from .methods import METHODS, trait
from .methods.freezing import count_parameters
from .precision import use_bf16

_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")
_TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # report_to name → module


def check_method(config, model_dir: str) -> None:
    """The method's own check that this machine and model can run it (qlora: bitsandbytes; icl: a causal LM),
    and the experiment trackers are installed — before any work."""
    import importlib.util

    missing = [_TRACKERS[name] for name in config.train.report_to if importlib.util.find_spec(_TRACKERS[name]) is None]
    if missing:
        raise TunelabError(f"train.report_to names {', '.join(missing)}, which is not installed: pip install "
                           f"{' '.join(missing)} (or remove it from train.report_to)")
    check = getattr(METHODS[config.method.name], "check", None)
    if check:
        try:
            check(config.method, model_dir=model_dir, model_name=config.model.name)
        except RuntimeError as exc:
            raise TunelabError(str(exc)) from None


def load_kwargs(config) -> dict:
    """Extra `from_pretrained` arguments of the method (qlora: the quantization config)."""
    hook = getattr(METHODS[config.method.name], "load_kwargs", None)
    return hook(config.method) if hook else {}


def prepare_method(config, model, new_modules: list[str], model_dir: str, task_type: str):
    """Apply the configured method (freeze / wrap; `task_type`: PEFT's, declared by the task) and report what
    trains. Llama-style norms and MLPs get forwards that keep less for the backward (tunelab/fused.py), and adapter
    dropout draws its CPU masks faster (tunelab/dropout.py): every task trains through here."""
    from .dropout import use_cpu_dropout
    from .fused import use_fused_layers

    use_fused_layers(model)
    try:
        model = METHODS[config.method.name].prepare(model, config.method, new_modules, model_dir=model_dir,
                                                    task_type=task_type)
    except ValueError as exc:
        raise TunelabError(f"method `{config.method.name}`: {exc}") from None
    use_cpu_dropout(model)
    params = count_parameters(model)
    new = f"; new modules: {', '.join(sorted(set(new_modules)))}" if new_modules else ""
    print(f"tunelab: {config.method.name} on {config.model.name}: {params['trainable']:,} of {params['total']:,} "
          f"parameters trainable ({params['percent']:.3g}%){new}")
    return model, params


def callbacks(config, run, has_validation: bool) -> list:
    from transformers import EarlyStoppingCallback

    from .trainer_callbacks import JsonlLogger, LoadPhase, ProgressFile

    out = [LoadPhase(), JsonlLogger(run.path / "metrics.jsonl"), ProgressFile(run.path / "progress.json")]
    if config.train.early_stopping_patience and has_validation:
        out.append(EarlyStoppingCallback(config.train.early_stopping_patience))
    return out


def loads_best(config) -> bool:
    """Whether the Trainer restores the best checkpoint at the end. Not for prefix/prompt tuning: transformers
    cannot reload their checkpoints into the training model (it raises after training), so the final model is
    kept and early stopping is refused at config load."""
    return trait(config.method.name, "LOAD_BEST")


def training_args(config, run, has_validation: bool, cls=None, best_metric: str | None = None, **extra):
    """The Trainer's arguments from the config (`cls`: TRL's config class of the task's trainer)."""
    import torch
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    t = config.train
    if "tensorboard" in t.report_to and not _USER_TENSORBOARD_DIR:
        # transformers' default is under checkpoints/, which is deleted after a run
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.path / "tensorboard")
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
        bf16=use_bf16(config),
        use_cpu=not torch.cuda.is_available(),
        eval_strategy=every if has_validation else "no",
        eval_steps=steps,
        save_strategy=every,
        save_steps=steps,
        save_total_limit=1,
        load_best_model_at_end=has_validation and loads_best(config),
        metric_for_best_model=(best_metric or f"eval_{metric}") if has_validation else None,
        greater_is_better=metric != "loss",
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=list(t.report_to) or "none",
        run_name=run.path.name,
        dataloader_num_workers=0,
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",  # real tokens trained on (tokens/s in metrics.json)
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        **extra,
    )


def per_second(count: float, stats: dict) -> float | None:
    """`count` (examples, tokens) over the training time: the whole run's (every part of a resumed one; the Trainer's
    own figure covers its part only) less the validation passes inside it, whose time is `stats["validation_s"]`
    (what `tunelab train` evaluates after training is `evaluate_s` in metrics.json)."""
    seconds = stats["runtime_s"] - stats.get("validation_s", 0.0)
    return round(count / seconds, 2) if seconds > 0 else None


def fit(trainer, config, run, resume: bool, tokenizer, files: dict[str, str] | None = None) -> dict:
    """Train (resuming from the last checkpoint if asked), save model + tokenizer (+ `files`, name → text) as one
    folder swapped into place, return the common stats. Times and speeds cover every part of a resumed run."""
    from transformers.trainer_callback import ProgressCallback

    from .trainer_callbacks import LossProgress, TrainClock

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossProgress(metric=config.metric))
    checkpoint = run.latest_checkpoint() if resume else None
    if resume and checkpoint is None:
        print(f"tunelab: no checkpoint in {run.path}/checkpoints yet; starting from the beginning")
    clock = TrainClock(checkpoint)
    trainer.add_callback(clock)
    output = trainer.train(resume_from_checkpoint=checkpoint)
    total = output.metrics["train_runtime"] + clock.before  # + the parts before a resume, up to its checkpoint
    examples = _examples_per_step(trainer) * output.global_step
    stats = {"runtime_s": round(total, 2), "validation_s": round(clock.validation_s, 2)}
    stats.update({"examples_per_s": per_second(examples, stats),
                  # the Trainer's own train_loss averages only the steps since a resume; the last logged loss
                  # (log history is restored from the checkpoint) means the same with or without one
                  "final_loss": next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None),
                  "steps": output.global_step, "epochs": output.metrics.get("epoch"), "lr": config.lr,
                  "bf16": bool(trainer.args.bf16), "epoch_s": clock.epoch_s, "processes": trainer.args.world_size})
    files = files or {}
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        # sharded weights: every rank takes part in gathering them; the Trainer writes on rank 0
        # (accelerate launch with configs/accelerate/fsdp2.yaml or deepspeed-zero*.yaml; not testable here)
        trainer.save_model(str(run.path / "model"))
        if trainer.is_world_process_zero():
            portable_base(run.path / "model", config.model.name)
            _write_tokenizer_and_files(run.path / "model", tokenizer, files)
        return stats
    if not trainer.is_world_process_zero():
        return stats
    save = getattr(METHODS[config.method.name], "save", None)

    def fill(folder: Path) -> None:
        if save:
            save(trainer.model, folder)
        else:
            trainer.model.save_pretrained(folder)
        portable_base(folder, config.model.name)
        _write_tokenizer_and_files(folder, tokenizer, files)

    run.write_dir("model", fill)
    return stats


def portable_base(folder: Path, name: str) -> None:
    """A saved PEFT adapter names its base by the Hub id (a packaged alias's model, or `model.name` itself) instead of
    the folder it was loaded from — a cache path of this machine: adapter_config.json's `base_model_name_or_path`
    and PEFT's model card, rewritten after PEFT wrote them (PEFT itself would look the id up on the Hub while
    saving). The local folder stays in the run's manifest; a base that is a local folder is left as it is."""
    import json

    from .models import hub_id

    hub, config = hub_id(name), folder / "adapter_config.json"
    if hub is None or not config.is_file():
        return
    settings = json.loads(config.read_text(encoding="utf-8"))
    local = settings.get("base_model_name_or_path")
    if not local or local == hub:
        return
    settings["base_model_name_or_path"] = hub
    config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    card = folder / "README.md"
    if card.is_file():
        card.write_text(card.read_text(encoding="utf-8").replace(local, hub), encoding="utf-8")


def _write_tokenizer_and_files(folder: Path, tokenizer, files: dict[str, str]) -> None:
    tokenizer.save_pretrained(folder)
    for name, text in files.items():
        (folder / name).write_text(text)


def _examples_per_step(trainer) -> float:
    """Training examples per optimizer step, counted as the Trainer counts them for its examples/s."""
    args = trainer.args
    if args.max_steps > 0:
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return len(trainer.train_dataset) * args.num_train_epochs / max(trainer.state.max_steps, 1)


def frozen_cache(config, model, tokenizer, datasets, collator):
    """head / last_layers (FROZEN_CACHE): cache the frozen prefix's output per example (methods/frozen_cache.py).
    Returns (cache or None, stats or None)."""
    from .methods.frozen_cache import FrozenCache

    if not config.train.cache_frozen or not trait(config.method.name, "FROZEN_CACHE"):
        return None, None
    cache = FrozenCache(model, tokenizer.pad_token_id)
    if cache.k == 0:
        return None, None
    tokens = sum(len(ids) for ds in datasets for ids in ds["input_ids"])
    mb = cache.estimate_mb(tokens)
    if mb > config.train.cache_frozen_mb:
        print(f"tunelab: not caching the frozen layers: {mb:,.0f} MB for {tokens:,} tokens is over "
              f"train.cache_frozen_mb={config.train.cache_frozen_mb}; every epoch runs the whole model")
        return None, {"used": False, "estimated_mb": round(mb, 1)}
    from tqdm.auto import tqdm

    n = sum(len(ds) for ds in datasets)
    t0 = time.time()
    with tqdm(total=n, desc=f"caching embeddings + {cache.k} frozen block(s)", unit="ex", leave=False) as bar:
        cache.build(datasets, collator, config.train.eval_batch_size, use_bf16(config), progress=bar.update)
    took = time.time() - t0
    stored = sum(t.numel() * t.element_size() for t in cache.store.values()) / 2 ** 20
    print(f"tunelab: cached the output of the {cache.k} frozen block(s) for {n} examples in {took:.1f} s "
          f"({stored:.0f} MB); each epoch now runs only the trainable part")
    cache.install()
    return cache, {"used": True, "examples": n, "build_s": round(took, 2), "mb": round(stored, 1),
                   "frozen_blocks": cache.k}
