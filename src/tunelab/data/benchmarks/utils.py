"""Datasets of tunelab's shipped lm-eval-harness tasks, built from the sample data tunelab carries
(../samples, see its ATTRIBUTION.md): a fixed, seeded selection, so every run — through `tunelab eval --benchmark`
or the harness's own `lm_eval --include_path` — scores the same documents. The harness calls these as a task's
`custom_dataset` (with the task's metadata as keyword arguments)."""
import json
import random
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DOCS, SEED = 200, 0


def _rows(name: str) -> list[dict]:
    with open(SAMPLES / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def sentiment(**_):
    """200 sentences of sentiment_uci.jsonl (IMDb, Yelp and Amazon, Kotzias et al. 2015): positive or negative?"""
    rows = random.Random(SEED).sample(_rows("sentiment_uci"), DOCS)
    return _dataset([{"text": r["text"], "gold": int(r["label"] == "positive"), "source": r["source"]} for r in rows])


def translate_de(**_):
    """200 English strings of translate_en_de.jsonl (Django's German catalogue): which of four German strings
    translates it? The three others are translations of other strings, drawn with a fixed seed."""
    rng = random.Random(SEED)
    pairs = [r for r in _rows("translate_en_de") if r["en"] != r["de"]]  # "Bengali" → "Bengali" tests nothing
    docs = []
    for i in rng.sample(range(len(pairs)), DOCS):
        others = rng.sample([j for j in range(len(pairs)) if pairs[j]["de"] != pairs[i]["de"]], 3)
        choices = [pairs[i]["de"], *(pairs[j]["de"] for j in others)]
        rng.shuffle(choices)
        docs.append({"en": pairs[i]["en"], "choices": choices, "gold": choices.index(pairs[i]["de"])})
    return _dataset(docs)
