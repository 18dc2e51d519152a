"""The run config: one YAML file describes model, data, task, method, training, evaluation and output.

Precedence: field defaults < YAML file < `--set key.path=value` overrides. Every problem is reported at once,
naming the file and the key. A loaded config is frozen; the resolved version is saved with every run.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from . import __version__
from .errors import ConfigError
from .methods import METHODS, MethodOptions
from .schema import Section

METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss")


TASKS = ("classify", "sft", "seq2seq", "causal_lm", "reward", "dpo", "rl")
_PROMPTED = {"format", "prompt", "response", "messages", "instruction", "prompt_format", "template", "loss_on",
             "overflow", "bad_rows"}
_SFT_FIELDS = _PROMPTED | {"datasets", "replay"}
_PREFERENCE_FIELDS = {"prompt", "chosen", "rejected", "responses", "scores", "ranking_pairs", "instruction",
                      "prompt_format", "bad_rows"}
# data fields each task reads; a field of another task given in a config is an error, and is left out of the
# saved config
TASK_FIELDS = {"classify": {"text", "text_pair", "label", "labels"}, "sft": _SFT_FIELDS,
               "seq2seq": _SFT_FIELDS - {"loss_on", "replay"}, "causal_lm": {"text", "overflow"},
               "reward": _PREFERENCE_FIELDS, "dpo": _PREFERENCE_FIELDS,
               "rl": {"prompt", "instruction", "prompt_format", "bad_rows"}}
_ALL_TASK_FIELDS = set().union(*TASK_FIELDS.values())
GENERATIVE = ("sft", "seq2seq", "causal_lm")
PREFERENCE = ("reward", "dpo", "rl")
# methods that cannot train on preferences: no gradient (features, icl), or virtual tokens TRL's preference
# trainers do not handle (prefix, prompt)
_NOT_FOR_PREFERENCE = ("features", "icl", "prefix", "prompt")


class ModelConfig(Section):
    name: str
    """Packaged alias (`minilm`, `smollm2-135m`), a Hugging Face hub id, or a local folder."""
    max_length: int = Field(128, ge=8, le=32768)
    """Inputs longer than this many tokens are truncated."""


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1)
    """Fraction of the train file held out for validation (when `data.validation` is not given)."""
    test: float = Field(0.2, ge=0, lt=1)
    """Fraction of the train file held out for the final test (when `data.test` is not given)."""
    seed: int = 42
    """Seed of the split; the same seed gives the same split."""
    stratify: bool = True
    """Keep the label proportions equal across the splits."""
    group_by: str | None = None
    """Column whose groups never straddle two splits (e.g. a user or document id). Without it, examples with
    the same normalised text are grouped, so duplicates cannot leak across the split."""

    @model_validator(mode="after")
    def _fractions(self):
        if self.validation + self.test >= 1:
            raise ValueError(f"validation + test must be below 1 (got {self.validation} + {self.test})")
        return self


class SourceConfig(Section):
    """One dataset of a multitask mix (`data.datasets`): its files, its sampling weight, and any prompt setting
    that differs from the top-level `data` ones (those are the defaults)."""
    train: str
    """Training file of this task (split into train/validation/test like `data.train`)."""
    validation: str | None = None
    test: str | None = None
    name: str | None = None
    """Name in the metrics (default: the file's stem)."""
    weight: float = Field(1.0, gt=0)
    """Sampling weight: this task's training examples are drawn `weight` times per epoch (0.5 = half of them,
    2 = each twice on average), so small tasks are not drowned by large ones."""
    format: Literal["auto", "alpaca", "prompt_response", "messages"] | None = None
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None
    instruction: str | None = None
    prompt_format: Literal["auto", "chat", "alpaca", "template"] | None = None
    template: str | None = None

    def label(self) -> str:
        return self.name or Path(self.train.removeprefix("sample:")).stem


class ReplayConfig(Section):
    """General text mixed into instruction tuning so the model keeps what it knew (rehearsal)."""
    train: str
    """File of raw text (one document per row)."""
    text: str = "text"
    """Column holding the text."""
    fraction: float = Field(0.1, gt=0, le=1)
    """Replay rows per epoch as a fraction of the instruction rows (drawn with a fixed seed)."""


class DataConfig(Section):
    train: str | None = None
    """Training data: a .jsonl/.json/.csv/.parquet file, a `datasets` folder, or `sample:NAME` (shipped data).
    (task sft may list several in `datasets` instead.)"""
    validation: str | None = None
    """Validation file; if absent, split from `train` by `split.validation`."""
    test: str | None = None
    """Test file; if absent, split from `train` by `split.test`."""
    split: SplitConfig = SplitConfig()
    text: str = "text"
    """Column holding the input text."""
    text_pair: str | None = None
    """Optional second text column (sentence-pair tasks)."""
    label: str = "label"
    """Column holding the label (string or integer)."""
    labels: list[str] | None = None
    """The label set in a fixed order; default: the sorted labels found in the train data."""
    leakage: Literal["error", "warn", "drop", "ignore"] = "error"
    """What to do when a validation/test text (normalised) also appears in train: stop (`error`), go on with a
    warning (`warn`), remove those rows from validation/test and say how many (`drop`), or say nothing."""
    numbers_as_text: bool = False
    """Accept numbers where text is expected (read as their decimal text). Off: a number in a text column is an
    error naming the row — it usually means the wrong column was named."""
    max_train_examples: int | None = Field(None, ge=1)
    """Use only this many training examples (a fixed-seed sample), e.g. for a quick try."""
    # --- task: sft
    format: Literal["auto", "alpaca", "prompt_response", "messages"] = "auto"
    """sft row layout: `alpaca` (instruction, optional input, output), `prompt_response` (`prompt` and
    `response` columns), `messages` (chat turns: system/user/assistant); `auto` detects it from the columns."""
    prompt: str = "prompt"
    """sft: column holding the prompt (prompt_response layout). reward, dpo, rl: column holding the prompt — a
    string, or chat messages ([{role, content}, ...] ending with a user message)."""
    response: str = "response"
    """sft: column holding the response (prompt_response layout, and user templates)."""
    messages: str = "messages"
    """sft: column holding the chat turns (messages layout)."""
    instruction: str | None = None
    """sft: a fixed instruction put before every prompt, e.g. "Translate English to French."."""
    prompt_format: Literal["auto", "chat", "alpaca", "template", "plain"] = "auto"
    """sft, dpo, rl (and reward on a causal LM): how a prompt is shown to the model: its own chat template (`auto`
    when it has one), the Alpaca "### Instruction / ### Response" text, `plain` (the prompt text as it is, to be
    continued: e.g. the first words of a review), or `template` (sft only; see data.template)."""
    template: str | None = None
    """sft, prompt_format template: text with {column} placeholders, ending with the response placeholder,
    e.g. "English: {en}\nFrench: {fr}" with response: fr."""
    loss_on: Literal["response", "all"] = "response"
    """sft: take the loss on the response tokens only (default), or on every token."""
    bad_rows: Literal["error", "drop"] | None = None
    """A malformed row (sft: unknown role, empty response, missing column value; preferences: missing prompt, empty
    response, chosen == rejected, a ranking without two distinct scores) stops the run with its row number
    (`error`), or is dropped and counted (`drop`). Default: error for sft, drop for preference data."""
    overflow: Literal["truncate", "drop"] = "truncate"
    """sft, seq2seq, causal_lm: an example longer than model.max_length is cut (its end is lost) or dropped;
    both are counted. (causal_lm with train.packing cuts long documents into max_length pieces instead.)"""
    datasets: list[SourceConfig] | None = None
    """sft multitask instruction tuning: several datasets, each with its own prompt settings and sampling weight;
    metrics are reported per dataset. Replaces `data.train`."""
    replay: ReplayConfig | None = None
    """sft: mix this fraction of general text into training (loss on all its tokens) against forgetting."""
    # --- tasks reward, dpo
    chosen: str = "chosen"
    """reward, dpo: column holding the preferred response (pairs layout)."""
    rejected: str = "rejected"
    """reward, dpo: column holding the other response (pairs layout)."""
    responses: str = "responses"
    """reward, dpo: column holding a ranking — a list of responses, best first (or ordered by `data.scores`);
    used when the file has no `chosen`/`rejected` columns. Each ranking becomes pairs (data.ranking_pairs)."""
    scores: str | None = None
    """reward, dpo: column holding one score per response (higher is better) instead of a best-first order;
    responses with equal scores make no pair."""
    ranking_pairs: Literal["all", "best_vs_rest"] = "all"
    """How a ranking of k responses becomes pairs: every better/worse pair (k(k-1)/2, as InstructGPT trained its
    reward model) or the best against each other (k-1)."""

    @model_validator(mode="after")
    def _one_source(self):
        if self.train is None and self.datasets is None:
            raise ValueError("data.train is required (or data.datasets, a list of datasets for multitask sft)")
        if self.train is not None and self.datasets is not None:
            raise ValueError("give data.train or data.datasets (a multitask list), not both")
        if self.datasets is not None and (self.validation or self.test):
            raise ValueError("with data.datasets, give validation/test files per dataset")
        return self

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, v):
        # data labels are compared as text, so `labels: [0, 1]` must mean the same as `["0", "1"]`
        return [str(x) for x in v] if isinstance(v, list) else v


