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
from typing import Literal

from pydantic import Field, model_validator

from ..data.conversations import prompt_text
from ..errors import TunelabError
from ..schema import Section
from . import preference

NAME = "rl"
DATA_FIELDS = frozenset({"prompt", "instruction", "prompt_format", "bad_rows"})
METRICS = ("loss", "accuracy")
KIND, USE = "generator", "`tunelab generate`"
PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_HEAD = "causal-lm"  # the head it builds (checked to exist before any work)
CAUSAL_LM, SERVES = True, "generate"
CHAT_PROMPTS = True  # it learns from conversations rendered with the chat template (benchmarks too)
DEFAULT_METHOD = "lora"  # the frozen base is the reference: no second copy in memory
SECTION, SECTION_REQUIRED = "rl", True


class RewardSource(Section):
    """task rl: what scores a completion. Exactly one of `run` and `function`."""
    run: str | None = None
    """A finished tunelab run: a `reward` run (its score of prompt + completion), or a `classify` run with `label`
    (the probability of that label for the text)."""
    label: str | None = None
    """With a classify run: the label whose probability is the reward, e.g. `positive`."""
    function: str | None = None
    """A Python function `module:function` or `path/to/file.py:function`, called as TRL reward functions are:
    f(prompts=[...], completions=[...], **columns) → list of floats. Runs code: needs --allow-code."""
    include_prompt: bool = True
    """With a classify run: score the prompt text followed by the completion (e.g. the whole review), not the
    completion alone."""

    @model_validator(mode="after")
    def _one(self):
        if (self.run is None) == (self.function is None):
            raise ValueError("give exactly one of `run` (a reward or classify run directory) and `function` "
                             "(module:function)")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"`function` must be module:function or file.py:function (got {self.function!r})")
        return self


