"""`tunelab merge RUN`: fold a LoRA adapter into its base model and save a plain Hugging Face model folder.

The merged folder loads with `AutoModelForSequenceClassification.from_pretrained` and needs neither peft nor
tunelab. Merging changes the arithmetic (W + BA is added once instead of at every call), so the merged model's
outputs are compared with the adapter's on sample inputs, and the merge fails loudly beyond the tolerance.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .errors import RunError, TunelabError

TOLERANCE = 1e-4


def merge(run_path, out: str | Path | None = None, samples: list[str] | None = None,
          tolerance: float = TOLERANCE) -> dict:
    """Write `out` (default RUN/merged) and return {"path", "max_abs_diff", "examples"}."""
    from .tasks.classify import Classifier

    clf = Classifier.load(run_path)
    if not (clf.path / "model" / "adapter_config.json").exists():
        raise RunError(f"{clf.path} holds a `{clf.config.method.name}` run, not a LoRA adapter: its model/ folder is "
                       f"already a full model")
    texts = samples or _sample_texts(clf)
    before = clf.logits(texts)
    merged = clf.model.merge_and_unload()
    clf.model = merged.eval()
    after = clf.logits(texts)
    diff = float(np.abs(before - after).max())
    if diff > tolerance:
        raise TunelabError(f"merged model disagrees with the adapter: max |logit difference| {diff:.2e} > "
                           f"{tolerance:.0e} on {len(texts)} texts; nothing was written")
    target = Path(out) if out else clf.path / "merged"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    clf.tokenizer.save_pretrained(tmp)
    (tmp / "labels.json").write_text(json.dumps(clf.labels))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return {"path": str(target), "max_abs_diff": diff, "examples": len(texts)}


def _sample_texts(clf, n: int = 32) -> list[str]:
    predictions = clf.path / "predictions_test.jsonl"
    if predictions.exists():
        rows = [json.loads(x) for x in predictions.read_text(encoding="utf-8").split("\n") if x.strip()]
        return [r["text"] for r in rows[:n]]
    return ["a sample sentence to compare outputs", "another, longer sample sentence to compare the outputs"]
