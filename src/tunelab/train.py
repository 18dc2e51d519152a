"""Train a run from a config: check everything a user can get wrong first, then train, evaluate and save.

Order matters for "nothing is lost": config, model and data are checked before the run directory exists,
so a user mistake never leaves a directory behind; anything that fails later marks the run `failed`.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, distributed
from .config import GENERATIVE, PREFERENCE, Config, load_config
from .data import Splits, load_splits
from .errors import TunelabError
from .methods import METHODS
from .methods.freezing import count_parameters
from .models import check_model, resolve
from .report import plot_loss, read_jsonl
from .runs import RunDir, check_output, default_dir
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


def base_dtype(config: Config) -> torch.dtype:
    """bf16 for the base of a method that keeps it frozen (its module sets FROZEN_BASE) when bf16 is on: half the
    memory, no per-step casts under autocast; the trainable parameters keep fp32 copies (bench/sft.py)."""
    frozen = getattr(METHODS[config.method.name], "FROZEN_BASE", False)
    return torch.bfloat16 if use_bf16(config) and frozen else torch.float32


def _fp32_trainable(model) -> None:
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def use_bf16(config: Config) -> bool:
    if config.train.precision == "auto":
        return fast_bf16()
    return config.train.precision == "bf16"


def train(config: str | Path | Config, overrides: list[str] | tuple[str, ...] = (), *, resume: bool = False,
          overwrite: bool = False, config_path: str | Path | None = None, callbacks: tuple = (),
          allow_code: bool = False) -> RunResult:
    """Run the config end to end; return the run path and its final metrics. `callbacks`: extra Trainer callbacks
    (tunelab search reports evaluations to Optuna through one). `allow_code`: let rl.reward.function import and
    run the Python code the config names."""
    if not isinstance(config, Config):
        config_path = config
        config = load_config(config, overrides)
    out = Path(config.output.dir) if config.output.dir else default_dir(config_path)
    main = distributed.is_main()
    if main:  # an output folder that cannot be used is found before any model or data is read
        check_output(out, config, resume=resume, overwrite=overwrite)
    model_dir = resolve(config.model.name)
    check_model(model_dir, config.task, config.method.name)
    _check_method(config, model_dir)
    splits = load_splits(config)
    if config.eval.earlier_task is not None:  # read after training; checked now
        from .evaluate import earlier_task_table

        earlier_task_table(config)
    reward = None
    if config.task == "rl":  # a bad reward spec is a user mistake: found before the run directory exists
        from .tasks.rl import load_reward

        reward = load_reward(config.rl.reward, allow_code)
    if distributed.world_size() > 1 and config.method.name in ("features", "icl"):
        raise TunelabError(f"method {config.method.name} takes no gradient steps; train it without --nproc")
    # data parallel: rank 0 owns the run directory; the other ranks train and leave
    run = RunDir.start(out, config, resume=resume, overwrite=overwrite) if main else RunDir(out)
    started = time.time()
    try:
        if config.task in PREFERENCE:
            outcome = _train_preference(config, splits, model_dir, run, resume, callbacks, reward)
        elif config.method.name == "features":
            outcome = _train_features(config, splits, model_dir, run)
        elif config.method.name == "icl":
            outcome = _train_icl(config, splits, model_dir, run)
        elif config.task in GENERATIVE:
            outcome = _train_generative(config, splits, model_dir, run, resume, callbacks)
        else:
            outcome = _train_with_trainer(config, splits, model_dir, run, resume, callbacks)
        if not main:
            return RunResult(out, config, {}, {})
        result = _finish(config, splits, run, started, *outcome, reward=reward)
    except KeyboardInterrupt:
        if main:
            run.set_state("interrupted", error="stopped by the user; continue with --resume")
        raise
    except BaseException as exc:
        if main:
            run.set_state("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run.release()
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

    def fill(folder: Path) -> None:
        features.save(head, folder)
        tokenizer.save_pretrained(folder)
        (folder / "labels.json").write_text(json.dumps(splits.labels))

    run.write_dir("model", fill)
    params = count_parameters(model)
    head_params = sum(t.numel() for t in head.values())
    params = {"trainable": head_params, "total": params["total"] + head_params,
              "percent": round(100 * head_params / (params["total"] + head_params), 4)}
    train_stats = {"runtime_s": round(train_time, 2), "examples_per_s": round(len(x) / train_time, 2)}
    return params, train_stats


# ------------------------------------------------------------------------------------------------------ icl

def _train_icl(config: Config, splits: Splits, model_dir: str, run: RunDir):
    """In-context learning: nothing trains. Store the demonstration pool (and its FAISS index), score every
    template on validation and keep the best; its "training time" is the index build plus that selection."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import classification_metrics
    from .methods import icl

    opts, data = config.method, config.data
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pool = [{"text": str(t), "label": str(lbl), **({"pair": str(p)} if data.text_pair else {})}
            for t, lbl, p in zip(splits.train[data.text], splits.train[data.label],
                                 splits.train[data.text_pair] if data.text_pair else splits.train[data.text])]
    retriever = None
    if opts.shots and opts.demos == "retrieved":
        retriever = icl.Retriever(opts.retriever)
        retriever.build([row["text"] for row in pool])
    learner = icl.ICL(opts, splits.labels, pool, model, tokenizer, config.model.max_length, retriever,
                      batch_size=config.train.eval_batch_size, bf16=use_bf16(config))
    templates = {}
    frame = splits.validation
    if len(opts.templates) > 1 and len(frame):
        texts = frame[data.text].astype(str).tolist()
        pairs = frame[data.text_pair].astype(str).tolist() if data.text_pair else None
        for n, template in enumerate(opts.templates, 1):
            print(f"tunelab: icl: template {n}/{len(opts.templates)} on {len(texts)} validation examples")
            predicted = learner.scores(texts, pairs, template, progress=True).argmax(-1)
            m = classification_metrics(frame[data.label].tolist(), [splits.labels[i] for i in predicted],
                                       splits.labels)
            templates[template] = {k: m[k] for k in ("accuracy", "f1_macro")}
        metric = config.metric if config.metric != "loss" else "f1_macro"
        learner.template = max(templates, key=lambda t: templates[t][metric])
    # zero-shot needs no demonstration pool: nothing of the training data is stored
    run.write_dir("model", lambda folder: icl.save(folder, opts, splits.labels, pool if opts.shots else [],
                                                   learner.template, retriever))
    elapsed = time.time() - t0
    total = sum(p.numel() for p in model.parameters())
    params = {"trainable": 0, "total": total, "percent": 0.0}
    stats = {"runtime_s": round(elapsed, 2), "template": learner.template,
             "templates": templates, "shots": opts.shots, "demos": opts.demos if opts.shots else None}
    return params, stats


