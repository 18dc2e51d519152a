"""`classify`: sequence classification — texts (optionally pairs) and their labels.

Training: the HF Trainer on a sequence-classification model with a new head (tasks/classifier.py); `features` and
`icl` bring their own procedure (`train_run`). Evaluation: the saved model reloaded in fp32 — accuracy, macro
F1/precision/recall, confusion matrix, per-row predictions — and, with `eval.earlier_task`, forgetting of an earlier
task measured by a linear probe on the encoder's features before and after.
"""
from __future__ import annotations

import json

NAME = "classify"
DATA_FIELDS = frozenset({"text", "text_pair", "label", "labels"})
METRICS = ("f1_macro", "accuracy", "precision_macro", "recall_macro", "loss")
KIND, USE = "classifier", "`tunelab predict` / `tunelab.load`"
PEFT_TASK_TYPE = "SEQ_CLS"
AUTO_HEAD = "sequence-classification"  # the head it builds (checked to exist before any work)
SERVES = "classify"
GROUP_BY_LENGTH = True
EARLIER_TASK = True


def check(config) -> list[str]:
    return []


def load_splits(config):
    from ..data import classification_splits

    return classification_splits(config)


def setup(config, **_):
    """The earlier task's data is read after training; checked now, before the run directory exists."""
    if config.eval.earlier_task is not None:
        earlier_task_table(config)


def fit(ctx) -> tuple[dict, dict]:
    from transformers import DataCollatorWithPadding, Trainer, set_seed

    from ..metrics import trainer_metrics
    from ..trainer import callbacks, frozen_cache, load_kwargs, prepare_method, training_args
    from ..trainer import fit as train
    from .classifier import count_at_limit, encode, load_model

    config, splits, run = ctx.config, ctx.splits, ctx.run
    # Seed before the model exists: the new head (and LoRA's A matrices) are initialised at creation,
    # before the Trainer seeds anything, and would otherwise differ run to run.
    set_seed(config.train.seed)
    tokenizer, model, new_modules = load_model(ctx.model_dir, splits.labels, **load_kwargs(config))
    model, params = prepare_method(config, model, new_modules, ctx.model_dir, PEFT_TASK_TYPE)
    train_ds = encode(splits.train, tokenizer, config, splits.labels)
    val_ds = encode(splits.validation, tokenizer, config, splits.labels) if len(splits.validation) else None
    at_limit = {name: count_at_limit(ds, config.model.max_length)
                for name, ds in (("train", train_ds), ("validation", val_ds)) if ds is not None}
    if any(at_limit.values()):
        print(f"tunelab: examples cut at model.max_length={config.model.max_length} tokens: "
              + ", ".join(f"{n} {k}" for k, n in at_limit.items()) + " (raise model.max_length to keep them whole)")
    # The classification loss is a per-example mean. transformers would still multiply it by the number of
    # processes (meant for token-summed LM losses), doubling the gradients under 2-process DDP
    # (tests/unit/test_distributed.py caught it): average over examples per device, DDP averages the rest.
    args = training_args(config, run, has_validation=val_ds is not None, average_tokens_across_devices=False)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator,
                      processing_class=tokenizer, compute_metrics=trainer_metrics(splits.labels),
                      callbacks=callbacks(config, run, val_ds is not None) + list(ctx.callbacks))
    cache, cache_stats = frozen_cache(config, model, tokenizer, [d for d in (train_ds, val_ds) if d is not None],
                                      collator)
    if cache:  # the modules get their own forward back when training ends, before the model is saved
        trainer.add_callback(cache.callback())
    try:
        stats = train(trainer, config, run, ctx.resume, tokenizer, files={"labels.json": json.dumps(splits.labels)})
    finally:
        if cache:  # training failed: free the cache all the same
            cache.remove()
    return params, {**stats, "best_checkpoint": trainer.state.best_model_checkpoint, "truncated_examples": at_limit,
                    "frozen_cache": cache_stats}


def evaluate(ctx, stats: dict) -> dict:
    """Metrics of the saved classifier, reloaded (fp32), on validation and test; per-row predictions."""
    from .classifier import Classifier
    from .predictions import evaluate_splits

    clf = Classifier.from_saved(ctx.run.path, ctx.config)
    metrics = evaluate_splits(clf.evaluate, ctx.splits, ctx.run.path)
    if ctx.config.eval.earlier_task is not None:
        metrics["forgetting"] = earlier_task_probe(ctx.config, clf)
    return metrics


def load(path, config, full_precision: bool = False):
    from .classifier import Classifier

    return Classifier.from_saved(path, config)