class TrainConfig(Section):
    epochs: float = Field(3, gt=0)
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(32, ge=1)
    """Examples per step per device (times `grad_accum` for the effective batch)."""
    eval_batch_size: int = Field(64, ge=1)
    lr: float | None = Field(None, gt=0, le=1)
    """Peak learning rate; default depends on the method (full 5e-5, last_layers 1e-4, lora/dora 5e-4, qlora 2e-4,
    adapter 1e-3, head/ia3 3e-3, prefix 1e-2, prompt 3e-2)."""
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.1, ge=0, le=1)
    """Fraction of the training steps spent warming the learning rate up from zero."""
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation steps."""
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto`: bf16 autocast where the hardware has fast bf16 (CPUs with AVX512-BF16/AMX, Ampere+ GPUs)."""
    eval_every: Literal["epoch"] | int = "epoch"
    """Evaluate on validation every epoch or every N steps."""
    logging_steps: int = Field(10, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop when `eval.metric` has not improved for this many evaluations (needs validation data)."""
    group_by_length: bool | None = None
    """Batch examples of similar length together (less padding; batches are shuffled, not their order within).
    Default: on for classify, seq2seq and unpacked sft/causal_lm; off for the preference tasks."""
    packing: bool | None = None
    """sft, causal_lm: concatenate short examples into sequences of up to model.max_length tokens. Packed
    examples cannot attend to each other (position ids restart per example and the attention is
    block-diagonal). Default: on for causal_lm (raw text), off for sft — there `train.batch_size` would count
    packed rows of several examples each, so turning it on changes the steps per epoch (see the README)."""
    cache_frozen: bool = True
    """head, last_layers (classify): run the frozen embeddings and blocks once per example before training and
    reuse their output every epoch (the frozen part then sees no dropout). Off: every epoch runs the whole model."""
    cache_frozen_mb: int = Field(2048, ge=0)
    """Memory bound for that cache (estimated before it is built); over it, training runs uncached."""
    compile: bool = False
    """sft, causal_lm: torch.compile each transformer block for training (regional compilation). Measured on the
    2-core CPU (bench/sft.py): 1.4× the tokens/s and −0.5 GB peak RSS for smollm2 LoRA, after tens of seconds of
    compiling. Off by default: the compile time dominates short runs."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower (always on for qlora)."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    """Experiment trackers the Trainer also logs to (metrics.jsonl is always written). tensorboard logs go to
    RUN/tensorboard; mlflow and wandb use their own settings (MLFLOW_TRACKING_URI, WANDB_MODE=offline, ...)."""

    @field_validator("eval_every")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be `epoch` or a positive number of steps")
        return v


class EarlierTask(Section):
    """classify: a labelled data set of an earlier task, used to measure forgetting with a linear probe."""
    data: str
    """File (or `sample:NAME`) with a text and a label column."""
    text: str = "text"
    label: str = "label"
    max_examples: int = Field(1000, ge=20)
    """Use at most this many rows (a seeded sample); half fit the probe, half score it."""


class EvalConfig(Section):
    metric: Literal["accuracy", "f1_macro", "precision_macro", "recall_macro", "loss"] | None = None
    """Metric that picks the best checkpoint and drives early stopping; default f1_macro (classify), loss (sft)."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    """sft: tokens generated per test prompt for the generation metrics (greedy)."""
    max_generate: int | None = Field(200, ge=1)
    """sft: generate for at most this many test examples (generation is slow on a CPU); null for all."""
    forgetting: str | None = "sample:sotu"
    """Generative tasks: general text (a `text` column) on which the perplexity of the base and of the fine-tuned
    model are compared after training — catastrophic forgetting, as a ratio. Default: State of the Union prose
    shipped with tunelab; null to skip."""
    forgetting_max: int = Field(32, ge=1)
    """Use at most this many documents of `eval.forgetting` (a fixed, seeded sample)."""
    earlier_task: EarlierTask | None = None
    """classify: forgetting of an earlier task — a logistic-regression probe on the encoder's mean-pooled features
    is fitted and scored on this data with the base encoder and with the fine-tuned one; the accuracy drop is
    reported. E.g. {data: sample:sentiment_uci, label: source} asks whether the encoder still tells the review
    sites apart after sentiment training."""


class DPOSettings(Section):
    """task dpo: direct preference optimisation (TRL's DPOTrainer)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference model (the frozen base): higher stays closer to it."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero"] = "sigmoid"
    """`sigmoid` is DPO's loss; the others are TRL's variants (IPO, SLiC hinge, robust DPO, APO-zero)."""


class RewardSource(Section):
    """task rl: what scores a completion. Exactly one of `run` and `function`."""
    run: str | None = None
    """A finished tunelab run: a `reward` run (its score of prompt + completion), or a `classify` run with `label`
    (the probability of that label for the text)."""
    label: str | None = None
    """With a classify run: the label whose probability is the reward, e.g. `positive`."""
    function: str | None = None
    """A Python function `module:function` or `path/to/file.py:function`, called as TRL reward functions are:
    f(prompts=[...], completions=[...], **columns) → list of floats."""
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


class RLSettings(Section):
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


class OutputConfig(Section):
    dir: str | None = None
    """Run directory; default `runs/<config file name>`."""
    keep_checkpoints: bool = False
    """Keep the intermediate Trainer checkpoints after a successful run (they are needed only for --resume)."""


ICL_ENTRIES = ("icl_0", "icl_k", "icl_retrieved")


class CompareConfig(Section):
    """`tunelab compare`: the approaches to run on the same data, split and seed, side by side in one report."""
    methods: list[str] = Field(default_factory=lambda: ["features", "head", "last_layers", "full", "lora"],
                               min_length=1)
    """Method names, plus the no-training baselines `icl_0` (zero-shot), `icl_k` (k random demonstrations) and
    `icl_retrieved` (the k nearest training examples as demonstrations). Classification for the icl ones."""
    shots: int = Field(4, ge=1, le=64)
    """k of icl_k and icl_retrieved."""
    icl_model: str | None = None
    """Causal LM for the icl entries (default: model.name)."""
    icl: dict[str, Any] = Field(default_factory=dict)
    """Options of method icl for the icl entries, e.g. {templates: [...], label_words: {...}, retriever: minilm}."""
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Settings for one entry only, as dotted keys: {full: {train.lr: 3.0e-5}, icl_k: {method.templates: [...]}}."""
    dir: str | None = None
    """Folder for the runs, the cache and the report; default `runs/compare-<config file name>`."""

    @model_validator(mode="after")
    def _entries(self):
        problems = []
        known = list(METHODS) + list(ICL_ENTRIES)
        for m in self.methods:
            if m not in known:
                close = difflib.get_close_matches(m, known, n=1)
                hint = f"did you mean `{close[0]}`? " if close else ""
                problems.append(f"unknown method `{m}`; {hint}choose from: {', '.join(known)}")
        if len(set(self.methods)) != len(self.methods):
            problems.append("a method is listed twice")
        for name in self.overrides:  # overrides of entries not run now are kept for when they are (--methods)
            if name not in known:
                problems.append(f"overrides for `{name}`, which is not a method or icl entry")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ParamRange(Section):
    """One searched setting: `choices`, or a range `low`..`high` (integers when both are integers)."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    """Sample on a log scale (learning rates)."""
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ValueError("give either a non-empty `choices` list or `low` and `high`")
        elif self.low is None or self.high is None or self.low >= self.high:
            raise ValueError("needs `low` < `high` (or `choices`)")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs `low` > 0")
        return self


class SearchConfig(Section):
    """`tunelab search`: Optuna's TPE sampler over `space`, pruning trials whose validation metric falls below the
    median of earlier trials at the same evaluation step."""
    space: dict[str, ParamRange] = Field(min_length=1)
    """Dotted config keys → ranges, e.g. {train.lr: {low: 1.0e-5, high: 1.0e-2, log: true},
    method.r: {choices: [4, 8, 16]}, train.epochs: {low: 1, high: 3}}."""
    trials: int = Field(10, ge=1)
    """Trials in total (a resumed search runs only the missing ones)."""
    startup_trials: int = Field(2, ge=0)
    """Trials that always finish before pruning starts (they set the median)."""
    warmup_evaluations: int = Field(0, ge=0)
    """Evaluations of a trial before it may be pruned."""
    dir: str | None = None
    """Folder for the trials, the SQLite study, best.yaml and the plots; default `runs/search-<config name>`."""


class Config(Section):
    model: ModelConfig
    task: Literal["classify", "sft", "seq2seq", "causal_lm", "reward", "dpo", "rl"] = "classify"
    """What to learn: `classify` (sequence classification), `sft` (instruction / chat tuning of a causal LM),
    `seq2seq` (the same instruction data on an encoder-decoder, T5 style), `causal_lm` (continued pre-training on
    raw text), `reward` (a reward model from preference pairs or rankings), `dpo` (direct preference optimisation
    of a causal LM), `rl` (online RL of a causal LM against a reward: GRPO/RLOO)."""
    data: DataConfig
    method: MethodOptions
    """The fine-tuning method: a name (`lora`) or a mapping with `name` and its options (dpo and rl: lora when
    left out)."""
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()
    dpo: DPOSettings | None = None
    """task dpo: its settings (defaults when left out)."""
    rl: RLSettings | None = None
    """task rl: the reward and the sampling/optimisation settings (required for task rl)."""
    compare: CompareConfig | None = None
    """Used by `tunelab compare` only (ignored by `tunelab train`)."""
    search: SearchConfig | None = None
    """Used by `tunelab search` only (ignored by `tunelab train`)."""

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, data: Any):
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": {"name": data["method"]}}
        if isinstance(data, dict) and "method" not in data and data.get("task") in ("dpo", "rl"):
            data = {**data, "method": {"name": "lora"}}  # the frozen base is the reference: no second copy
        return data

    @model_validator(mode="after")
    def _cross_checks(self):
        problems = []
        given = self.data.model_fields_set
        wrong = sorted(given & (_ALL_TASK_FIELDS - TASK_FIELDS[self.task]))
        if wrong:
            problems.append(f"data.{', data.'.join(wrong)} do(es) not apply to task {self.task}")
        if self.task in GENERATIVE:
            if self.eval.metric not in (None, "loss"):
                problems.append(f"eval.metric {self.eval.metric} is a classification metric; task {self.task} "
                                f"uses loss")
            from .tasks.sft import check_template

            for source in [self.data] + list(self.data.datasets or []):
                fmt = source.prompt_format or self.data.prompt_format
                template = source.template or self.data.template
                if fmt == "template":
                    problem = check_template(template or "", source.response or self.data.response)
                    if problem:
                        problems.append(problem)
        if self.method.name == "features" and self.task != "classify":
            problems.append("method features (frozen embeddings + logistic regression) is for task classify")
        if self.eval.earlier_task is not None and self.task != "classify":
            problems.append("eval.earlier_task applies to task classify; generative tasks measure forgetting by "
                            "perplexity (eval.forgetting)")
        if self.method.name == "icl" and self.task != "classify":
            problems.append("method icl (label-word scoring of prompts) is for task classify; for generative tasks "
                            "`tunelab eval --base CONFIG` gives the untrained model's numbers")
        problems += self._preference_checks()
        if self.train.packing and self.task not in ("sft", "causal_lm"):
            problems.append(f"train.packing applies to tasks sft and causal_lm, not {self.task}")
        if self.train.early_stopping_patience and self.method.name in ("prefix", "prompt"):
            problems.append(f"train.early_stopping_patience cannot be used with method {self.method.name}: the "
                            f"Trainer cannot restore a prefix/prompt checkpoint, so the final model is kept")
        if self.train.compile and self.task not in ("sft", "causal_lm"):
            problems.append(f"train.compile applies to tasks sft and causal_lm, not {self.task}")
        if self.train.packing and self.method.name in ("prefix", "prompt"):
            problems.append(f"train.packing cannot be used with method {self.method.name}: its virtual tokens "
                            f"would be shared by every packed example (PEFT ignores position ids)")
        if problems:
            raise ValueError("; ".join(problems))
        no_validation = self.data.validation is None and self.data.split.validation == 0
        if self.train.early_stopping_patience is not None and no_validation:
            raise ValueError("train.early_stopping_patience needs validation data (data.validation or "
                             "data.split.validation > 0)")
        return self

    def _preference_checks(self) -> list[str]:
        problems = []
        if self.task == "rl" and self.rl is None:
            problems.append("task rl needs an `rl:` section with at least `reward:` (a run directory or a function)")
        if self.rl is not None and self.task != "rl":
            problems.append(f"the `rl:` section applies to task rl, not {self.task}")
        if self.dpo is not None and self.task != "dpo":
            problems.append(f"the `dpo:` section applies to task dpo, not {self.task}")
        if self.task in PREFERENCE:
            if self.method.name in _NOT_FOR_PREFERENCE:
                problems.append(f"method {self.method.name} cannot be used with task {self.task}; use lora (or full, "
                                f"last_layers, dora, qlora, ia3, adapter)")
            if self.data.prompt_format == "template":
                problems.append(f"data.prompt_format template is for sft; task {self.task} uses auto, chat, "
                                f"alpaca or plain")
            if self.eval.metric not in (None, "loss", "accuracy"):
                problems.append(f"eval.metric {self.eval.metric} does not apply to task {self.task} (loss or "
                                f"accuracy: pairwise for reward, preference for dpo)")
        if self.task == "rl" and self.rl is not None:
            effective = self.train.batch_size * self.train.grad_accum
            if effective % self.rl.group_size:
                problems.append(f"train.batch_size × train.grad_accum ({effective}) must be a multiple of "
                                f"rl.group_size ({self.rl.group_size}): each step trains whole groups of completions")
        return problems

    @property
    def packing(self) -> bool:
        """train.packing, resolved: explicit, else on for causal_lm where the method allows it."""
        if self.train.packing is not None:
            return self.train.packing
        return self.task == "causal_lm" and self.method.name not in ("prefix", "prompt")

    @property
    def group_by_length(self) -> bool:
        """train.group_by_length, resolved: explicit, else on where the Trainer sees unpacked rows."""
        if self.train.group_by_length is not None:
            return self.train.group_by_length
        if self.task in ("sft", "causal_lm"):
            return not self.packing
        return self.task in ("classify", "seq2seq")

    @property
    def metric(self) -> str:
        """The metric in effect: `eval.metric` or the task's default."""
        if self.task in PREFERENCE:
            return self.eval.metric or ("accuracy" if self.task == "reward" else "loss")
        return self.eval.metric or ("loss" if self.task in GENERATIVE else "f1_macro")

    @property
    def lr(self) -> float | None:
        """The learning rate in effect: `train.lr` or the method's default."""
        return self.train.lr if self.train.lr is not None else METHODS[self.method.name].DEFAULT_LR

    def to_dict(self) -> dict:
        """The resolved config, without the data fields of other tasks."""
        out = self.model_dump(mode="json", exclude={"data": _ALL_TASK_FIELDS - TASK_FIELDS[self.task]})
        if self.task == "dpo" and out.get("dpo") is None:
            out["dpo"] = DPOSettings().model_dump(mode="json")
        for key in ("compare", "search", "dpo", "rl"):  # left out when absent, so they do not change the hash
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        body = yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(f"# resolved by tunelab {__version__}\ntunelab_version: {__version__}\n{body}")


# ---------------------------------------------------------------------------------------------------- loading

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key `{key}` appears twice (line {key_node.start_mark.line + 1})", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read, override and validate a config file; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), ["no such file" if not path.exists() else "not a file"])
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(str(path), [f"not UTF-8 text (byte {exc.start}, line {line}); a config is a YAML text "
                                      f"file"]) from None
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot be read ({exc.strerror})"]) from None
    if "\x00" in text:
        raise ConfigError(str(path), ["holds NUL bytes: it is a binary file, not a YAML config"])
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["the file must be a mapping of sections (model:, data:, method:, ...)"])
    raw.pop("tunelab_version", None)  # stamped into saved configs
    problems = []
    for item in overrides:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
    config = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems += [_describe(err) for err in exc.errors()]
    if problems:
        raise ConfigError(str(path), problems)
    return config


def apply_override(raw: dict, item: str) -> str | None:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw mapping; return a problem or None."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        return f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.lr=1e-4"
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node.get(part), str) and part == "method":  # `method: lora` shorthand
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return f"--set {key}: `{part}` is not a section"
    try:
        node[parts[-1]] = yaml.safe_load(value) if value else None
    except yaml.YAMLError as exc:
        why = str(getattr(exc, "problem", None) or exc).strip()
        return f"--set {item}: the value is not valid YAML ({why}); quote text, e.g. --set {key}='\"...\"'"
    return None


