"""`seq2seq`: instruction data on an encoder-decoder model (T5 style): the prompt goes into the encoder, the
response is the decoder's target.

Any `AutoModelForSeq2SeqLM` checkpoint (t5-small, flan-t5, bart) loads as it is. An encoder-only checkpoint
(BERT, minilm) becomes a bert2bert `EncoderDecoderModel` — the same weights as encoder and as decoder, with new
(untrained) cross-attention — so the path can be exercised with the packaged `minilm`.
Prompts use the `plain` format by default (the instruction, then the input), or `alpaca` / `template`.
"""
from __future__ import annotations

import sys

from ..data.conversations import render_prompt, resolve_prompt_format
from . import generative, sft
from .generative import EncodedSplit

NAME = "seq2seq"
DATA_FIELDS = sft.DATA_FIELDS - {"loss_on", "replay"}
METRICS = ("loss",)
KIND, USE = "generator", "`tunelab generate`"
PEFT_TASK_TYPE = "SEQ_2_SEQ_LM"
SERVES, BASELINE = None, True
GROUP_BY_LENGTH = True


def check(config) -> list[str]:
    problems = [] if config.data.prompt_format != "chat" else \
        ["data.prompt_format chat does not apply to task seq2seq (no chat template); use auto (plain), alpaca or "
         "template"]
    return problems + sft.check(config)


load_splits, eval_table = sft.load_splits, sft.eval_table


def load_model(config, model_dir: str):
    """For training: tokenizer, model, and the modules the checkpoint did not contain (trained by every method)."""
    from ..models.encoder_decoder import build_model
    from ..trainer import load_kwargs

    return build_model(model_dir, **load_kwargs(config))


def make_trainer(config, run, model, tokenizer, sets: dict, extra_callbacks=()):
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from ..trainer import callbacks, training_args

    val_ds = sets.get("validation")
    args = training_args(config, run, has_validation=val_ds is not None, cls=Seq2SeqTrainingArguments)
    return Seq2SeqTrainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=val_ds,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
                          callbacks=callbacks(config, run, val_ds is not None) + list(extra_callbacks))


def encode(config, frame, tokenizer) -> EncodedSplit:
    return encode_conversations(list(frame["_conv"]), tokenizer, config.data, config.model.max_length)


build_trainer, fit, evaluate, load, evaluate_file, evaluate_base, report, token_lengths = \
    generative.protocol(sys.modules[__name__])


def encode_conversations(convs: list, tokenizer, data, max_length: int) -> EncodedSplit:
    """Rows of encoder `input_ids` and decoder `labels` (the response, ending with the end token)."""
    out = EncodedSplit([])
    for conv in convs:
        conv_data = conv.data or data
        fmt = resolve_prompt_format(conv_data, tokenizer, encoder_decoder=True)
        for i in range(len(conv.turns)):
            source = render_prompt(conv, i, tokenizer, fmt, conv_data)
            ids = tokenizer(source, add_special_tokens=True)["input_ids"]
            labels = tokenizer(text_target=conv.turns[i]["response"], add_special_tokens=True)["input_ids"]
            if tokenizer.cls_token_id is not None and labels[:1] == [tokenizer.cls_token_id]:
                labels = labels[1:]  # BERT's [CLS] is the decoder start token, fed in, not predicted
            if len(ids) > max_length or len(labels) > max_length:
                if conv_data.overflow == "drop":
                    out.dropped += 1
                    continue
                out.truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            out.rows.append({"input_ids": ids, "labels": labels})
    return out
