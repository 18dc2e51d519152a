"""What the generative tasks (sft, causal_lm, seq2seq) share: token rows, the trainer built from the task's model
and rows (TRL's SFTTrainer for decoder-only models; seq2seq brings its own), training, and evaluation of the saved
model — test loss, generation metrics, and forgetting measured by perplexity on general text.

Each generative task module provides `encode(config, frame, tokenizer) -> EncodedSplit` and may provide
`load_model(config, model_dir)` and `make_trainer(...)` where it differs from a causal LM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..attention import use_stacked_gqa
from ..errors import TunelabError
from ..methods import trait
from ..metrics import generation_metrics, perplexity
from ..precision import base_dtype, fp32_trainable
from ..trainer import callbacks, fit, load_kwargs, loads_best, per_second, prepare_method, training_args


@dataclass
class EncodedSplit:
    rows: list[dict]
    truncated: int = 0
    dropped: int = 0


def encode_text(texts: list[str], tokenizer, max_length: int, overflow: str, split_long: bool) -> EncodedSplit:
    """Raw text for causal LM training (task causal_lm, replay, forgetting): every token trained, EOS appended.

    A document longer than max_length is cut into max_length pieces when `split_long` (packing: nothing is
    lost), else truncated or dropped by `overflow` (counted)."""
    out = EncodedSplit([])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not eos or ids[-1:] != eos:
            ids = ids + eos
        pieces = [ids]
        if len(ids) > max_length:
            if split_long:
                pieces = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
            elif overflow == "drop":
                out.dropped += 1
                continue
            else:
                out.truncated += 1
                pieces = [ids[:max_length]]
        out.rows += [{"input_ids": p, "completion_mask": [1] * len(p)} for p in pieces if len(p) > 1]
    return out


def _encode_train_validation(task, config, splits, tokenizer) -> dict:
    """Token rows of train and validation, plus replay text mixed into train."""
    data = config.data
    # the test split is encoded by test_metrics, on the saved model, after training
    out = {name: task.encode(config, getattr(splits, name), tokenizer)
           for name in ("train", "validation") if len(getattr(splits, name))}
    if splits.replay is not None and "train" in out:
        replay = encode_text(list(splits.replay[data.replay.text]), tokenizer, config.model.max_length,
                             data.overflow, split_long=False)
        print(f"tunelab: replay: {len(replay.rows)} general-text example(s) mixed into "
              f"{len(out['train'].rows)} instruction example(s)")
        out["train"].rows += replay.rows
    return out


def load_causal_lm(config, model_dir: str):
    """Tokenizer, decoder-only model (its base in bf16 for frozen-base methods with bf16 on), no new modules."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = base_dtype(config, trait(config.method.name, "FROZEN_BASE"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{"dtype": dtype, **load_kwargs(config)})
    use_stacked_gqa(model)
    return tokenizer, model, []


def sft_trainer(config, run, model, tokenizer, sets: dict, extra_callbacks=()):
    """TRL's SFTTrainer (tunelab's subclass, tasks/sft_trainer.py) on rows of input_ids + completion_mask."""
    from trl import SFTConfig

    from .sft_trainer import PackedRows, SFTTrainer

    val_ds = sets.get("validation")
    # packing: TRL's best-fit-decreasing packs whole examples into max_length rows; PackedRows feeds them row by
    # row with position ids restarting per example; transformers then builds a block-diagonal mask from the
    # position ids (tests/unit/test_packing.py checks the logits)
    args = training_args(config, run, has_validation=val_ds is not None, cls=SFTConfig,
                         max_length=config.model.max_length, completion_only_loss=True, packing=config.packing,
                         packing_strategy="bfd")
    trainer = SFTTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=val_ds,
                         processing_class=tokenizer,
                         callbacks=callbacks(config, run, val_ds is not None) + list(extra_callbacks))
    if config.packing:  # TRL refuses a custom collator with packing, so it is swapped in after
        trainer.data_collator = PackedRows(tokenizer.pad_token_id)
    return trainer