class Settings(Section):
    """task rl: online optimisation of the policy against a reward, with TRL's GRPO or RLOO trainer (the PPO
    clipped objective with a KL penalty towards the reference model, advantages from a group of completions
    per prompt instead of a value network)."""
    reward: RewardSource
    algorithm: Literal["grpo", "rloo"] = "grpo"
    """`grpo` (advantage: reward minus the group mean, over the group's std) or `rloo` (leave-one-out baseline)."""
    group_size: int = Field(4, ge=2, le=64)
    """Completions sampled per prompt; train.batch_size × train.grad_accum must be a multiple of it."""
    kl: float = Field(0.05, ge=0)
    """KL coefficient (β) of the penalty towards the reference model (the base: LoRA's adapter disabled)."""
    clip: float = Field(0.2, gt=0, lt=1)
    """Clip range ε of the policy ratio (PPO)."""
    max_new_tokens: int = Field(32, ge=1, le=4096)
    """Length limit of each sampled completion."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    eval_prompts: int = Field(64, ge=1)
    """Held-out prompts (validation, else test split) scored with the model before and after training."""
    eval_samples: int = Field(2, ge=1)
    """Sampled completions per held-out prompt (seeded) for the before/after reward."""


def check(config) -> list[str]:
    problems = preference.check(config)
    if config.rl is not None:
        effective = config.train.batch_size * config.train.grad_accum
        if effective % config.rl.group_size:
            problems.append(f"train.batch_size × train.grad_accum ({effective}) must be a multiple of rl.group_size "
                            f"({config.rl.group_size}): each step trains whole groups of completions")
    return problems


def load_splits(config):
    from ..data import preference_splits

    return preference_splits(config, prompts_only=True)


def setup(config, *, allow_code: bool, load_run):
    """The reward, loaded before the run directory exists (a bad reward spec is a user mistake)."""
    return load_reward(config.rl.reward, allow_code, load_run)


def fit(ctx) -> tuple[dict, dict]:
    import datasets
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from ..trainer import callbacks, training_args
    from ..trainer import fit as train

    config, s, reward = ctx.config, ctx.config.rl, ctx.setup
    set_seed(config.train.seed)
    tokenizer, model, params = preference.load_policy(config, ctx.model_dir, PEFT_TASK_TYPE)
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if s.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    train_ds = datasets.Dataset.from_list(rows(ctx.splits.train, tokenizer, config.data))
    args = training_args(config, ctx.run, False, cls=config_cls, num_generations=s.group_size, beta=s.kl,
                         epsilon=s.clip, max_completion_length=s.max_new_tokens, temperature=s.temperature,
                         top_p=s.top_p)
    trainer = trainer_cls(model=model, reward_funcs=[reward], args=args, train_dataset=train_ds,
                          processing_class=tokenizer, callbacks=callbacks(config, ctx.run, False) + list(ctx.callbacks))
    stats = train(trainer, config, ctx.run, ctx.resume, tokenizer)
    return params, {**stats, "prompts": len(train_ds), "reward": reward.describe}


def evaluate(ctx, stats: dict) -> dict:
    """Reward of sampled completions on held-out prompts, base vs tuned, and the KL between them; rewards.png;
    forgetting."""
    from ..plots import read_jsonl
    from .generate import Generator
    from .generative import forgetting

    config, splits, reward = ctx.config, ctx.splits, ctx.setup
    stats.pop("validation_loss", None)
    tuned, base = Generator.from_saved(ctx.run.path, config), Generator.base(config)
    metrics = {}
    frame = splits.validation if len(splits.validation) else splits.test
    if len(frame):
        metrics["held_out"], samples = held_out(config, frame, tuned, base, reward, config.train.seed)
        metrics["held_out"]["split"] = "validation" if len(splits.validation) else "test"
        metrics["held_out"]["reward"] = reward.describe
        _write_jsonl(ctx.run.path / "samples.jsonl", samples)
    plot_rewards(read_jsonl(ctx.run.path / "metrics.jsonl"), ctx.run.path / "rewards.png",
                 f"{config.rl.algorithm} · {config.model.name} · {reward.describe}")
    if config.eval.forgetting:
        metrics["forgetting"] = forgetting(config, tuned, base)
    return metrics


def load(path, config, full_precision: bool = False):
    from .generate import Generator

    return Generator.from_saved(path, config)


def evaluate_file(path, config, spec: str, *, allow_code: bool = False, load_run=None, **_) -> dict:
    """`tunelab eval`: the reward of the base and the tuned policy on the prompts of a file, and their KL."""
    from ..data.preferences import prompt_table
    from .generate import Generator

    if load_run is None:
        raise TunelabError("evaluating an rl run needs its reward: call through tunelab.evaluate / `tunelab eval`")
    reward = load_reward(config.rl.reward, allow_code, load_run)
    tuned, base = Generator.from_saved(path, config), Generator.base(config)
    return held_out(config, prompt_table(spec, config.data), tuned, base, reward, config.train.seed)[0]


def report(metrics: dict) -> list[str]:
    from .generative import forgetting_lines

    h = metrics.get("held_out")
    lines = [] if not h else [
        f"held-out prompts ({h['prompts']} {h['split']} prompts × {h['samples_per_prompt']} samples), reward = "
        f"{h['reward']}:\n  mean reward {h['base_reward']:.4f} (base) → {h['tuned_reward']:.4f} (tuned); KL(tuned ‖ "
        f"base) {h['kl']:.2f} nats per completion; mean length {h['base_length']:.1f} → {h['tuned_length']:.1f} tokens"]
    return lines + forgetting_lines(metrics.get("forgetting"))


token_lengths = preference.token_lengths


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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


def load_reward(spec, allow_code: bool, load_run) -> Reward:
    """The configured reward, loaded once; errors name what is wrong with the spec. A `function:` reward imports
    and runs the Python code a config names, so it needs `allow_code` (`--allow-code`). `load_run(path)` opens a
    finished run: (path, config)."""
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
    path, run_config = load_run(spec.run)
    if run_config.task not in ("reward", "classify"):
        raise TunelabError(f"rl.reward.run {spec.run} is a `{run_config.task}` run; the reward is a `reward` run, or "
                           f"a `classify` run with rl.reward.label")
    if run_config.task == "reward":
        from .reward import RewardModel

        model = RewardModel.from_saved(path, run_config)
        return Reward(spec, f"reward model {spec.run}", lambda p, c, _: model.score(p, c))
    from .classifier import Classifier

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
    import torch

    torch.manual_seed(seed)
    repeated = [p for p in prompts for _ in range(settings.eval_samples)]
    return generator.generate(repeated, max_new_tokens=settings.max_new_tokens, do_sample=True,
                              temperature=settings.temperature, top_p=settings.top_p, progress=True, strip=False)


def held_out(config, frame, tuned, base, reward: Reward, seed: int) -> tuple[dict, list[dict]]:
    """Mean reward of the base and the tuned policy on held-out prompts, the tuned policy's KL to the base
    (Monte-Carlo: mean over its own samples of log π(y|x) - log π_ref(y|x), in nats per completion), mean length;
    and sample rows for reading."""
    import numpy as np

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
    import numpy as np

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
