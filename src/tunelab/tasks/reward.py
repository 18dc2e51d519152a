"""`reward`: a reward model — a sequence classifier with one output — trained on preference pairs with the
pairwise (Bradley-Terry) loss -log σ(r(chosen) - r(rejected)) by TRL's RewardTrainer.

An encoder (minilm) reads the pair as its two segments, `[CLS] prompt [SEP] response [SEP]`; a causal LM reads
the prompt rendered as in sft/dpo followed by the response and EOS, and scores its last token.
"""
from __future__ import annotations

from pathlib import Path

from ..data.conversations import prompt_text
from . import preference

NAME = "reward"
DATA_FIELDS = preference.DATA_FIELDS
METRICS = ("accuracy", "loss")  # accuracy: held-out pairs whose chosen response scores higher
KIND, USE, PEFT_TASK_TYPE = "reward model", "`tunelab score` / rl.reward.run", "SEQ_CLS"
AUTO_HEAD = "sequence-classification"  # the head it builds (checked to exist before any work)


def check(config) -> list[str]:
    return preference.check(config)


def load_splits(config):
    from ..data import preference_splits

    return preference_splits(config)


def fit(ctx) -> tuple[dict, dict]:
    import datasets
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    from ..trainer import callbacks, load_kwargs, prepare_method, training_args
    from ..trainer import fit as train
    from .classifier import load_model

    config, max_length = ctx.config, ctx.config.model.max_length
    set_seed(config.train.seed)
    tokenizer, model, new_modules = load_model(ctx.model_dir, ["reward"], **load_kwargs(config))
    model, params = prepare_method(config, model, new_modules, ctx.model_dir, PEFT_TASK_TYPE)
    encoder = PairEncoder(tokenizer, config.data, max_length, is_causal(model.config))
    sets, cut = {}, {}
    for name in ("train", "validation"):
        frame = getattr(ctx.splits, name)
        if len(frame):
            rows, cut[name] = encode_pairs(frame, encoder)
            sets[name] = datasets.Dataset.from_list(rows)
    if any(cut.values()):
        print(f"tunelab: pairs with a response cut at model.max_length={max_length}: "
              + ", ".join(f"{n} {k}" for k, n in cut.items()))
    has_validation = "validation" in sets
    args = training_args(config, ctx.run, has_validation, cls=RewardConfig, max_length=max_length)
    trainer = RewardTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets.get("validation"),
                            processing_class=tokenizer,
                            callbacks=callbacks(config, ctx.run, has_validation) + list(ctx.callbacks))
    stats = train(trainer, config, ctx.run, ctx.resume, tokenizer)
    return params, {**stats, "pairs": {k: len(v) for k, v in sets.items()}, "truncated_pairs": cut}


def evaluate(ctx, stats: dict) -> dict:
    """Pairwise accuracy of the saved reward model on validation and test; per-pair scores."""
    stats.pop("validation_loss", None)
    from .predictions import evaluate_splits

    return evaluate_splits(RewardModel.from_saved(ctx.run.path, ctx.config).evaluate, ctx.splits, ctx.run.path)


def load(path, config, full_precision: bool = False) -> "RewardModel":
    return RewardModel.from_saved(path, config)


def evaluate_file(path, config, spec: str, **_) -> dict:
    """`tunelab eval`: pairwise accuracy and margin on the pairs of a file."""
    from ..data.preferences import expand_pairs, preference_table

    return RewardModel.from_saved(path, config).evaluate(expand_pairs(preference_table(spec, config.data)))[0]


def report(metrics: dict) -> list[str]:
    return [f"{split:>10}: pairwise accuracy {s['accuracy']:.4f} · mean margin {s['margin']:.3f} · loss "
            f"{s['loss']:.4f} ({s['pairs']} pairs)" for split in ("validation", "test") if (s := metrics.get(split))]


token_lengths = preference.token_lengths


def is_causal(model_config) -> bool:
    return any(a.endswith("ForCausalLM") for a in (getattr(model_config, "architectures", None) or []))


class PairEncoder:
    """Token ids of (prompt, response) for a reward model, the same in training and scoring."""

    def __init__(self, tokenizer, data, max_length: int, causal: bool):
        self.tokenizer, self.data, self.max_length, self.causal = tokenizer, data, max_length, causal

    def __call__(self, prompt, response: str) -> tuple[list[int], bool]:
        """(ids, truncated)."""
        if self.causal:
            ids, _ = preference.encode_response(self.tokenizer, preference.render(prompt, self.tokenizer, self.data),
                                                response, add_eos=True, max_length=self.max_length)
            return ids, len(ids) >= self.max_length
        # token types are left at 0, as TRL's preference collator passes none: the same in training and scoring
        enc = self.tokenizer(prompt_text(prompt), response, truncation="longest_first", max_length=self.max_length)
        return enc["input_ids"], len(enc["input_ids"]) >= self.max_length


def encode_pairs(frame, encoder: PairEncoder) -> tuple[list[dict], int]:
    rows, cut = [], 0
    for prompt, chosen, rejected in zip(frame["_prompt"], frame["_chosen"], frame["_rejected"]):
        c, c_cut = encoder(prompt, chosen)
        r, r_cut = encoder(prompt, rejected)
        cut += c_cut or r_cut
        rows.append({"chosen_ids": c, "rejected_ids": r})
    return rows, cut


class RewardModel:
    """A finished reward run, loaded for scoring: `score(prompts, responses)` → one float each (fp32)."""

    def __init__(self, config, tokenizer, model, path=None):
        from ..models.saved import place

        self.config, self.tokenizer, self.model, self.path = config, tokenizer, place(model).eval(), path
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.encoder = PairEncoder(tokenizer, config.data, config.model.max_length, is_causal(model.config))

    @classmethod
    def from_saved(cls, path, config) -> "RewardModel":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..models import resolve
        from ..models.saved import load_saved
        from .classifier import load_model

        model_dir = Path(path) / "model"
        model = load_saved(model_dir, AutoModelForSequenceClassification,
                           lambda: load_model(resolve(config.model.name), ["reward"])[1])
        return cls(config, AutoTokenizer.from_pretrained(model_dir), model, path)

    def score(self, prompts: list, responses: list[str], batch_size: int = 32):
        """One score per (prompt, response) (a numpy array)."""
        import numpy as np
        import torch

        out = []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(responses), batch_size):
            ids = [self.encoder(p, r)[0] for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
            width = max(len(x) for x in ids)
            device = self.model.device
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            with torch.inference_mode():
                out.append(self.model(input_ids=input_ids, attention_mask=mask).logits.float()[:, 0].cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def evaluate(self, frame) -> tuple[dict, "object"]:
        """Pairwise accuracy (chosen scored above rejected) and mean margin on a table of pairs; per-pair rows."""
        import numpy as np
        import pandas as pd

        prompts = list(frame["_prompt"])
        chosen = self.score(prompts, list(frame["_chosen"]))
        rejected = self.score(prompts, list(frame["_rejected"]))
        margin = chosen - rejected
        metrics = {"accuracy": float((margin > 0).mean()), "margin": float(margin.mean()),
                   "loss": float(np.mean(np.logaddexp(0, -margin))), "pairs": int(len(margin))}
        rows = pd.DataFrame({"row": frame["_row"], "prompt": [prompt_text(p) for p in prompts],
                             "chosen": frame["_chosen"], "rejected": frame["_rejected"],
                             "chosen_score": chosen, "rejected_score": rejected})
        return metrics, rows
