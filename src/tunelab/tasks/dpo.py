"""`dpo`: direct preference optimisation of a causal LM (TRL's DPOTrainer), LoRA by default.

With a PEFT method the reference model is the base with the adapter switched off — no second copy in memory.
Prompts are rendered as sft renders them (data.prompt_format); TRL tokenizes prompt + response and adds EOS.
Evaluation (`preference_metrics`) reloads the saved run and compares, on held-out pairs, the log-likelihood
margin log π(chosen) - log π(rejected) of the base and of the tuned policy, and DPO's implicit reward margin
β·[(log π - log π_ref)(chosen) - (log π - log π_ref)(rejected)].
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import preference


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
