"""`dpo`: direct preference optimisation of a causal LM (TRL's DPOTrainer), LoRA by default.

With a PEFT method the reference model is the base with the adapter switched off — no second copy in memory.
Prompts are rendered as sft renders them (data.prompt_format); TRL tokenizes prompt + response and adds EOS.
Evaluation (`preference_metrics`) reloads the saved run and compares, on held-out pairs, the log-likelihood
margin log π(chosen) - log π(rejected) of the base and of the tuned policy, and DPO's implicit reward margin
β·[(log π - log π_ref)(chosen) - (log π - log π_ref)(rejected)].
"""
from __future__ import annotations

import contextlib
from typing import Literal

from pydantic import Field

from ..schema import Section
from . import preference

NAME = "dpo"
DATA_FIELDS = preference.DATA_FIELDS
METRICS = ("loss", "accuracy")  # accuracy: held-out pairs whose implicit reward prefers the chosen response
KIND, USE = "generator", "`tunelab generate`"
PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_HEAD = "causal-lm"  # the head it builds (checked to exist before any work)
CAUSAL_LM, SERVES = True, "generate"
CHAT_PROMPTS = True  # it learns from conversations rendered with the chat template (benchmarks too)
DEFAULT_METHOD = "lora"  # the frozen base is the reference: no second copy in memory
SECTION = "dpo"


class Settings(Section):
    """task dpo: direct preference optimisation (TRL's DPOTrainer)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference model (the frozen base): higher stays closer to it."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero"] = "sigmoid"
    """`sigmoid` is DPO's loss; the others are TRL's variants (IPO, SLiC hinge, robust DPO, APO-zero)."""


def check(config) -> list[str]:
    return preference.check(config)


def load_splits(config):
    from ..data import preference_splits

    return preference_splits(config)


def fit(ctx) -> tuple[dict, dict]:
    import datasets
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from ..trainer import callbacks, training_args
    from ..trainer import fit as train

    config, splits = ctx.config, ctx.splits
    set_seed(config.train.seed)
    tokenizer, model, params = preference.load_policy(config, ctx.model_dir, PEFT_TASK_TYPE)
    settings = config.dpo or Settings()
    sets = {name: datasets.Dataset.from_list(rows(getattr(splits, name), tokenizer, config.data))
            for name in ("train", "validation") if len(getattr(splits, name))}
    has_validation = "validation" in sets
    best = "eval_rewards/accuracies" if config.metric == "accuracy" else None
    args = training_args(config, ctx.run, has_validation, cls=DPOConfig, best_metric=best,
                         max_length=config.model.max_length, beta=settings.beta, loss_type=[settings.loss])
    trainer = DPOTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets.get("validation"),
                         processing_class=tokenizer,
                         callbacks=callbacks(config, ctx.run, has_validation) + list(ctx.callbacks))
    stats = train(trainer, config, ctx.run, ctx.resume, tokenizer)
    return params, {**stats, "pairs": {k: len(v) for k, v in sets.items()}}


def evaluate(ctx, stats: dict) -> dict:
    """Likelihood and reward margins of the reloaded policy against the base on held-out pairs; forgetting."""
    from .generate import Generator
    from .generative import forgetting

    config = ctx.config
    stats.pop("validation_loss", None)
    tuned, base = Generator.from_saved(ctx.run.path, config), Generator.base(config)
    metrics = {}
    for name in ("validation", "test"):
        frame = getattr(ctx.splits, name)
        if len(frame):
            metrics[name] = preference_metrics(tuned.model, tuned.tokenizer, frame, config.data,
                                               (config.dpo or Settings()).beta, config.model.max_length,
                                               lambda: base.model)
    if config.eval.forgetting:
        metrics["forgetting"] = forgetting(config, tuned, base)
    return metrics


def load(path, config, full_precision: bool = False):
    from .generate import Generator

    return Generator.from_saved(path, config)


def evaluate_file(path, config, spec: str, **_) -> dict:
    """`tunelab eval`: the margins of the saved policy against the base on the pairs of a file."""
    from ..data.preferences import expand_pairs, preference_table
    from .generate import Generator

    tuned, base = Generator.from_saved(path, config), Generator.base(config)
    frame = expand_pairs(preference_table(spec, config.data))
    return preference_metrics(tuned.model, tuned.tokenizer, frame, config.data, (config.dpo or Settings()).beta,
                              config.model.max_length, lambda: base.model)


def report(metrics: dict) -> list[str]:
    from .generative import forgetting_lines

    return [f"{split:>10}: log-likelihood margin log π(chosen) - log π(rejected) {s['base_logp_margin']:.3f} "
            f"(base) → {s['logp_margin']:.3f}; chosen preferred {s['base_preference_accuracy']:.1%} → "
            f"{s['preference_accuracy']:.1%}; DPO reward margin {s['reward_margin']:.3f} (accuracy "
            f"{s['reward_accuracy']:.1%}) ({s['pairs']} pairs)"
            for split in ("validation", "test") if (s := metrics.get(split))] + \
        forgetting_lines(metrics.get("forgetting"))


token_lengths = preference.token_lengths


def rows(frame, tokenizer, data) -> list[dict]:
    """TRL's explicit-prompt preference layout, prompts rendered for this model."""
    return [{"prompt": preference.render(p, tokenizer, data), "chosen": c, "rejected": r}
            for p, c, r in zip(frame["_prompt"], frame["_chosen"], frame["_rejected"])]


def _reference(model, base_loader):
    """A context giving the reference model: the policy with its adapter disabled, or a separately loaded base."""
    if hasattr(model, "disable_adapter"):
        @contextlib.contextmanager
        def ctx():
            with model.disable_adapter():
                yield model
        return ctx()
    return contextlib.nullcontext(base_loader())


def preference_metrics(model, tokenizer, frame, data, beta: float, max_length: int, base_loader) -> dict:
    """Held-out pairs: log-likelihood margins of the reference and the policy, and DPO's reward margin/accuracy."""
    import numpy as np

    prompts = [preference.render(p, tokenizer, data) for p in frame["_prompt"]]
    chosen, rejected = list(frame["_chosen"]), list(frame["_rejected"])
    tokenizer.padding_side = "right"

    def logps(m):
        return (preference.response_logps(m, tokenizer, prompts, chosen, max_length=max_length),
                preference.response_logps(m, tokenizer, prompts, rejected, max_length=max_length))

    pc, pr = logps(model)
    with _reference(model, base_loader) as ref:
        rc, rr = logps(ref)
    reward_margin = beta * ((pc - rc) - (pr - rr))
    return {"pairs": len(prompts),
            "logp_margin": float(np.mean(pc - pr)), "base_logp_margin": float(np.mean(rc - rr)),
            "preference_accuracy": float(np.mean(pc > pr)), "base_preference_accuracy": float(np.mean(rc > rr)),
            "reward_margin": float(np.mean(reward_margin)), "reward_accuracy": float(np.mean(reward_margin > 0)),
            "chosen_logp_change": float(np.mean(pc - rc)), "rejected_logp_change": float(np.mean(pr - rr))}
