"""`tunelab merge RUN`: fold a LoRA / DoRA / QLoRA / IA3 adapter into its (full-precision) base model and
save a plain Hugging Face model folder.

The merged folder loads with `AutoModelForSequenceClassification` (classify runs) or `AutoModelForCausalLM`
(sft, causal_lm, dpo and rl runs) and needs neither peft nor tunelab. Merging changes the arithmetic (W + BA is
added once instead of at every call), so the merged model's outputs are compared with the adapter's on the run's
own test inputs — class logits, or next-token logits of the test prompts —
and the merge fails loudly beyond the tolerance.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import jsonl
from .errors import RunError, TunelabError
from .folders import MARKER, check_target, write_output_dir
from .methods import trait, with_trait
from .runs import open_finished
from .tasks import TASKS
from .tasks import with_trait as tasks_with_trait

TOLERANCE = 1e-4


def merge(run_path, out: str | Path | None = None, tolerance: float = TOLERANCE) -> dict:
    """Write `out` (default RUN/merged) and return {"path", "max_abs_diff", "examples"}."""
    path, config = open_finished(run_path)
    method, task = config.method.name, TASKS[config.task]
    check_target(Path(out) if out else path / "merged", MARKER, "merge")  # refused before any model is loaded
    if not trait(method, "MERGEABLE"):
        why = ("its model/ folder is already a full model" if trait(method, "FULL_MODEL")
               else trait(method, "MERGE_NOTE") or "there is nothing to merge")
        raise RunError(f"{path} holds a `{method}` run; merge folds {', '.join(with_trait('MERGEABLE'))} adapters "
                       f"into the base weights, and {why}")
    if not task.CAUSAL_LM and task.SERVES != "classify":
        raise RunError(f"{path} is a `{config.task}` run; merge handles classifiers and causal-LM runs "
                       f"({', '.join(tasks_with_trait('CAUSAL_LM'))})")
    loaded = task.load(path, config, full_precision=True)
    if task.CAUSAL_LM:
        samples, outputs = sample_texts(path, "prompt"), _next_token_logits
    else:
        samples, outputs = sample_texts(path, "text"), _class_logits
    before = outputs(loaded, samples)
    merged = loaded.model.merge_and_unload().eval()
    loaded.model = merged
    diff = float(np.abs(before - outputs(loaded, samples)).max())
    if diff > tolerance:
        raise TunelabError(f"merged model disagrees with the adapter: max |logit difference| {diff:.2e} > "
                           f"{tolerance:.0e} on {len(samples)} inputs; nothing was written")
    target = Path(out) if out else path / "merged"
    info = {"format": "hf", "merged": True, "run": str(path), "max_abs_diff": diff, "examples": len(samples)}

    def fill(folder: Path) -> None:
        merged.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        if getattr(loaded, "labels", None) is not None:
            (folder / "labels.json").write_text(json.dumps(loaded.labels))
        (folder / MARKER).write_text(json.dumps(info, indent=2))

    write_output_dir(target, fill, "merge", run=path)
    return {"path": str(target), "max_abs_diff": diff, "examples": len(samples)}


def _class_logits(clf, texts: list[str]) -> np.ndarray:
    return clf.logits(texts)


@torch.inference_mode()
def _next_token_logits(generator, prompts: list[str]) -> np.ndarray:
    enc = generator.tokenizer(prompts, return_tensors="pt", padding=True)  # left-padded: last column is real
    enc.pop("token_type_ids", None)
    return generator.model(**enc.to(generator.model.device)).logits[:, -1].float().cpu().numpy()


def sample_texts(path: Path, column: str, n: int = 16) -> list[str]:
    predictions = path / "predictions_test.jsonl"
    if predictions.exists():
        rows = jsonl.read(predictions)
        texts = [r[column] for r in rows if isinstance(r.get(column), str)][:n]
        if texts:
            return texts
    return ["a sample sentence to compare outputs", "another, longer sample sentence to compare the outputs"]
