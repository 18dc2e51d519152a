"""Metrics, computed by scikit-learn, sacrebleu and rouge-score: classification, generation, perplexity."""
from __future__ import annotations

import math


def classification_metrics(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro precision/recall/F1, a per-class report and the confusion matrix (rows: true label)."""
    import numpy as np
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
        import numpy as np

        logits, ids = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        pred = np.asarray(logits).argmax(-1)
        names = np.asarray(labels)
        return summary(classification_metrics(list(names[ids]), list(names[pred]), labels))
    return compute


def generation_metrics(references: list[str], generated: list[str]) -> dict:
    """Corpus chrF and BLEU (sacrebleu), mean ROUGE-L F1 (rouge-score), exact match (after stripping)."""
    import numpy as np
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


def perplexity(loss: float) -> dict:
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}