# -------------------------------------------------------------------------------------------------- trainer

def _train_with_trainer(config: Config, splits: Splits, model_dir: str, run: RunDir, resume: bool, callbacks=()):
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from .evaluate import trainer_metrics

    # Seed before the model exists: the new head (and LoRA's A matrices) are initialised at creation,
    # before the Trainer seeds anything, and would otherwise differ run to run.
    set_seed(config.train.seed)
    tokenizer, model, new_modules = classify.load_model(model_dir, splits.labels, **_load_kwargs(config))
    model, params = _prepare_method(config, model, new_modules, model_dir)
    train_ds = classify.encode(splits.train, tokenizer, config, splits.labels)
    val_ds = classify.encode(splits.validation, tokenizer, config, splits.labels) if len(splits.validation) else None
    at_limit = {name: classify.count_at_limit(ds, config.model.max_length)
                for name, ds in (("train", train_ds), ("validation", val_ds)) if ds is not None}
    if any(at_limit.values()):
        print(f"tunelab: examples cut at model.max_length={config.model.max_length} tokens: "
              + ", ".join(f"{n} {k}" for k, n in at_limit.items()) + " (raise model.max_length to keep them whole)")
    # The classification loss is a per-example mean. transformers would still multiply it by the number of
    # processes (meant for token-summed LM losses), doubling the gradients under 2-process DDP
    # (tests/unit/test_distributed.py caught it): average over examples per device, DDP averages the rest.
    args = _training_args(config, run, has_validation=val_ds is not None, average_tokens_across_devices=False)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=collator, processing_class=tokenizer,
                      compute_metrics=trainer_metrics(splits.labels),
                      callbacks=_callbacks(config, run, val_ds is not None) + list(callbacks))
    cache, cache_stats = _frozen_cache(config, model, tokenizer, [d for d in (train_ds, val_ds) if d is not None],
                                       collator)
    if cache:  # the modules get their own forward back when training ends, before the model is saved
        trainer.add_callback(cache.callback())
    try:
        stats = _fit(trainer, config, run, resume, tokenizer, files={"labels.json": json.dumps(splits.labels)})
    finally:
        if cache:  # training failed: free the cache all the same
            cache.remove()
    return params, {**stats, "best_checkpoint": trainer.state.best_model_checkpoint, "truncated_examples": at_limit,
                    "frozen_cache": cache_stats}


