"""The sections of a run config (`model:`, `data:`, `train:`, `eval:`, `generate:`, `output:`, `compare:`,
`search:`), each a strict, frozen pydantic model with one docstring per field. The `method:` section belongs to
each method module and `dpo:` / `rl:` to their task modules."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..methods import METHODS
from ..schema import Section

METRICS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "loss")


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
    format: Literal["auto", "alpaca", "prompt_response", "messages", "sharegpt"] | None = None
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None
    conversations: str | None = None
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
    """Training data: a .jsonl/.json/.csv/.parquet file, a `datasets` folder, `sample:NAME` (shipped data), or
    `hub:ORG/NAME[:SPLIT]` (a Hugging Face Hub dataset through `datasets.load_dataset`; split default train).
    (task sft may list several in `datasets` instead.)"""
    config: str | None = None
    """hub: data: the dataset's configuration (subset) name, for every hub: file of this section."""
    revision: str | None = None
    """hub: data: the dataset's revision (branch, tag or commit) — pin it so a rerun reads the same rows."""
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
    streaming: bool = False
    """Read data.train as a stream (`datasets` streaming): rows are read, type-checked and tokenized while training
    consumes them, so a corpus larger than memory trains (task causal_lm). Needs train.max_steps (a stream has no
    known length) and data.validation / data.test files (a stream is not split); train rows whose text is in
    validation or test are skipped as they stream by, and counted. A Hub dataset streams from the Hub, or from the
    local datasets cache offline."""
    # --- task: sft
    format: Literal["auto", "alpaca", "prompt_response", "messages", "sharegpt"] = "auto"
    """sft row layout: `alpaca` (instruction, optional input, output), `prompt_response` (`prompt` and
    `response` columns), `messages` (chat turns: [{role: system|user|assistant, content}]), `sharegpt` (chat turns
    as ShareGPT writes them: [{from: system|human|gpt, value}]); `auto` detects it from the columns."""
    prompt: str = "prompt"
    """sft: column holding the prompt (prompt_response layout). reward, dpo, rl: column holding the prompt — a
    string, or chat messages ([{role, content}, ...] ending with a user message)."""
    response: str = "response"
    """sft: column holding the response (prompt_response layout, and user templates)."""
    messages: str = "messages"
    """sft: column holding the chat turns (messages layout)."""
    conversations: str = "conversations"
    """sft: column holding the ShareGPT chat turns (sharegpt layout)."""
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

    @model_validator(mode="after")
    def _hub_options_in_specs(self):
        """data.config / data.revision travel inside each hub: spec (`hub:ORG/NAME:split?config=..&revision=..`),
        so every reader of the spec sees them."""
        from urllib.parse import urlencode

        extra = {k: v for k, v in (("config", self.config), ("revision", self.revision)) if v}
        specs = [f for f in ("train", "validation", "test") if (getattr(self, f) or "").startswith("hub:")]
        if extra and not specs:
            raise ValueError("data.config and data.revision apply to hub: data (data.train: hub:ORG/NAME)")
        for f in specs:
            spec = getattr(self, f)
            if extra and "?" not in spec:
                object.__setattr__(self, f, f"{spec}?{urlencode(extra)}")
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
    compile: bool | Literal["auto"] = "auto"
    """sft, causal_lm: torch.compile each transformer block for training (regional compilation; validation passes
    run uncompiled). `auto`: on when Inductor can run here (Linux CPU with a C++ compiler, or CUDA with Triton), the
    batches have one shape (train.packing: unpacked batches are as wide as their longest example, and every new
    shape recompiles), the adapters have no dropout (compiled dropout measured slower) and the run has enough
    optimizer steps to pay back the compile time (tunelab/compiling.py: the break-even measured by
    bench/compile.py); the decision and its reason are in metrics.json (`train.compile`)."""
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
    benchmarks: list[str] = Field(default_factory=list)
    """Causal-LM tasks: lm-eval-harness tasks — harness names, task YAML files or folders, or tunelab's own
    (tunelab_sentiment, tunelab_translate_de) — scored after training on the run and on its base model, each metric
    compared per document with its interval (docs/benchmarks.md); a `tunelab compare` of the config reports them
    per entry. Needs lm-eval (`tunelab[benchmarks]`)."""
    benchmark_limit: int | None = Field(None, ge=1)
    """eval.benchmarks: score at most this many documents of each task (null: all)."""
    earlier_task: EarlierTask | None = None
    """classify: forgetting of an earlier task — a logistic-regression probe on the encoder's mean-pooled features
    is fitted and scored on this data with the base encoder and with the fine-tuned one; the accuracy drop is
    reported. E.g. {data: sample:sentiment_uci, label: source} asks whether the encoder still tells the review
    sites apart after sentiment training."""


class GenerateConfig(Section):
    engine: Literal["auto", "torch", "llamacpp", "vllm"] = "auto"  # generation.CHOICES (a test keeps them equal)
    """What writes text for this run: its test answers (the evaluation after training, `tunelab eval`, each entry
    of `tunelab compare`, whose cost per 1,000 requests is then this engine's) and `tunelab generate` (its
    `--engine` overrides this). `auto`: the fastest installed engine for the job whose parity with the trained model
    is on record (docs/ship.md), and it says which and why; `torch`; `llamacpp` (the run's GGUF export, made on first
    use); `vllm` (vLLM in its own environment, $TUNELAB_VLLM_PYTHON)."""


class OutputConfig(Section):
    dir: str | None = None
    """Run directory; default `runs/<config file name>`."""
    keep_checkpoints: bool = False
    """Keep the intermediate Trainer checkpoints after a successful run (they are needed only for --resume)."""


ICL_ENTRIES = ("base", "icl_0", "icl_k", "icl_retrieved")


class CompareConfig(Section):
    """`tunelab compare`: the approaches to run on the same data, split and seed, side by side in one report."""
    methods: list[str] = Field(default_factory=lambda: ["features", "head", "last_layers", "full", "lora"],
                               min_length=1)
    """Method names, plus the no-training baselines: `base` or `icl_0` (the model prompted zero-shot), `icl_k` (k
    random training examples as demonstrations in the prompt) and `icl_retrieved` (the k nearest training examples
    by embedding similarity)."""
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
    seeds: list[int] | None = Field(None, min_length=1)
    """Train every entry once per seed (train.seed; for icl_k the draw of random demonstrations): the report shows
    the mean ± standard deviation over seeds, and the intervals use every seed's predictions. Entries with nothing
    random (base, icl_0, icl_retrieved) run once. Default: one run with train.seed."""
    fractions: list[float] | None = Field(None, min_length=1)
    """Learning curves: also train every entry on these fractions of the training split (nested and stratified
    subsets: each smaller one inside the larger; validation and test unchanged), e.g. [0.1, 0.25, 0.5, 1.0]. The
    report plots the metric against the number of labelled examples and says where the curves cross."""

    @model_validator(mode="after")
    def _entries(self):
        problems = []
        if self.fractions is not None and not all(0 < f <= 1 for f in self.fractions):
            problems.append("fractions must lie in (0, 1]")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            problems.append("a seed is listed twice")
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
