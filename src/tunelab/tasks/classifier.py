"""Sequence classification's model: loading it with a new head, encoding texts for training, and a finished run
loaded to predict (`Classifier`). Inference always runs in fp32 so that `tunelab predict`, `tunelab eval` and the
metrics written at the end of training agree exactly, whatever precision training used.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..methods import features as features_method
from ..metrics import classification_metrics


def encode(frame: pd.DataFrame, tokenizer, config, labels: list[str]):
    """A `datasets.Dataset` of token ids and label ids, unpadded (the collator pads each batch)."""
    import datasets

    data = config.data
    label_id = {name: i for i, name in enumerate(labels)}
    columns = {"text": frame[data.text].astype(str).tolist(),
               "labels": [label_id[v] for v in frame[data.label]]}
    if data.text_pair:
        columns["text_pair"] = frame[data.text_pair].astype(str).tolist()
    ds = datasets.Dataset.from_dict(columns)

    def tokenize(batch):
        return tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=config.model.max_length)

    drop = [c for c in ds.column_names if c != "labels"]
    return ds.map(tokenize, batched=True, remove_columns=drop, desc="tokenizing")


def count_at_limit(ds, max_length: int) -> int:
    """Examples whose token count reached `max_length`: (almost always) truncated."""
    return sum(len(ids) >= max_length for ids in ds["input_ids"])


def load_model(directory: str, labels: list[str], **load_kwargs):
    """Tokenizer and a sequence-classification model with a head for `labels`, plus the names of the
    modules the checkpoint did not contain (randomly initialised: the new head, maybe a pooler)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:  # decoder-only models: pad with EOS, pool the last real token
        tokenizer.pad_token = tokenizer.eos_token
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # we report the new modules ourselves, in one line
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, output_loading_info=True,
            **{"dtype": torch.float32, **load_kwargs})
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    new_modules = sorted({key.rsplit(".", 1)[0] for key in info["missing_keys"]})
    return tokenizer, model, new_modules


def clip_texts(tokenizer, texts: list[str], max_length: int, chars_per_token: int = 32) -> list[str]:
    """Texts far longer than `max_length` tokens cut to a prefix before tokenizing, with the same result: only their
    first max_length tokens are used, and tokenizing 100,000 characters to keep 128 tokens is the slow part of
    classifying such a text. A prefix is used only when it still holds well over max_length tokens, so the tokens
    that are kept do not change."""
    limit = max_length * chars_per_token
    out = []
    for text in texts:
        if len(text) > limit:
            prefix = text[:limit]
            if len(tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]) > max_length + 16:
                text = prefix
        out.append(text)
    return out