def _frozen_cache(config: Config, model, tokenizer, datasets, collator):
    """head / last_layers: cache the frozen prefix's output per example (methods/frozen_cache.py)."""
    from .methods.frozen_cache import FrozenCache

    if not config.train.cache_frozen or config.method.name not in ("head", "last_layers"):
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


_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")
_TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
             "wandb": ("wandb", "wandb")}


def _check_method(config: Config, model_dir: str) -> None:
    """The method's own check that this machine and model can run it (qlora: bitsandbytes; icl: a causal LM),
    and the experiment trackers are installed — before any work."""
    import importlib.util

    missing = [pip for name in config.train.report_to for module, pip in [_TRACKERS[name]]
               if importlib.util.find_spec(module) is None]
    if missing:
        raise TunelabError(f"train.report_to names {', '.join(missing)}, which is not installed: pip install "
                           f"{' '.join(missing)} (or remove it from train.report_to)")
    check = getattr(METHODS[config.method.name], "check", None)
    if check:
        try:
            check(config.method, model_dir=model_dir, model_name=config.model.name)
        except RuntimeError as exc:
            raise TunelabError(str(exc)) from None


def _load_kwargs(config: Config) -> dict:
    hook = getattr(METHODS[config.method.name], "load_kwargs", None)
    return hook(config.method) if hook else {}


def _prepare_method(config: Config, model, new_modules: list[str], model_dir: str):
    """Apply the configured method (freeze / wrap) and report what trains."""
    try:
        model = METHODS[config.method.name].prepare(model, config.method, new_modules, task=config.task,
                                                    model_dir=model_dir)
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


def _fit(trainer, config: Config, run: RunDir, resume: bool, tokenizer, files: dict[str, str] | None = None) -> dict:
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
    # the whole run's examples over the whole run's time (the Trainer's own figure covers this part only)
    examples = _examples_per_step(trainer) * output.global_step
    stats = {"runtime_s": round(total, 2), "examples_per_s": round(examples / total, 2) if total else None,
             # the Trainer's own train_loss averages only the steps since a resume; the last logged loss
             # (log history is restored from the checkpoint) means the same with or without one
             "final_loss": next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None),
             "steps": output.global_step, "epochs": output.metrics.get("epoch"), "lr": config.lr,
             "bf16": bool(trainer.args.bf16), "epoch_s": clock.epoch_s, "processes": trainer.args.world_size}
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        # sharded weights: every rank takes part in gathering them; the Trainer writes on rank 0
        # (accelerate launch with configs/accelerate/fsdp2.yaml or deepspeed-zero*.yaml; not testable here)
        trainer.save_model(str(run.path / "model"))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(run.path / "model")
            for name, text in (files or {}).items():
                (run.path / "model" / name).write_text(text)
        return stats
    if not trainer.is_world_process_zero():
        return stats
    save = getattr(METHODS[config.method.name], "save", None)

    def fill(folder: Path) -> None:
        if save:
            save(trainer.model, folder)
        else:
            trainer.model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for name, text in (files or {}).items():
            (folder / name).write_text(text)

    run.write_dir("model", fill)
    return stats


def _examples_per_step(trainer) -> float:
    """Training examples per optimizer step, counted as the Trainer counts them for its examples/s."""
    args = trainer.args
    if args.max_steps > 0:
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return len(trainer.train_dataset) * args.num_train_epochs / max(trainer.state.max_steps, 1)