def build_trainer(task, config, splits, model_dir: str, run, extra_callbacks=()):
    """The configured model, method and trainer of a generative `task`, with the encoded splits; `fit` runs it.
    Returns (trainer, tokenizer, params, encoded, datasets) — exposed so tests can inspect what training sees."""
    import datasets
    from transformers import set_seed

    set_seed(config.train.seed)  # before the model exists (adapter matrices / new modules are drawn at creation)
    tokenizer, model, new_modules = getattr(task, "load_model", load_causal_lm)(config, model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, params = prepare_method(config, model, new_modules, model_dir, task.PEFT_TASK_TYPE)
    fp32_trainable(model)
    encoded = _encode_train_validation(task, config, splits, tokenizer)
    max_length = config.model.max_length
    for name, e in encoded.items():
        if e.truncated or e.dropped:
            print(f"tunelab: {name}: {e.truncated} example(s) cut and {e.dropped} dropped at "
                  f"model.max_length={max_length} (data.overflow: {config.data.overflow})")
    if splits.stream is not None:  # data.streaming: read, checked and tokenized as the Trainer asks for rows
        encoded["train"] = EncodedSplit([])
    elif "train" not in encoded or not encoded["train"].rows:
        raise TunelabError(f"no training example fits in model.max_length={max_length}")
    sets = {name: datasets.Dataset.from_list(e.rows) for name, e in encoded.items() if e.rows}
    if splits.stream is not None:
        sets["train"] = _streamed_rows(config, splits.stream, tokenizer, encoded["train"])
    trainer = getattr(task, "make_trainer", sft_trainer)(config, run, model, tokenizer, sets, extra_callbacks)
    if task.PACKING:  # train.compile (the decision needs the packed row count the trainer made)
        from .. import compiling
        from .sft_trainer import PackedRows

        packed = isinstance(trainer.data_collator, PackedRows)
        # unpacked batches are as wide as their longest example: a new shape nearly every step
        varies = None if packed else "without train.packing, batches change shape and every block would recompile"
        if compiling.apply(trainer, config.train.compile, varies)["on"] and packed:
            # one shape: no recompile for a shorter row or an epoch's short last batch
            trainer.data_collator.fixed(config.model.max_length, trainer.args.per_device_train_batch_size)
    return trainer, tokenizer, params, encoded, sets


def _streamed_rows(config, stream, tokenizer, counts: EncodedSplit):
    """An IterableDataset of token rows encoded one document at a time from `stream` (a data.stream.TextStream);
    documents cut or dropped at model.max_length are counted in `counts` as they go by."""
    import datasets

    def rows():
        for text in stream.texts():
            e = encode_text([text], tokenizer, config.model.max_length, config.data.overflow,
                            split_long=config.packing)
            counts.truncated += e.truncated
            counts.dropped += e.dropped
            yield from e.rows

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                                  "completion_mask": datasets.List(datasets.Value("int8"))})
    return datasets.IterableDataset.from_generator(rows, features=features)


def fit_generative(task, ctx) -> tuple[dict, dict]:
    config = ctx.config
    trainer, tokenizer, params, encoded, sets = build_trainer(task, config, ctx.splits, ctx.model_dir, ctx.run,
                                                              ctx.callbacks)
    stats = fit(trainer, config, ctx.run, ctx.resume, tokenizer)
    if getattr(trainer, "compile_decision", None):
        stats["compile"] = trainer.compile_decision

    def tokens(rows):  # real tokens, not padding: prompt + response (+ decoder targets for seq2seq)
        return sum(len(r["input_ids"]) + len(r.get("labels", ())) for r in rows)

    seen = trainer.state.num_input_tokens_seen  # counted by the Trainer, batch by batch, padding left out
    stats["tokens_per_s"] = per_second(seen or tokens(encoded["train"].rows) * (stats["epochs"] or 1), stats)
    stats["encoded"] = {name: {"examples": len(e.rows), "truncated": e.truncated, "dropped": e.dropped}
                        for name, e in encoded.items()}
    if ctx.splits.stream is not None:  # documents read from the stream (every pass), and those skipped as leaks
        c = ctx.splits.stream.counts
        stats["encoded"]["train"] = {**stats["encoded"]["train"], "examples": c["read"] - c["leaked"],
                                     "streamed": True, "leaked_skipped": c["leaked"]}
        if c["leaked"]:
            print(f"tunelab: leakage: skipped {c['leaked']} streamed train document(s) whose text is also in "
                  f"validation/test (data.streaming)")
    # the Trainer evaluated every checkpoint and (usually) restored the best: its loss is the best metric
    if "validation" in sets:
        last_eval = next((r["eval_loss"] for r in reversed(trainer.state.log_history) if "eval_loss" in r), None)
        stats["validation_loss"] = trainer.state.best_metric if loads_best(config) else last_eval
    else:
        stats["validation_loss"] = None
    return params, stats


