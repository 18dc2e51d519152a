"""`features`: the frozen model as a feature extractor, with a scikit-learn logistic regression on top.

The articles' "feature-based approach". No gradient touches the model. The fitted classifier is stored as
plain tensors (`classifier.safetensors`: coef, intercept), not a pickle, and predicts with one matmul.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..schema import Section

DEFAULT_LR = None  # no gradient training


class Options(Section):
    name: Literal["features"] = "features"
    pooling: Literal["mean", "first"] = "mean"
    """How token vectors become one vector: attention-masked mean, or the first ([CLS]) token."""
    C: float = Field(1.0, gt=0)
    """Inverse L2 regularisation strength of the logistic regression."""
    max_iter: int = Field(2000, ge=10)
    """Iteration limit of the logistic regression solver."""


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], pairs: list[str] | None, pooling: str, max_length: int,
          batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Pooled last-layer vectors for `texts` (and optional `pairs`), in input order."""
    model.eval()
    out = []
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


def fit(train_x: np.ndarray, train_y: np.ndarray, options: Options, seed: int) -> dict[str, torch.Tensor]:
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


def logits(x: np.ndarray, weights: dict[str, torch.Tensor]) -> np.ndarray:
    return x @ weights["coef"].numpy().T + weights["intercept"].numpy()


def save(weights: dict[str, torch.Tensor], directory: Path) -> None:
    save_file(weights, str(directory / "classifier.safetensors"))


def load(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "classifier.safetensors"))