def loads_best(config: Config) -> bool:
    """Whether the Trainer restores the best checkpoint at the end. Not for prefix/prompt tuning: transformers
    cannot reload their checkpoints into the training model (it raises after training), so the final model is
    kept and early stopping is refused at config load."""
    return getattr(METHODS[config.method.name], "LOAD_BEST", True)


def _training_args(config: Config, run: RunDir, has_validation: bool, cls=None, best_metric: str | None = None,
                   **extra):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    t = config.train
    if "tensorboard" in t.report_to and not _USER_TENSORBOARD_DIR:
        # transformers' default is under checkpoints/, which is deleted after a run
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.path / "tensorboard")
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
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        **extra,
    )


# ----------------------------------------------------------------------------------------------- generative

def encode_split(config: Config, frame, tokenizer):
    """Token rows of one split: sft conversations, causal_lm documents or seq2seq pairs."""
    from .tasks import sft

    max_length, data = config.model.max_length, config.data
    if config.task == "causal_lm":
        return sft.encode_text(list(frame[data.text]), tokenizer, max_length, data.overflow,
                               split_long=config.packing)
    if config.task == "seq2seq":
        from .tasks import seq2seq

        return seq2seq.encode(list(frame["_conv"]), tokenizer, data, max_length)
    return sft.encode(list(frame["_conv"]), tokenizer, data, max_length)


def _encode_generative(config: Config, splits: Splits, tokenizer) -> dict:
    """Token rows of train and validation, plus replay text mixed into train."""
    from .tasks import sft

    data = config.data
    # the test split is encoded by test_metrics, on the saved model, after training
    out = {name: encode_split(config, getattr(splits, name), tokenizer)
           for name in ("train", "validation") if len(getattr(splits, name))}
    if splits.replay is not None and "train" in out:
        replay = sft.encode_text(list(splits.replay[data.replay.text]), tokenizer, config.model.max_length,
                                 data.overflow, split_long=False)
        print(f"tunelab: replay: {len(replay.rows)} general-text example(s) mixed into "
              f"{len(out['train'].rows)} instruction example(s)")
        out["train"].rows += replay.rows
    return out