def _describe(err: dict) -> str:
    loc = _clean_loc(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        raw = err["loc"]
        tag = raw[raw.index("method") + 1] if "method" in raw[:-1] and raw[0] == "method" else None
        allowed = sorted(METHODS[tag].Options.model_fields if tag in METHODS else _fields_at(loc[:-1]))
        hint = _suggest(str(loc[-1]), allowed)
        suggestion = f"did you mean `{hint}`? " if hint else ""
        return f"`{where}`: unknown key; {suggestion}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"`{where}`: required key is missing"
    if kind == "union_tag_invalid":
        return f"`{where}.name`: unknown method {err['input'].get('name')!r}; choose one of: {', '.join(METHODS)}"
    if kind == "union_tag_not_found":
        return f"`{where}`: needs `name:` (one of: {', '.join(METHODS)})"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"`{where}`: {msg}{shown}"


# Names users bring from the HF Trainer, PEFT, Axolotl and LLaMA-Factory configs, mapped to tunelab's.
_SYNONYMS = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup", "warmup_steps": "warmup", "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "use_dora": "dora", "lora_target_modules": "target_modules", "output_dir": "dir", "model_name": "name",
    "model_name_or_path": "name", "base_model": "name", "metric_for_best_model": "metric",
}


def _suggest(key: str, allowed: list[str]) -> str | None:
    """The allowed key the user most likely meant, from spelling or from another tool's name for it."""
    close = difflib.get_close_matches(key, allowed + list(_SYNONYMS), n=1, cutoff=0.75)
    if close:
        guess = _SYNONYMS.get(close[0], close[0])
        return guess if guess in allowed else None
    return None