class Classifier:
    """A finished classification run, loaded for prediction: `predict`, `predict_proba`, `evaluate`."""

    def __init__(self, config, labels: list[str], tokenizer, model, head: dict | None = None, path=None):
        self.config, self.labels, self.tokenizer, self.model, self.head, self.path = \
            config, labels, tokenizer, model, head, path
        self.icl = None  # method icl: prompts + label-word scoring instead of a classification head
        from ..models.saved import place

        self.model = place(self.model).eval()

    @classmethod
    def from_saved(cls, path: Path, config) -> "Classifier":
        """Load what a run saved in `path/model`. Training evaluates through this too, so the metrics it writes
        are those of the saved artefact, not of the in-memory model (which the Trainer may have left wrapped in
        a bf16 autocast)."""
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        from ..models import resolve
        from ..models.saved import load_saved

        model_dir = Path(path) / "model"
        labels = json.loads((model_dir / "labels.json").read_text())
        if config.method.name == "icl":
            return cls._icl(path, config, labels)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if config.method.name == "features":
            model = AutoModel.from_pretrained(resolve(config.model.name), dtype=torch.float32)
            return cls(config, labels, tokenizer, model, features_method.load(model_dir), path)
        model = load_saved(model_dir, AutoModelForSequenceClassification,
                           lambda: load_model(resolve(config.model.name), labels)[1])
        return cls(config, labels, tokenizer, model, None, path)

    @classmethod
    def _icl(cls, path: Path, config, labels: list[str]) -> "Classifier":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..methods import icl
        from ..models import resolve
        from ..precision import use_bf16

        base = resolve(config.model.name)
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        clf = cls(config, labels, tokenizer, model, None, path)
        clf.icl = icl.load(Path(path) / "model", model, tokenizer, config.model.max_length,
                           config.train.eval_batch_size, bf16=use_bf16(config))
        return clf

    @torch.inference_mode()
    def logits(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64) -> np.ndarray:
        max_length = self.config.model.max_length
        if self.icl is not None:  # log-likelihood of each label word: a softmax over them is P(label | prompt)
            return self.icl.scores(texts, pairs, progress=len(texts) > 64)
        if self.head is not None:
            pooling = self.config.method.pooling
            x = features_method.embed(self.model, self.tokenizer, texts, pairs, pooling, max_length, batch_size,
                                      progress=len(texts) > 256)
            return features_method.logits(x, self.head)
        texts = clip_texts(self.tokenizer, texts, max_length)
        pairs = clip_texts(self.tokenizer, pairs, max_length) if pairs is not None else None
        out = []
        for i in range(0, len(texts), batch_size):
            second = pairs[i:i + batch_size] if pairs is not None else None
            enc = self.tokenizer(texts[i:i + batch_size], second, padding=True, truncation=True,
                                 max_length=max_length, return_tensors="pt").to(self.model.device)
            out.append(self.model(**enc).logits.float().cpu())
        return torch.cat(out).numpy()

    def predict_proba(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, float]]:
        z = self.logits(texts, pairs)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return [{label: float(row[i]) for i, label in enumerate(self.labels)} for row in p]

    def prompt_tokens(self, texts: list[str], pairs: list[str] | None = None) -> float:
        """Mean tokens the model reads per text: the input (cut at max_length), or for icl the whole prompt with its
        demonstrations (one of the label-word continuations' shares not counted)."""
        if self.icl is not None:
            prompts = self.icl.prompts(texts, pairs, self.icl.template)
            return float(np.mean([len(self.tokenizer(p)["input_ids"]) for p in prompts])) if prompts else 0.0
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.config.model.max_length)
        return float(np.mean([len(ids) for ids in enc["input_ids"]])) if texts else 0.0

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[str]:
        return [self.labels[i] for i in self.logits(texts, pairs).argmax(-1)]

    def evaluate(self, frame: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
        """Metrics on a checked table (see data.load_eval_table) and the per-row predictions."""
        import time

        data = self.config.data
        texts = frame[data.text].astype(str).tolist()
        pairs = frame[data.text_pair].astype(str).tolist() if data.text_pair else None
        started = time.perf_counter()
        probs = self.predict_proba(texts, pairs)
        seconds = time.perf_counter() - started
        predicted = [max(p, key=p.get) for p in probs]
        truth = frame[data.label].tolist()
        metrics = classification_metrics(truth, predicted, self.labels)
        # what answering costs: time per example as `tunelab predict` runs, and the tokens each request reads
        # (in-context learning pays for its demonstrations on every call)
        metrics["inference"] = {"seconds": round(seconds, 3), "examples": len(texts),
                                "per_1000_s": round(1000 * seconds / max(len(texts), 1), 3),
                                "prompt_tokens": round(self.prompt_tokens(texts, pairs), 1)}
        # cross-entropy of the saved model's probabilities: the same number for every method (features included)
        metrics["loss"] = float(np.mean([-np.log(max(p[str(t)], 1e-12)) for p, t in zip(probs, truth)]))
        rows = pd.DataFrame({"row": frame["_row"], "text": frame[data.text], "label": frame[data.label],
                             "predicted": predicted, "probability": [p[x] for p, x in zip(probs, predicted)]})
        return metrics, rows