def build_generative_trainer(config: Config, splits: Splits, model_dir: str, run: RunDir, callbacks=()):
    """The configured model, method and TRL SFTTrainer (sft, causal_lm) or Seq2SeqTrainer (seq2seq), with the
    encoded splits; `train` runs it. Exposed so tests can inspect exactly what training sees."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(config.train.seed)  # before the model exists (adapter matrices / new modules are drawn at creation)
    if config.task == "seq2seq":
        from .tasks import seq2seq

        tokenizer, model, new_modules = seq2seq.load_model(model_dir, **_load_kwargs(config))
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **{"dtype": base_dtype(config),
                                                                   **_load_kwargs(config)})
        new_modules = []
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, params = _prepare_method(config, model, new_modules, model_dir)
    _fp32_trainable(model)
    if config.train.compile:  # in place: the state dict, checkpoints and the saved model keep their keys
        from .methods.freezing import transformer_blocks

        for block in transformer_blocks(model)[1]:
            block.compile()
    encoded = _encode_generative(config, splits, tokenizer)
    max_length = config.model.max_length
    for name, e in encoded.items():
        if e.truncated or e.dropped:
            print(f"tunelab: {name}: {e.truncated} example(s) cut and {e.dropped} dropped at "
                  f"model.max_length={max_length} (data.overflow: {config.data.overflow})")
    if "train" not in encoded or not encoded["train"].rows:
        raise TunelabError(f"no training example fits in model.max_length={max_length}")
    sets = {name: datasets.Dataset.from_list(e.rows) for name, e in encoded.items() if e.rows}
    val_ds = sets.get("validation")
    if config.task == "seq2seq":
        from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

        args = _training_args(config, run, has_validation=val_ds is not None, cls=Seq2SeqTrainingArguments)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=val_ds,
                                 data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                                 processing_class=tokenizer,
                                 callbacks=_callbacks(config, run, val_ds is not None) + list(callbacks))
    else:
        from trl import SFTConfig

        from .tasks.sft_trainer import PackedRows, SFTTrainer

        # packing: TRL's best-fit-decreasing packs whole examples into max_length rows; PackedRows feeds them
        # row by row with position ids restarting per example; transformers then builds a block-diagonal
        # mask from the position ids (tests/unit/test_packing.py checks the logits)

        args = _training_args(config, run, has_validation=val_ds is not None, cls=SFTConfig,
                              max_length=max_length, completion_only_loss=True, packing=config.packing,
                              packing_strategy="bfd")
        trainer = SFTTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=val_ds,
                             processing_class=tokenizer,
                             callbacks=_callbacks(config, run, val_ds is not None) + list(callbacks))
        if config.packing:  # TRL refuses a custom collator with packing, so it is swapped in after
            trainer.data_collator = PackedRows(tokenizer.pad_token_id)
    return trainer, tokenizer, params, encoded, sets


def _train_generative(config: Config, splits: Splits, model_dir: str, run: RunDir, resume: bool, callbacks=()):
    trainer, tokenizer, params, encoded, sets = build_generative_trainer(config, splits, model_dir, run, callbacks)
    stats = _fit(trainer, config, run, resume, tokenizer)

    def tokens(rows):  # real tokens, not padding: prompt + response (+ decoder targets for seq2seq)
        return sum(len(r["input_ids"]) + len(r.get("labels", ())) for r in rows)

    stats["tokens_per_s"] = round(tokens(encoded["train"].rows) * (stats["epochs"] or 1) / stats["runtime_s"], 1)
    stats["encoded"] = {name: {"examples": len(e.rows), "truncated": e.truncated, "dropped": e.dropped}
                        for name, e in encoded.items()}
    # the Trainer evaluated every checkpoint and (usually) restored the best: its loss is the best metric
    if "validation" in sets:
        last_eval = next((r["eval_loss"] for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
        stats["validation_loss"] = trainer.state.best_metric if loads_best(config) else last_eval
    else:
        stats["validation_loss"] = None
    return params, stats


# ----------------------------------------------------------------------------------------------- preference

def _train_preference(config: Config, splits: Splits, model_dir: str, run: RunDir, resume: bool, callbacks,
                      reward):
    """reward, dpo, rl: the configured model and method handed to TRL's RewardTrainer, DPOTrainer or
    GRPO/RLOO trainer."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(config.train.seed)
    data, max_length = config.data, config.model.max_length
    has_validation = config.task != "rl" and len(splits.validation) > 0
    if config.task == "reward":
        from trl import RewardConfig, RewardTrainer

        from .tasks import reward as reward_task

        tokenizer, model, new_modules = classify.load_model(model_dir, ["reward"], **_load_kwargs(config))
        model, params = _prepare_method(config, model, new_modules, model_dir)
        encoder = reward_task.PairEncoder(tokenizer, data, max_length, reward_task.is_causal(model.config))
        sets, cut = {}, {}
        for name in ("train", "validation"):
            frame = getattr(splits, name)
            if len(frame):
                rows, cut[name] = reward_task.encode_pairs(frame, encoder)
                sets[name] = datasets.Dataset.from_list(rows)
        if any(cut.values()):
            print(f"tunelab: pairs with a response cut at model.max_length={max_length}: "
                  + ", ".join(f"{n} {k}" for k, n in cut.items()))
        args = _training_args(config, run, has_validation, cls=RewardConfig, max_length=max_length)
        trainer = RewardTrainer(model=model, args=args, train_dataset=sets["train"],
                                eval_dataset=sets.get("validation"), processing_class=tokenizer,
                                callbacks=_callbacks(config, run, has_validation) + list(callbacks))
        stats = _fit(trainer, config, run, resume, tokenizer)
        return params, {**stats, "pairs": {k: len(v) for k, v in sets.items()}, "truncated_pairs": cut}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{"dtype": torch.float32, **_load_kwargs(config)})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, params = _prepare_method(config, model, [], model_dir)
    if config.task == "dpo":
        from trl import DPOConfig, DPOTrainer

        from .config import DPOSettings
        from .tasks import dpo

        settings = config.dpo or DPOSettings()
        sets = {name: datasets.Dataset.from_list(dpo.rows(getattr(splits, name), tokenizer, data))
                for name in ("train", "validation") if len(getattr(splits, name))}
        best = "eval_rewards/accuracies" if config.metric == "accuracy" else None
        args = _training_args(config, run, has_validation, cls=DPOConfig, best_metric=best, max_length=max_length,
                              beta=settings.beta, loss_type=[settings.loss])
        trainer = DPOTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets.get("validation"),
                             processing_class=tokenizer,
                             callbacks=_callbacks(config, run, has_validation) + list(callbacks))
        stats = _fit(trainer, config, run, resume, tokenizer)
        return params, {**stats, "pairs": {k: len(v) for k, v in sets.items()}}
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from .tasks import rl

    s = config.rl
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if s.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    train_ds = datasets.Dataset.from_list(rl.rows(splits.train, tokenizer, data))
    args = _training_args(config, run, False, cls=config_cls, num_generations=s.group_size, beta=s.kl,
                          epsilon=s.clip, max_completion_length=s.max_new_tokens, temperature=s.temperature,
                          top_p=s.top_p)
    trainer = trainer_cls(model=model, reward_funcs=[reward], args=args, train_dataset=train_ds,
                          processing_class=tokenizer, callbacks=_callbacks(config, run, False) + list(callbacks))
    stats = _fit(trainer, config, run, resume, tokenizer)
    return params, {**stats, "prompts": len(train_ds), "reward": reward.describe}


