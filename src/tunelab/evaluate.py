"""Classification metrics (scikit-learn) and evaluation of a saved run on a data file."""
from __future__ import annotations

import numpy as np


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1, a per-class report and the confusion matrix (rows: true label)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    p, r, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(np.mean(f1)),
        "precision_macro": float(np.mean(p)),
        "recall_macro": float(np.mean(r)),
        "examples": len(y_true),
        "per_class": {
            label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist()},
    }


def summary(metrics: dict) -> dict:
    """The scalar metrics only (for progress lines and tables)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def trainer_metrics(labels: list[str]):
    """`compute_metrics` for the HF Trainer: the scalar classification metrics on label ids."""
    def compute(eval_pred) -> dict:
        logits, ids = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        pred = np.asarray(logits).argmax(-1)
        names = np.asarray(labels)
        return summary(classification_metrics(list(names[ids]), list(names[pred]), labels))
    return compute


def evaluate_run(run_path, data_spec: str, write: bool = True) -> dict:
    """Evaluate a finished run on a data file with the run's columns and labels."""
    import json
    from pathlib import Path

    from .runs import open_finished

    path, config = open_finished(run_path)
    if config.task == "classify":
        metrics = _evaluate_classifier_run(path, config, data_spec)
    else:
        metrics = _evaluate_generative_run(path, config, data_spec)
    if write:
        out = Path(path) / "evaluations"
        out.mkdir(exist_ok=True)
        name = Path(data_spec.removeprefix("sample:")).stem
        (out / f"{name}.json").write_text(json.dumps({"data": data_spec, **metrics}, indent=2))
    return metrics


def _evaluate_classifier_run(path, config, data_spec: str) -> dict:
    from .data import load_eval_table, load_splits
    from .data.leakage import find_leaks
    from .errors import TunelabError
    from .tasks.classify import Classifier

    clf = Classifier.from_saved(path, config)
    frame = load_eval_table(data_spec, clf.config, clf.labels)
    metrics, _ = clf.evaluate(frame)
    try:  # rebuild the run's training split (same files, same seed) to see whether the eval data overlaps it
        seen = load_splits(clf.config.model_copy(update={"data": clf.config.data.model_copy(
            update={"leakage": "ignore"})})).train
        metrics["overlap_with_train"] = int(len(find_leaks(seen, frame)))
    except TunelabError:  # the training files moved: the check is skipped, not the evaluation
        metrics["overlap_with_train"] = None
    return metrics


# methods whose encoder is the base one (nothing to forget) or that change the input rather than the encoder
_PROBE_SKIP = {"features": "the encoder is frozen", "icl": "nothing is trained",
               "prompt": "prompt tuning changes the input, not the encoder",
               "prefix": "prefix tuning changes the attention inputs, not the encoder's weights"}


def earlier_task_table(config):
    """The rows of eval.earlier_task (a seeded sample), checked like training data; train reads it before it
    starts, so a problem in that file stops the run before any work."""
    from .data.readers import read_table
    from .data.types import check_labels, check_text_columns
    from .errors import DataError

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
    """Forgetting for classifiers: accuracy of a logistic-regression probe on mean-pooled last-layer features of
    an earlier task's data, with the base encoder and with the fine-tuned one (same rows, same split)."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from transformers import AutoModel

    from .methods.features import embed
    from .models import resolve

    spec = config.eval.earlier_task
    if config.method.name in _PROBE_SKIP:
        return {"data": spec.data, "skipped": _PROBE_SKIP[config.method.name]}
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


def _evaluate_generative_run(path, config, data_spec: str) -> dict:
    """Loss/perplexity (and generation metrics, except for raw text) of a generative run on a file read with the
    run's data settings — e.g. general text, to measure what fine-tuning made the model forget."""
    from .data import load_eval_generative
    from .tasks.generate import Generator
    from .train import test_metrics

    return test_metrics(config, load_eval_generative(data_spec, config), Generator.from_saved(path, config))[0]


def generation_metrics(references: list[str], generated: list[str]) -> dict:
    """Corpus chrF and BLEU (sacrebleu), mean ROUGE-L F1 (rouge-score), exact match (after stripping)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, g)["rougeL"].fmeasure for r, g in zip(references, generated)]
    return {
        "chrf": float(sacrebleu.corpus_chrf(generated, [references]).score),
        "bleu": float(sacrebleu.corpus_bleu(generated, [references]).score),
        "rouge_l": float(np.mean(rouge)) if rouge else 0.0,
        "exact_match": float(np.mean([r.strip() == g.strip() for r, g in zip(references, generated)])),
        "examples": len(references),
    }


def evaluate_base(config_path, overrides=()) -> dict:
    """Test loss/perplexity and generation metrics of a config's *untrained* model on the config's test split,
    computed exactly as a finished run's (the zero-shot baseline)."""
    from .config import GENERATIVE, load_config
    from .data import load_splits
    from .errors import TunelabError
    from .tasks.generate import Generator
    from .train import test_metrics

    config = load_config(config_path, overrides)
    if config.task not in GENERATIVE:
        raise TunelabError("--base evaluates generative tasks (sft, seq2seq, causal_lm); classification baselines "
                           "are `method: features`")
    test = load_splits(config).test
    if not len(test):
        raise TunelabError(f"{config_path}: the config has no test split to evaluate on")
    metrics, _ = test_metrics(config, test, Generator.base(config))
    return {"model": config.model.name, **metrics}
