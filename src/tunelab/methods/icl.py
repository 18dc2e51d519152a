"""`icl`: in-context learning — the no-training baseline. A causal LM reads a prompt (optionally with k solved
examples, "demonstrations") and each label is scored by the likelihood of its label word after the prompt, so
the answer is always a valid label.

- `shots: 0` is zero-shot; `shots: k` puts k demonstrations from the training split before the query, drawn at
  random (`demos: random`, a fixed seed per query text) or retrieved (`demos: retrieved`): the k training
  examples nearest to the query in the embedding space of an encoder (`retriever`), found with a FAISS index
  that is saved with the run and reused by `tunelab predict`.
- `templates` lists prompt templates ("hard prompt tuning"): each is scored on the validation split, the best
  one is kept, and every template's numbers are in metrics.json.

Nothing is trained; the run stores the demonstration pool, the index and the chosen template (`model/icl.json`).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from .. import jsonl
from ..schema import Section
from .retrieval import Retriever

DEFAULT_LR = None  # no training
GRADIENT_FREE = True  # nothing trains: no gradient steps, no data parallelism, nothing to merge or export
TASKS = ("classify", "sft")  # sft: demonstrations in the prompt (methods/demonstrations.py)
PROBE_SKIP = "nothing is trained"
NOT_EXPORTABLE = "it trains nothing: its model is the base model plus stored prompts"
MERGE_NOTE = "there is nothing to merge"

DEFAULT_TEMPLATES = [
    "Text: {text}\nLabel: {label}",
    "{text}\nQuestion: is this {labels}?\nAnswer: {label}",
]
# encoder families: they have no causal LM head to score label words with
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet",
            "modernbert"}


class Options(Section):
    name: Literal["icl"] = "icl"
    shots: int = Field(0, ge=0, le=64)
    """Demonstrations put before each query (0: zero-shot)."""
    demos: Literal["random", "retrieved"] = "random"
    """How demonstrations are chosen: at random from the training split (seeded by the query text), or the
    nearest training examples to the query by embedding similarity (a FAISS index, saved with the run)."""
    templates: list[str] = Field(default_factory=lambda: list(DEFAULT_TEMPLATES), min_length=1)
    """Prompt templates with {text} (and {text_pair} for pairs), optional {labels} (the label words joined
    with "or"), ending with {label}. Several: each is scored on validation and the best is kept."""
    label_words: dict[str, str] | None = None
    """Word scored for each label, e.g. {"1": "positive", "0": "negative"}; default: the label itself."""
    retriever: str = "minilm"
    """Encoder that embeds texts for `demos: retrieved` (a packaged alias, hub id or folder)."""
    separator: str = "\n\n"
    """Text between demonstrations."""
    seed: int = 0

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        for t in value:
            if not t.endswith("{label}") or "{text}" not in t:
                raise ValueError(f"template {t!r} must contain {{text}} and end with {{label}}")
            try:
                t.format(text="", text_pair="", labels="", label="")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template {t!r}: only {{text}}, {{text_pair}}, {{labels}} and {{label}} "
                                 f"may appear in braces ({exc})") from None
        return value


# ------------------------------------------------------------------------------------------------- scoring

def split_template(template: str) -> tuple[str, str]:
    """(context part, joiner): "Sentiment: {label}" → ("Sentiment:", " ") so the label word is scored as " word",
    the way a tokenizer sees a word after a space."""
    head = template[: -len("{label}")]
    stripped = head.rstrip(" ")
    return stripped, head[len(stripped):]


def label_logprobs(model, tokenizer, contexts: list[str], continuations: list[str], *, max_length: int,
                   batch_size: int = 16, progress: bool = False):
    """log P(continuation | context) for every context × continuation, as a (contexts, continuations) array:
    the sum of the continuation tokens' log-probabilities. Contexts are cut from the left to fit `max_length`."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    cont_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if any(not ids for ids in cont_ids):
        raise ValueError(f"a label word tokenizes to nothing: {continuations}")
    longest = max(len(ids) for ids in cont_ids)
    # the context with the tokenizer's own special tokens (a BOS where the model expects one), then the
    # label word's tokens as they follow it
    ctx_ids = [tokenizer(c)["input_ids"][-(max_length - longest):] for c in contexts]
    single = all(len(ids) == 1 for ids in cont_ids)
    # one forward per context when every label word is one token; else one per (context, label word)
    jobs = [(i, None) for i in range(len(ctx_ids))] if single else \
        [(i, j) for i in range(len(ctx_ids)) for j in range(len(cont_ids))]
    jobs.sort(key=lambda job: -len(ctx_ids[job[0]]))  # similar lengths together: less padding
    out = np.zeros((len(contexts), len(continuations)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    keep = 1 if single else longest + 1  # only the last positions' logits are computed (not the whole vocab at
    # every position, which costs more than the model itself on a small LM)
    with torch.inference_mode():
        for start in tqdm(range(0, len(jobs), batch_size), desc="scoring", disable=not progress, leave=False):
            batch = jobs[start:start + batch_size]
            seqs = [ctx_ids[i] + (cont_ids[j] if j is not None else []) for i, j in batch]
            # left padding, so every sequence ends at the last position; position ids count real tokens only,
            # so each sequence is scored exactly as it would be alone
            width = max(len(s) for s in seqs) + (0 if single else longest - min(len(cont_ids[j]) for _, j in batch))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, (seq, (_, j)) in enumerate(zip(seqs, batch)):
                tail = 0 if single else longest - len(cont_ids[j])  # pad after short continuations so they line up
                end = width - tail
                ids[r, end - len(seq):end] = torch.tensor(seq)
                mask[r, end - len(seq):end] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                           logits_to_keep=keep).logits.float()
            logp = torch.log_softmax(logits, dim=-1).cpu()  # (batch, keep, vocab)
            for r, (i, j) in enumerate(batch):
                if j is None:
                    out[i] = logp[r, -1, [ids_[0] for ids_ in cont_ids]].numpy()
                else:
                    targets = torch.tensor(cont_ids[j])
                    tail = longest - len(targets)
                    # logits at position p predict token p+1: the continuation's tokens sit at the last
                    # len(targets) real positions, predicted from the positions just before them
                    last = keep - 1 - tail
                    rows = torch.arange(last - len(targets), last)
                    out[i, j] = float(logp[r, rows, targets].sum())
    return out


# -------------------------------------------------------------------------------------------- demonstrations

class ICL:
    """Prompts built from a template, demonstrations and the label words; scores of each label for each text."""

    def __init__(self, options: Options, labels: list[str], pool: list[dict], model, tokenizer, max_length: int,
                 retriever: Retriever | None = None, template: str | None = None, batch_size: int = 16,
                 bf16: bool = False):
        self.options, self.labels, self.pool, self.bf16 = options, labels, pool, bf16
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.retriever, self.batch_size = retriever, batch_size
        self.template = template or options.templates[0]
        words = options.label_words or {}
        self.words = [words.get(label, label) for label in labels]

    def render(self, template: str, text: str, pair: str | None, word: str | None) -> str:
        fields = {"text": text, "text_pair": pair or "", "labels": " or ".join(self.words)}
        if word is None:
            return split_template(template)[0].format(**fields)
        return template.format(**fields, label=word)

    def demonstrations(self, texts: list[str]) -> list[list[dict]]:
        k = self.options.shots
        if k == 0 or not self.pool:
            return [[] for _ in texts]
        if self.options.demos == "retrieved":
            from ..data.leakage import normalise

            nearest = self.retriever.search(texts, k + 1)
            out = []
            for text, row in zip(texts, nearest):
                # never show the query as its own demonstration (when predicting on training texts)
                picked = [self.pool[i] for i in row if i >= 0 and normalise(self.pool[i]["text"]) != normalise(text)]
                out.append(picked[:k][::-1])  # the nearest example right before the query
            return out
        import numpy as np

        out = []
        for text in texts:
            rng = np.random.default_rng([self.options.seed, zlib.crc32(text.encode("utf-8"))])
            out.append([self.pool[i] for i in rng.choice(len(self.pool), size=min(k, len(self.pool)), replace=False)])
        return out

    def prompts(self, texts: list[str], pairs: list[str] | None, template: str) -> list[str]:
        demos = self.demonstrations(texts)
        out = []
        for n, text in enumerate(texts):
            shown = [self.render(template, d["text"], d.get("pair"), self.words[self.labels.index(d["label"])])
                     for d in demos[n]]
            shown.append(self.render(template, text, pairs[n] if pairs else None, None))
            out.append(self.options.separator.join(shown))
        return out

    def scores(self, texts: list[str], pairs: list[str] | None = None, template: str | None = None,
               progress: bool = False):
        import torch

        template = template or self.template
        joiner = split_template(template)[1]
        # bf16 where the hardware is fast at it (as in training): ~3x faster on an AMX CPU; label rankings
        # agreed on 64/64 sentiment prompts with fp32 (max log-prob difference 0.15)
        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return label_logprobs(self.model, self.tokenizer, self.prompts(texts, pairs, template),
                                  [joiner + w for w in self.words], max_length=self.max_length,
                                  batch_size=self.batch_size, progress=progress)


def check(options: Options, *, model_dir: str, model_name: str) -> None:
    """Before any work: the model must be a causal LM, and faiss importable for retrieved demonstrations."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if model_type in ENCODERS:
        raise RuntimeError(f"method icl scores label words with a causal (decoder) language model; {model_name} "
                           f"is an encoder ({model_type}). Set model.name to a decoder such as smollm2-135m")
    if options.shots and options.demos == "retrieved":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise RuntimeError("demos: retrieved needs faiss: pip install 'faiss-cpu>=1.15,<1.16'") from None


def save(directory: Path, options: Options, labels: list[str], pool: list[dict], template: str,
         retriever: Retriever | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "icl.json").write_text(json.dumps({"template": template, "options": options.model_dump()},
                                                   indent=2))
    (directory / "labels.json").write_text(json.dumps(labels))
    with open(directory / "demos.jsonl", "w", encoding="utf-8") as f:
        for row in pool:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if retriever is not None:
        retriever.save(directory / "demos.faiss")


def load(directory: Path, model, tokenizer, max_length: int, batch_size: int = 16, bf16: bool = False) -> ICL:
    saved = json.loads((directory / "icl.json").read_text())
    options = Options.model_validate(saved["options"])
    labels = json.loads((directory / "labels.json").read_text())
    pool = jsonl.read(directory / "demos.jsonl")
    retriever = Retriever.load(options.retriever, directory / "demos.faiss") if (directory / "demos.faiss").exists() \
        else None
    return ICL(options, labels, pool, model, tokenizer, max_length, retriever, saved["template"], batch_size, bf16)


def train_run(ctx) -> tuple[dict, dict]:
    """Nothing trains: store the demonstration pool (and its FAISS index), score every template on validation and
    keep the best; the "training time" is the index build plus that selection. Generative tasks:
    methods/demonstrations.py."""
    import time

    if ctx.config.task != "classify":
        from .demonstrations import train_run as generative

        return generative(ctx)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..metrics import classification_metrics
    from ..precision import use_bf16

    config, splits = ctx.config, ctx.splits
    opts, data = config.method, config.data
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    model = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=torch.float32).eval()
    pool = [{"text": str(t), "label": str(lbl), **({"pair": str(p)} if data.text_pair else {})}
            for t, lbl, p in zip(splits.train[data.text], splits.train[data.label],
                                 splits.train[data.text_pair] if data.text_pair else splits.train[data.text])]
    retriever = None
    if opts.shots and opts.demos == "retrieved":
        retriever = Retriever(opts.retriever)
        retriever.build([row["text"] for row in pool])
    learner = ICL(opts, splits.labels, pool, model, tokenizer, config.model.max_length, retriever,
                  batch_size=config.train.eval_batch_size, bf16=use_bf16(config))
    templates = {}
    frame = splits.validation
    if len(opts.templates) > 1 and len(frame):
        texts = frame[data.text].tolist()
        pairs = frame[data.text_pair].tolist() if data.text_pair else None
        for n, template in enumerate(opts.templates, 1):
            print(f"tunelab: icl: template {n}/{len(opts.templates)} on {len(texts)} validation examples")
            predicted = learner.scores(texts, pairs, template, progress=True).argmax(-1)
            m = classification_metrics(frame[data.label].tolist(), [splits.labels[i] for i in predicted],
                                       splits.labels)
            templates[template] = {k: m[k] for k in ("accuracy", "f1_macro")}
        metric = config.metric if config.metric != "loss" else "f1_macro"
        learner.template = max(templates, key=lambda t: templates[t][metric])
    # zero-shot needs no demonstration pool: nothing of the training data is stored
    ctx.run.write_dir("model", lambda folder: save(folder, opts, splits.labels, pool if opts.shots else [],
                                                   learner.template, retriever))
    total = sum(p.numel() for p in model.parameters())
    return ({"trainable": 0, "total": total, "percent": 0.0},
            {"runtime_s": round(time.time() - t0, 2), "template": learner.template, "templates": templates,
             "shots": opts.shots, "demos": opts.demos if opts.shots else None})