# --------------------------------------------------------------------------------------------------- finish

def _finish(config: Config, splits: Splits, run: RunDir, started: float, params: dict,
            train_stats: dict, reward=None) -> RunResult:
    """Evaluate the saved model with the code `tunelab predict` uses, write every artefact, mark completed."""
    metrics = {"train": train_stats, "params": params}
    if config.task in PREFERENCE:
        metrics.update(_evaluate_preference(config, splits, run, train_stats, reward))
    elif config.task in GENERATIVE:
        metrics.update(_evaluate_generative(config, splits, run, train_stats))
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


def _evaluate_preference(config: Config, splits: Splits, run: RunDir, train_stats: dict, reward) -> dict:
    """reward: pairwise accuracy of the saved reward model; dpo: likelihood and reward margins of the reloaded
    policy against the base; rl: reward of sampled completions on held-out prompts, base vs tuned, and KL. dpo and
    rl also measure forgetting (perplexity on general text)."""
    from .tasks.generate import Generator

    train_stats.pop("validation_loss", None)
    metrics = {}
    if config.task == "reward":
        from .tasks.reward import RewardModel

        model = RewardModel.from_saved(run.path, config)
        for name in ("validation", "test"):
            frame = getattr(splits, name)
            if len(frame):
                metrics[name], rows = model.evaluate(frame)
                rows.to_json(run.path / f"predictions_{name}.jsonl", orient="records", lines=True, force_ascii=False)
        return metrics
    tuned, base = Generator.from_saved(run.path, config), Generator.base(config)
    if config.task == "dpo":
        from .config import DPOSettings
        from .tasks import dpo

        beta = (config.dpo or DPOSettings()).beta
        for name in ("validation", "test"):
            frame = getattr(splits, name)
            if len(frame):
                metrics[name] = dpo.preference_metrics(tuned.model, tuned.tokenizer, frame, config.data, beta,
                                                       config.model.max_length, lambda: base.model)
    else:
        from .report import read_jsonl
        from .tasks import rl

        frame = splits.validation if len(splits.validation) else splits.test
        if len(frame):
            metrics["held_out"], samples = rl.evaluate(config, frame, tuned, base, reward, config.train.seed)
            metrics["held_out"]["split"] = "validation" if len(splits.validation) else "test"
            metrics["held_out"]["reward"] = reward.describe
            write_jsonl(run.path / "samples.jsonl", samples)
        rl.plot_rewards(read_jsonl(run.path / "metrics.jsonl"), run.path / "rewards.png",
                        f"{config.rl.algorithm} · {config.model.name} · {reward.describe}")
    if config.eval.forgetting:
        for g in (tuned, base):
            g.tokenizer.padding_side = "right"
        metrics["forgetting"] = forgetting(config, tuned, base)
    return metrics


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _evaluate_classifier(config: Config, splits: Splits, run: RunDir) -> dict:
    """Metrics of the saved classifier, reloaded (fp32), on validation and test; per-row predictions."""
    clf = classify.Classifier.from_saved(run.path, config)
    metrics = {}
    for name in ("validation", "test"):
        frame = getattr(splits, name)
        if len(frame):
            metrics[name], predictions = clf.evaluate(frame)
            predictions.to_json(run.path / f"predictions_{name}.jsonl", orient="records", lines=True,
                                force_ascii=False)
    if config.eval.earlier_task is not None:
        from .evaluate import earlier_task_probe

        metrics["forgetting"] = earlier_task_probe(config, clf)
    return metrics