def _clean_loc(loc: tuple) -> tuple:
    """Drop pydantic's internal parts (union tags, type names) so the path reads like the YAML."""
    out, node = [], Config
    for part in loc:
        if isinstance(part, str) and out and out[-1] == "method" and part in METHODS:
            node = _method_class(part)
            continue
        if isinstance(part, str) and "[" in part:  # e.g. 'literal['epoch']' or 'int' branches
            continue
        if part in ("int", "float", "str", "bool"):
            continue
        out.append(part)
        node = _field_class(node, part)
    return tuple(out)


def _method_class(name: str):
    return METHODS[name].Options


def _field_class(node, part):
    """The section class at `part` under `node` (through `X | None` and `list[X]`), or None."""
    import typing

    if node is None or not (isinstance(node, type) and issubclass(node, BaseModel)):
        return None
    if isinstance(part, int):  # an item of a list of sections: `node` is already the item class
        return node
    field = node.model_fields.get(part)
    if field is None:
        return None
    todo = [field.annotation]
    while todo:
        ann = todo.pop()
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
        todo += list(typing.get_args(ann))
    return None


def _fields_at(loc: tuple) -> list[str]:
    node: Any = Config
    for i, part in enumerate(loc):
        if part == "method" and i == len(loc) - 1:
            return ["name"] + sorted({f for m in METHODS.values() for f in m.Options.model_fields} - {"name"})
        node = _field_class(node, part)
        if node is None:
            return []
    return list(node.model_fields)