def inference_dtype(task, config, full_precision: bool = False):
    """The dtype a finished run's base is loaded in to evaluate, generate and serve: the one training loaded it in
    (`base_dtype`: bf16 for a frozen base with bf16 on, run under bf16 autocast as in training), so a run's test
    metrics are what `generate`/`serve` give; fp32 for `full_precision` (merge and export fold weights in fp32),
    for fp32 runs and for tasks that build their own model (seq2seq)."""
    import torch

    if full_precision or hasattr(task, "load_model"):
        return torch.float32
    return base_dtype(config, trait(config.method.name, "FROZEN_BASE"))


def evaluate_generative(task, ctx, stats: dict) -> dict:
    """Validation loss (the Trainer's, in training precision); test loss/perplexity and generation metrics of the
    saved model reloaded as `generate` loads it (`inference_dtype`; overall and per dataset of a multitask mix),
    its test answers written by the engine `generate.engine` picks — the numbers `tunelab eval --base` computes for
    the untrained model. Forgetting is measured first: the engine may merge the adapter it switches off."""
    from .generate import Generator

    config, splits = ctx.config, ctx.splits
    metrics = {}
    loss = stats.pop("validation_loss", None)
    if loss is not None:
        metrics["validation"] = perplexity(loss)
    generator = Generator.from_saved(ctx.run.path, config, inference_dtype(task, config))
    forgot = None
    if config.eval.forgetting and task.CAUSAL_LM:  # perplexity of a decoder-only model
        forgot = {"data": config.eval.forgetting, "ratio": 1.0,
                  "skipped": "nothing was trained: the model is the base model"} \
            if generator.demonstrations is not None else forgetting(config, generator)
    if len(splits.test):
        metrics["test"], rows = test_metrics(task, config, splits.test, generator, ctx.run.path, ctx.choose)
        metrics["test"]["precision"] = generator.precision
        if rows is not None:
            names = list(rows.pop("_task"))
            if len(set(names)) > 1:
                rows.insert(0, "task", names)
                metrics["test_by_task"] = {t: generation_metrics(list(g["reference"]), list(g["generated"]))
                                           for t, g in rows.groupby("task", sort=False)}
            rows.to_json(ctx.run.path / "predictions_test.jsonl", orient="records", lines=True, force_ascii=False)
    if forgot is not None:
        metrics["forgetting"] = forgot
    return metrics


