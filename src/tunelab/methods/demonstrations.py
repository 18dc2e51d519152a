"""`icl` for generative tasks (sft): the no-training baseline of instruction tuning. The untrained model answers
each prompt with `shots` solved training examples in front of it — drawn at random (seeded by the query) or the
nearest ones by embedding similarity (`demos: retrieved`, the same FAISS index as for classification) — or none
(`shots: 0`, the base model zero-shot).

A prompt whose demonstrations do not fit `model.max_length` loses them one at a time, the farthest first; every
example that lost one is counted and reported (`demonstrations` in the test metrics), never cut silently.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

from .. import jsonl

POOL = "demos.jsonl"


def query_text(turn: dict) -> str:
    """What a demonstration is chosen by: the turn's own input — not the instruction every row shares, which would
    make every example look alike to the retriever."""
    return turn["input"] or turn["instruction"]


class Demonstrations:
    """The solved examples of a run and how they are put in front of a prompt."""

    def __init__(self, options, pool: list[dict], retriever=None):
        self.options, self.pool, self.retriever = options, pool, retriever
        self.examples = self.shortened = self.dropped = 0

    def choose(self, query: str) -> list[dict]:
        k = self.options.shots
        if k == 0 or not self.pool:
            return []
        if self.retriever is not None:
            from ..data.leakage import normalise

            nearest = self.retriever.search([query], k + 1)[0]
            picked = [self.pool[i] for i in nearest if i >= 0 and normalise(self.pool[i]["query"]) != normalise(query)]
            return picked[:k][::-1]  # the nearest example right before the query
        import numpy as np

        rng = np.random.default_rng([self.options.seed, zlib.crc32(query.encode("utf-8"))])
        return [self.pool[i] for i in rng.choice(len(self.pool), size=min(k, len(self.pool)), replace=False)]

    def prompt(self, conv, tokenizer, fmt: str, data, max_length: int) -> str:
        """The prompt of the conversation's last turn with its demonstrations, within max_length tokens."""
        from ..data.conversations import Conversation, prompt_with_demonstrations

        demos = [Conversation(d["turns"], d.get("system"), d.get("row", {}), data)
                 for d in self.choose(query_text(conv.turns[-1]))]
        self.examples += 1
        dropped = 0
        while True:
            text = prompt_with_demonstrations(conv, tokenizer, fmt, data, demos)
            if not demos or len(tokenizer(text)["input_ids"]) <= max_length:
                break
            demos = demos[1:]  # the farthest (retrieved) or first (random) one goes
            dropped += 1
        self.shortened += dropped > 0
        self.dropped += dropped
        return text

    def report(self) -> dict:
        return {"shots": self.options.shots, "demos": self.options.demos, "examples": self.examples,
                "examples_with_fewer_demonstrations": self.shortened, "demonstrations_dropped": self.dropped}


def load(directory: Path, options) -> Demonstrations:
    from .retrieval import Retriever

    path = Path(directory) / POOL
    pool = jsonl.read(path, missing_ok=True)
    faiss_path = Path(directory) / "demos.faiss"
    retriever = Retriever.load(options.retriever, faiss_path) if faiss_path.exists() else None
    return Demonstrations(options, pool, retriever)


def train_run(ctx) -> tuple[dict, dict]:
    """Nothing trains: store the pool of solved training examples (and its index); the "training time" is that."""
    import time

    from .retrieval import Retriever

    opts = ctx.config.method
    t0 = time.time()
    pool = []
    if opts.shots:
        for conv, row in zip(ctx.splits.train["_conv"], ctx.splits.train.to_dict("records")):
            pool.append({"query": query_text(conv.turns[-1]), "turns": conv.turns, "system": conv.system,
                         "row": {k: v for k, v in row.items() if not str(k).startswith("_") and isinstance(v, str)}})
    retriever = None
    if opts.shots and opts.demos == "retrieved":
        retriever = Retriever(opts.retriever)
        retriever.build([d["query"] for d in pool])

    def fill(folder: Path) -> None:
        (folder / "icl.json").write_text(json.dumps({"template": None, "options": opts.model_dump()}, indent=2))
        with open(folder / POOL, "w", encoding="utf-8") as f:
            for d in pool:  # zero-shot stores nothing of the training data
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
        if retriever is not None:
            retriever.save(folder / "demos.faiss")

    ctx.run.write_dir("model", fill)
    total = _parameters(ctx.model_dir)
    return ({"trainable": 0, "total": total, "percent": 0.0},
            {"runtime_s": round(time.time() - t0, 2), "shots": opts.shots, "demos": opts.demos if opts.shots else None,
             "pool": len(pool)})


def _parameters(model_dir: str) -> int:
    """The base model's parameter count, from its weights' shapes (without loading it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())
