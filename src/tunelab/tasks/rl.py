"""`rl`: online optimisation of a causal LM against a reward (RLHF), with TRL's GRPO or RLOO trainer.

Each step samples `rl.group_size` completions per prompt, scores them with the reward, and takes a PPO-style
clipped policy-gradient step whose advantage is the reward relative to its group, with a KL penalty (β = rl.kl)
towards the reference model — the base with the LoRA adapter switched off. The reward is a trained reward run,
a classify run and the label to maximise, or a Python function.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from ..data.preferences import prompt_text
from ..errors import TunelabError
from . import preference


class Reward:
    """A reward in TRL's calling convention: reward(prompts=, completions=, **columns) → list of floats. It sees
    the prompts as written in the data (`raw_prompt`), not the chat-rendered text the policy reads."""

    def __init__(self, spec, describe: str, score):
        self.spec, self.describe, self._score = spec, describe, score
        self.__name__ = "reward"  # TRL names its logged reward columns after this

    def __call__(self, prompts=None, completions=None, raw_prompt=None, **kwargs) -> list[float]:
        raw = raw_prompt if raw_prompt is not None else prompts
        return [float(x) for x in self._score(list(raw), [_completion_text(c) for c in completions], kwargs)]


def _completion_text(c) -> str:
    if isinstance(c, list):  # conversational completion: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in c)
    return str(c)


def load_reward(spec, allow_code: bool = False) -> Reward:
    """The configured reward, loaded once; errors name what is wrong with the spec. A `function:` reward imports
    and runs the Python code a config names, so it needs `allow_code` (`--allow-code`)."""
    if spec.function:
        if not allow_code:
            raise TunelabError(f"rl.reward.function names Python code ({spec.function}) that tunelab would import and "
                               f"run; pass --allow-code (Python: allow_code=True) if you trust this config and that "
                               f"code")
        fn = _import_function(spec.function)

        def score(prompts, completions, columns):
            values = fn(prompts=prompts, completions=completions, **columns)
            if len(values) != len(completions):
                raise TunelabError(f"reward function {spec.function} returned {len(values)} values for "
                                   f"{len(completions)} completions")
            return values

        return Reward(spec, f"function {spec.function}", score)
    from ..runs import open_finished

    path, run_config = open_finished(spec.run, task=("reward", "classify"))
    if run_config.task == "reward":
        from .reward import RewardModel

        model = RewardModel.from_saved(path, run_config)
        return Reward(spec, f"reward model {spec.run}", lambda p, c, _: model.score(p, c))
    from .classify import Classifier

    clf = Classifier.from_saved(path, run_config)
    if spec.label is None or spec.label not in clf.labels:
        raise TunelabError(f"rl.reward.run {spec.run} is a classifier with labels {', '.join(clf.labels)}; set "
                           f"rl.reward.label to the one to maximise")

    def score(prompts, completions, _):
        texts = [f"{prompt_text(p).rstrip()} {c.strip()}" if spec.include_prompt else c
                 for p, c in zip(prompts, completions)]
        return [p[spec.label] for p in clf.predict_proba(texts)]

    return Reward(spec, f"P({spec.label}) of classifier {spec.run}", score)


def _import_function(ref: str):
    module, _, name = ref.rpartition(":")
    try:
        if module.endswith(".py"):
            path = Path(module)
            if not path.is_file():
                raise TunelabError(f"rl.reward.function: file {module} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module)
    except ImportError as exc:
        raise TunelabError(f"rl.reward.function: cannot import {module}: {exc}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise TunelabError(f"rl.reward.function: {module} has no function `{name}`")
    return fn


def rows(frame, tokenizer, data) -> list[dict]:
    """Training rows: `prompt` (rendered for the policy), `raw_prompt` (for the reward), other data columns."""
    extra = [c for c in frame.columns if not c.startswith("_") and c != data.prompt]
    return [{"prompt": preference.render(p, tokenizer, data), "raw_prompt": p,
             **{c: r[c] for c in extra}} for p, r in zip(frame["_prompt"], frame.to_dict("records"))]


def sample(generator, prompts: list[str], settings, seed: int) -> list[str]:
    """`eval_samples` seeded samples per prompt, at the training temperature / top_p."""
    torch.manual_seed(seed)
    repeated = [p for p in prompts for _ in range(settings.eval_samples)]
    return generator.generate(repeated, max_new_tokens=settings.max_new_tokens, do_sample=True,
                              temperature=settings.temperature, top_p=settings.top_p, progress=True, strip=False)


def evaluate(config, frame, tuned, base, reward: Reward, seed: int) -> tuple[dict, list[dict]]:
    """Mean reward of the base and the tuned policy on held-out prompts, the tuned policy's KL to the base
    (Monte-Carlo: mean over its own samples of log π(y|x) - log π_ref(y|x), in nats per completion), mean length;
    and sample rows for reading."""
    settings = config.rl
    frame = frame.head(settings.eval_prompts)
    raw = list(frame["_prompt"])
    rendered = [preference.render(p, tuned.tokenizer, config.data) for p in raw]
    raw_rep = [p for p in raw for _ in range(settings.eval_samples)]
    rendered_rep = [p for p in rendered for _ in range(settings.eval_samples)]
    out, samples = {"prompts": len(raw), "samples_per_prompt": settings.eval_samples}, {}
    for name, gen in (("base", base), ("tuned", tuned)):
        completions = sample(gen, rendered, settings, seed)
        scores = np.array(reward(prompts=raw_rep, completions=completions, raw_prompt=raw_rep))
        lengths = [len(gen.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions]
        out[f"{name}_reward"] = float(scores.mean())
        out[f"{name}_reward_std"] = float(scores.std())
        out[f"{name}_length"] = float(np.mean(lengths))
        samples[name] = (completions, scores)
    completions = samples["tuned"][0]
    for g in (tuned, base):
        g.tokenizer.padding_side = "right"
    policy = preference.response_logps(tuned.model, tuned.tokenizer, rendered_rep, completions, add_eos=False,
                                       max_length=config.model.max_length + settings.max_new_tokens)
    ref = preference.response_logps(base.model, base.tokenizer, rendered_rep, completions, add_eos=False,
                                    max_length=config.model.max_length + settings.max_new_tokens)
    for g in (tuned, base):
        g.tokenizer.padding_side = "left"
    out["kl"] = float(np.mean(policy - ref))
    out["reward_gain"] = out["tuned_reward"] - out["base_reward"]
    table = [{"prompt": prompt_text(p), "base": samples["base"][0][i], "base_reward": float(samples["base"][1][i]),
              "tuned": samples["tuned"][0][i], "tuned_reward": float(samples["tuned"][1][i])}
             for i, p in enumerate(raw_rep)]
    return out, table


def plot_rewards(log: list[dict], out: Path, title: str) -> bool:
    """rewards.png: mean reward (± std), KL to the reference and completion length per logged step."""
    steps = [r for r in log if "reward" in r and "step" in r]
    if not steps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in steps]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    mean = np.array([r["reward"] for r in steps])
    std = np.array([r.get("reward_std", 0.0) for r in steps])
    axes[0].plot(x, mean, marker="o", ms=3)
    axes[0].fill_between(x, mean - std, mean + std, alpha=0.2)
    axes[0].set_title("mean reward of sampled completions")
    kl = [(r["step"], r["kl"]) for r in steps if "kl" in r and not math.isnan(r["kl"])]
    if kl:
        axes[1].plot(*zip(*kl), marker="o", ms=3, color="tab:red")
    axes[1].set_title("KL to the reference (per token)")
    length = [(r["step"], r["completions/mean_length"]) for r in steps if "completions/mean_length" in r]
    if length:
        axes[2].plot(*zip(*length), marker="o", ms=3, color="tab:green")
    axes[2].set_title("mean completion length (tokens)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