def test_metrics(task, config, test, generator, path=None, choose=None):
    """Loss/perplexity on every test example, and generation metrics (not for raw text) on up to
    eval.max_generate of them — an equal share per dataset of a multitask mix, written by the engine `choose`
    (generation.choose, passed in from above) picks for `generate.engine` and the run at `path` (None: the base
    model); without `choose`, the model's own HF generate. Returns (metrics, rows or None)."""
    # the test loss of in-context learning would need each prompt's demonstrations: not measured
    metrics = {} if generator.demonstrations is not None else \
        perplexity(generator.loss(task.encode(config, test, generator.tokenizer).rows))
    if "_conv" not in test:  # raw text: nothing to answer
        return metrics, None
    limit = config.eval.max_generate
    if limit is not None:
        test = test.groupby("_task", sort=False).head(-(-limit // test["_task"].nunique()))
    open_engine = None if choose is None else (
        lambda gen, n, tokens, answers: choose(config.generate.engine, gen, None if path is None else Path(path), n,
                                               tokens, answers=answers))
    scores, rows = generator.evaluate(list(test["_conv"]), config.eval.max_new_tokens, open_engine)
    rows["_task"] = list(test["_task"])
    return {**metrics, **scores}, rows


def forgetting(config, tuned, base=None) -> dict:
    """Perplexity of the base and the fine-tuned model on general text (eval.forgetting); ratio > 1 means the
    model got worse at plain language. Skipped (with the reason) when that text is part of the training data.

    `base`: the untrained model's Generator; without it, a PEFT run measures the base with its adapter switched
    off (the same weights: no second model in memory) and any other run loads the base."""
    from ..data import text_table

    spec = config.eval.forgetting
    trained_on = {config.data.train} | {d.train for d in config.data.datasets or []}
    if config.data.replay is not None:
        trained_on.add(config.data.replay.train)
    if spec in trained_on:
        return {"data": spec, "skipped": "this text is part of the training data"}
    frame = text_table(spec, "text")
    frame = frame.sample(n=min(len(frame), config.eval.forgetting_max), random_state=config.data.split.seed)
    rows = encode_text(list(frame["text"]), tuned.tokenizer, config.model.max_length, "truncate",
                       split_long=False).rows
    after, before = tuned.loss(rows), None
    if base is None:
        with tuned.adapter_disabled() as switched_off:
            before = switched_off.loss(rows) if switched_off is not None else None
    if before is None:
        from .generate import Generator

        before = (base or Generator.base(config, tuned.dtype)).loss(rows)
    return {"data": spec, "documents": len(frame), "base_perplexity": perplexity(before)["perplexity"],
            "perplexity": perplexity(after)["perplexity"], "ratio": math.exp(min(after - before, 50))}


def evaluate_file(task, path, config, spec: str, *, choose=None, **_) -> dict:
    """`tunelab eval` of a generative run: loss/perplexity (and generation metrics, except for raw text) on a file
    read with the run's data settings — e.g. general text, to measure what fine-tuning made the model forget."""
    from .generate import Generator

    return test_metrics(task, config, task.eval_table(spec, config),
                        Generator.from_saved(path, config, inference_dtype(task, config)), path, choose)[0]


def evaluate_base(task, config, choose=None) -> dict:
    """Test metrics of the config's untrained model, computed as a finished run's are (the zero-shot baseline)."""
    from .generate import Generator

    test = task.load_splits(config).test
    if not len(test):
        raise TunelabError("the config has no test split to evaluate on")
    return test_metrics(task, config, test, Generator.base(config, inference_dtype(task, config)), None, choose)[0]


def token_lengths(task, config, frame, tokenizer):
    """Tokens per example as the model sees it — the same rendering training uses, with room for any length (nothing
    cut), so the lengths are the real ones (data check). Prompt + response, and a seq2seq example's targets."""
    import numpy as np

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    wide = config.model_copy(update={"model": config.model.model_copy(update={"max_length": 10 ** 6})})
    rows = task.encode(wide, frame, tokenizer).rows
    return np.array([len(r["input_ids"]) + len(r.get("labels", ())) for r in rows])


def load(task, path, config, full_precision: bool = False):
    from .generate import Generator

    # the dtype is worked out when the model loads (it imports torch, which llama.cpp's path never needs)
    return Generator.from_saved(path, config, lambda: inference_dtype(task, config, full_precision))


def protocol(task) -> tuple:
    """The Task protocol's functions of a generative task module, which differ only by the module's `encode`,
    `eval_table`, `load_splits` and traits: (build_trainer, fit, evaluate, load, evaluate_file, evaluate_base,
    report, token_lengths)."""
    from functools import partial

    return (partial(build_trainer, task), partial(fit_generative, task), partial(evaluate_generative, task),
            partial(load, task), partial(evaluate_file, task), partial(evaluate_base, task), report,
            partial(token_lengths, task))


def report(metrics: dict) -> list[str]:
    """Console lines: loss, perplexity and generation metrics per split; forgetting."""
    names = {"loss": "loss", "perplexity": "perplexity", "chrf": "chrF", "bleu": "BLEU", "rouge_l": "ROUGE-L",
             "exact_match": "exact match"}
    lines = []
    for split in ("validation", "test"):
        if split in metrics:
            m = metrics[split]
            shown = " · ".join(f"{label} {m[key]:.4f}" for key, label in names.items() if key in m)
            count = f" ({m['examples']} examples)" if "examples" in m else ""
            lines.append(f"{split:>10}: {shown}{count}")
    return lines + forgetting_lines(metrics.get("forgetting"))


def forgetting_lines(f: dict | None) -> list[str]:
    if f and "skipped" in f:
        return [f"forgetting: not measured on {f['data']}: {f['skipped']}"]
    if f and "ratio" in f:
        return [f"forgetting: perplexity on general text ({f['data']}, {f['documents']} documents) "
                f"{f['base_perplexity']:.2f} before → {f['perplexity']:.2f} after (×{f['ratio']:.3f})"]
    return []
