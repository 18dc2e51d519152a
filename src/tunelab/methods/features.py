"""`features`: the frozen model as a feature extractor, with a scikit-learn logistic regression on top.

The articles' "feature-based approach". No gradient touches the model. The fitted classifier is stored as
plain tensors (`classifier.safetensors`: coef, intercept), not a pickle, and predicts with one matmul.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..schema import Section

DEFAULT_LR = None  # no gradient training
GRADIENT_FREE = True  # nothing in the model trains: no gradient steps, no data parallelism, nothing to merge
SEEDLESS = True  # frozen features and an lbfgs logistic regression: train.seed changes nothing
TASKS = ("classify",)
PROBE_SKIP = "the encoder is frozen"
NOT_EXPORTABLE = "its classifier is a scikit-learn head on frozen embeddings (model/head.*), not a network layer"
MERGE_NOTE = "there is nothing to merge"


class Options(Section):
    name: Literal["features"] = "features"
    pooling: Literal["mean", "first"] = "mean"
    """How token vectors become one vector: attention-masked mean, or the first ([CLS]) token."""
    C: float = Field(1.0, gt=0)
    """Inverse L2 regularisation strength of the logistic regression."""
    max_iter: int = Field(2000, ge=10)
    """Iteration limit of the logistic regression solver."""


def embed(model, tokenizer, texts: list[str], pairs: list[str] | None, pooling: str, max_length: int,
          batch_size: int = 64, progress: bool = True):
    """Pooled last-layer vectors for `texts` (and optional `pairs`), in input order (a numpy array)."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), batch_size), desc="embedding", disable=not progress, leave=False):
            second = pairs[i:i + batch_size] if pairs is not None else None
            enc = tokenizer(texts[i:i + batch_size], second, padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt").to(model.device)
            hidden = model(**enc).last_hidden_state
            if pooling == "first":
                out.append(hidden[:, 0])
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).float().cpu().numpy()


def fit(train_x, train_y, options: Options, seed: int) -> dict:
    """The logistic regression's weights as tensors (`coef`, `intercept`), one logit per class."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=options.C, max_iter=options.max_iter, random_state=seed)
    clf.fit(train_x, train_y)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # sklearn stores one row for two classes; expand to one logit per class
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    # sklearn's multinomial coef_ is Fortran-ordered, and torch.tensor keeps those strides; safetensors stores only
    # contiguous tensors (three or more labels failed to save)
    return {"coef": torch.tensor(np.ascontiguousarray(coef), dtype=torch.float32).contiguous(),
            "intercept": torch.tensor(np.ascontiguousarray(intercept), dtype=torch.float32).contiguous()}


def logits(x, weights: dict):
    return x @ weights["coef"].numpy().T + weights["intercept"].numpy()


def save(weights: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file(weights, str(directory / "classifier.safetensors"))


def load(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "classifier.safetensors"))


def train_run(ctx) -> tuple[dict, dict]:
    """Embed the training texts with the frozen model, fit the logistic regression, save it (with the tokenizer
    and labels) as the run's model/ folder. Returns (parameter counts, training stats)."""
    import json
    import time

    import torch
    from transformers import AutoModel, AutoTokenizer

    from .freezing import count_parameters

    config, splits = ctx.config, ctx.splits
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    model = AutoModel.from_pretrained(ctx.model_dir, dtype=torch.float32)
    data, opts = config.data, config.method
    t0 = time.time()
    pairs = splits.train[data.text_pair].tolist() if data.text_pair else None
    x = embed(model, tokenizer, splits.train[data.text].tolist(), pairs, opts.pooling, config.model.max_length,
              config.train.eval_batch_size)
    y = splits.train[data.label].map({n: i for i, n in enumerate(splits.labels)}).to_numpy()
    head = fit(x, y, opts, config.train.seed)
    train_time = time.time() - t0

    def fill(folder: Path) -> None:
        save(head, folder)
        tokenizer.save_pretrained(folder)
        (folder / "labels.json").write_text(json.dumps(splits.labels))

    ctx.run.write_dir("model", fill)
    counts = count_parameters(model)
    head_params = sum(t.numel() for t in head.values())
    params = {"trainable": head_params, "total": counts["total"] + head_params,
              "percent": round(100 * head_params / (counts["total"] + head_params), 4)}
    return params, {"runtime_s": round(train_time, 2), "examples_per_s": round(len(x) / train_time, 2)}