def _evaluate_generative(config: Config, splits: Splits, run: RunDir, train_stats: dict) -> dict:
    """Validation loss (the Trainer's, in training precision); test loss/perplexity and generation metrics of the
    saved model reloaded in fp32 (overall and per dataset of a multitask mix) — the numbers `tunelab eval --base`
    computes for the untrained model."""
    from .tasks.generate import Generator

    metrics = {}
    loss = train_stats.pop("validation_loss", None)
    if loss is not None:
        metrics["validation"] = perplexity(loss)
    generator = Generator.from_saved(run.path, config)
    if len(splits.test):
        metrics["test"], rows = test_metrics(config, splits.test, generator)
        if rows is not None:
            tasks = list(rows.pop("_task"))
            if len(set(tasks)) > 1:
                from .evaluate import generation_metrics

                rows.insert(0, "task", tasks)
                metrics["test_by_task"] = {t: generation_metrics(list(g["reference"]), list(g["generated"]))
                                           for t, g in rows.groupby("task", sort=False)}
            rows.to_json(run.path / "predictions_test.jsonl", orient="records", lines=True, force_ascii=False)
    if config.eval.forgetting and config.task != "seq2seq":  # causal-LM perplexity: decoder-only models
        metrics["forgetting"] = forgetting(config, generator, Generator.base(config))
    return metrics


def forgetting(config: Config, tuned, base) -> dict:
    """Perplexity of the base and the fine-tuned model on general text (eval.forgetting); ratio > 1 means the
    model got worse at plain language. Skipped (with the reason) when that text is part of the training data."""
    from .data import text_table
    from .tasks import sft

    spec = config.eval.forgetting
    trained_on = {config.data.train} | {d.train for d in config.data.datasets or []}
    if config.data.replay is not None:
        trained_on.add(config.data.replay.train)
    if spec in trained_on:
        return {"data": spec, "skipped": "this text is part of the training data"}
    frame = text_table(spec, "text")
    frame = frame.sample(n=min(len(frame), config.eval.forgetting_max), random_state=config.data.split.seed)
    rows = sft.encode_text(list(frame["text"]), tuned.tokenizer, config.model.max_length, "truncate",
                           split_long=False).rows
    before, after = base.loss(rows), tuned.loss(rows)
    return {"data": spec, "documents": len(frame), "base_perplexity": perplexity(before)["perplexity"],
            "perplexity": perplexity(after)["perplexity"], "ratio": math.exp(min(after - before, 50))}


def perplexity(loss: float) -> dict:
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


def test_metrics(config: Config, test, generator):
    """Loss/perplexity on every test example, and generation metrics (not for raw text) on up to
    eval.max_generate of them — an equal share per dataset of a multitask mix. Returns (metrics, rows or None)."""
    metrics = perplexity(generator.loss(encode_split(config, test, generator.tokenizer).rows))
    if config.task == "causal_lm":
        return metrics, None
    limit = config.eval.max_generate
    if limit is not None:
        test = test.groupby("_task", sort=False).head(-(-limit // test["_task"].nunique()))
    scores, rows = generator.evaluate(list(test["_conv"]), config.eval.max_new_tokens)
    rows["_task"] = list(test["_task"])
    return {**metrics, **scores}, rows


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
        "examples_per_s": train_stats.get("examples_per_s"), "tokens_per_s": train_stats.get("tokens_per_s"),
        "peak_rss_mb": round(peak_mb, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "bf16": use_bf16(config),
    }
    if torch.cuda.is_available():
        manifest["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return manifest