def evaluate_file(path, config, spec: str, **_) -> dict:
    """`tunelab eval`: metrics on a file with the run's columns and labels, and how many of its rows were in the
    run's training split."""
    from ..data import classification_splits, load_eval_table
    from ..data.leakage import find_leaks
    from ..errors import TunelabError
    from .classifier import Classifier

    clf = Classifier.from_saved(path, config)
    frame = load_eval_table(spec, clf.config, clf.labels)
    metrics, _ = clf.evaluate(frame)
    try:  # rebuild the run's training split (same files, same seed) to see whether the eval data overlaps it
        quiet = clf.config.model_copy(update={"data": clf.config.data.model_copy(update={"leakage": "ignore"})})
        metrics["overlap_with_train"] = int(len(find_leaks(classification_splits(quiet).train, frame)))
    except TunelabError:  # the training files moved: the check is skipped, not the evaluation
        metrics["overlap_with_train"] = None
    return metrics


def report(metrics: dict) -> list[str]:
    names = {"accuracy": "accuracy", "f1_macro": "macro F1", "loss": "loss"}
    lines = []
    for split in ("validation", "test"):
        if split in metrics:
            m = metrics[split]
            shown = " · ".join(f"{label} {m[key]:.4f}" for key, label in names.items() if key in m)
            lines.append(f"{split:>10}: {shown} ({m['examples']} examples)")
    f = metrics.get("forgetting")
    if f and "drop" in f:
        lines.append(f"forgetting: earlier task ({f['data']}, label {f['label']}) linear-probe accuracy "
                     f"{f['base_accuracy']:.4f} with the base encoder → {f['accuracy']:.4f} after fine-tuning")
    elif f and "skipped" in f:
        lines.append(f"forgetting: not measured on {f['data']}: {f['skipped']}")
    return lines


def token_lengths(config, frame, tokenizer):
    import numpy as np

    data = config.data
    pairs = frame[data.text_pair].tolist() if data.text_pair else None
    return np.array([len(x) for x in tokenizer(frame[data.text].tolist(), pairs)["input_ids"]])


# ------------------------------------------------------------------------------------ forgetting: earlier task

def earlier_task_table(config):
    """The rows of eval.earlier_task (a seeded sample), checked like training data."""
    from ..data.readers import read_table
    from ..data.types import check_labels, check_text_columns
    from ..errors import DataError

    spec = config.eval.earlier_task
    frame = read_table(spec.data)
    missing = [c for c in (spec.text, spec.label) if c not in frame.columns]
    if missing:
        raise DataError(f"{spec.data}: eval.earlier_task column(s) {', '.join(missing)} not found; columns: "
                        f"{', '.join(c for c in frame.columns if not c.startswith('_'))}")
    frame = frame.dropna(subset=[spec.text, spec.label])
    frame = check_text_columns(frame, spec.data, [spec.text], config.data.numbers_as_text)
    frame = frame.assign(**{spec.label: check_labels(frame, spec.data, spec.label)})
    if frame[spec.label].nunique() < 2:
        raise DataError(f"{spec.data}: eval.earlier_task needs at least two labels in `{spec.label}`")
    return frame.sample(n=min(len(frame), spec.max_examples), random_state=config.data.split.seed)


def earlier_task_probe(config, clf) -> dict:
    """Accuracy of a logistic-regression probe on mean-pooled last-layer features of an earlier task's data, with
    the base encoder and with the fine-tuned one (same rows, same split)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from transformers import AutoModel

    from ..methods import trait
    from ..methods.features import embed
    from ..models import resolve

    spec = config.eval.earlier_task
    skip = trait(config.method.name, "PROBE_SKIP")
    if skip:  # the encoder is the base one (nothing to forget), or the method changes the input instead
        return {"data": spec.data, "skipped": skip}
    frame = earlier_task_table(config)
    texts, labels = frame[spec.text].tolist(), frame[spec.label].to_numpy()
    idx_fit, idx_score = train_test_split(range(len(texts)), test_size=0.5, random_state=config.data.split.seed,
                                          stratify=labels)

    class Hidden(torch.nn.Module):  # the fine-tuned classifier's last hidden states, as embed() expects
        def __init__(self, model):
            super().__init__()
            self.model, self.device = model, model.device

        def forward(self, **enc):
            out = self.model(**enc, output_hidden_states=True)
            return type("Out", (), {"last_hidden_state": out.hidden_states[-1]})

    def probe(model) -> float:
        x = embed(model, clf.tokenizer, texts, None, "mean", config.model.max_length, 64, progress=False)
        fit = LogisticRegression(max_iter=2000, random_state=config.train.seed)
        fit.fit(x[idx_fit], labels[idx_fit])
        return float((fit.predict(x[idx_score]) == labels[idx_score]).mean())

    base = AutoModel.from_pretrained(resolve(config.model.name), dtype=torch.float32)
    before, after = probe(base), probe(Hidden(clf.model))
    return {"data": spec.data, "label": spec.label, "examples": len(idx_score), "base_accuracy": before,
            "accuracy": after, "drop": before - after}
