"""`sft`: instruction and chat tuning of a causal LM. Rows → conversations (data/conversations.py) → token ids with
a loss mask.

Each assistant turn is one training example whose prompt is everything before it. tunelab renders and tokenizes
the examples itself — so `tunelab data preview` shows exactly what training sees — and hands `input_ids` +
`completion_mask` to TRL's SFTTrainer (tasks/sft_trainer.py), which pads, masks the labels and computes the loss.
Metrics: test loss/perplexity, chrF, BLEU, ROUGE-L and exact match of greedy generations, forgetting.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..data.conversations import Conversation, check_template, prompt_messages, render_prompt, resolve_prompt_format
from . import generative
from .generative import EncodedSplit

NAME = "sft"
PROMPTED = frozenset({"format", "prompt", "response", "messages", "instruction", "prompt_format", "template",
                      "loss_on", "overflow", "bad_rows"})
DATA_FIELDS = PROMPTED | {"datasets", "replay"}
METRICS = ("loss",)
KIND, USE = "generator", "`tunelab generate`"
PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_HEAD = "causal-lm"  # the head it builds (checked to exist before any work)
CAUSAL_LM, SERVES, BASELINE = True, "generate", True
PACKING = True  # packing (and train.compile) apply; off by default: batch_size would count packed rows
GROUP_BY_LENGTH = True


def check(config) -> list[str]:
    """Every user template must end with its response placeholder."""
    problems = []
    for source in [config.data] + list(config.data.datasets or []):
        fmt = source.prompt_format or config.data.prompt_format
        if fmt == "template":
            problem = check_template(source.template or config.data.template or "",
                                     source.response or config.data.response)
            if problem:
                problems.append(problem)
    return problems


def load_splits(config):
    from ..data import conversation_splits

    return conversation_splits(config)


def eval_table(spec: str, config):
    """An extra evaluation file (`tunelab eval`), read with the run's data settings."""
    from ..data import conversation_table

    return conversation_table(spec, config.data).assign(_task="")


def encode(config, frame, tokenizer) -> EncodedSplit:
    return encode_conversations(list(frame["_conv"]), tokenizer, config.data, config.model.max_length)


build_trainer, fit, evaluate, load, evaluate_file, evaluate_base, report, token_lengths = \
    generative.protocol(sys.modules[__name__])


# --------------------------------------------------------------------------------------------- tokenizing

@dataclass
class Encoded:
    input_ids: list[int]
    completion_mask: list[int]
    truncated: bool = False


def encode_turn(conv: Conversation, index: int, tokenizer, fmt: str, data, max_length: int) -> Encoded | None:
    """Token ids of prompt + response (+ EOS) and a mask of the tokens the loss is taken on; None if dropped."""
    prompt = render_prompt(conv, index, tokenizer, fmt, data)
    response = conv.turns[index]["response"]
    if fmt == "chat":
        msgs = prompt_messages(conv, index) + [{"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
    else:
        full = prompt + response
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = tokenizer(full, add_special_tokens=True)["input_ids"]
    # where prompt and prompt+response stop agreeing (a token may merge across the boundary)
    start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids[start:]:
        ids = ids + [tokenizer.eos_token_id]  # the model must learn to stop
    mask = [1] * len(ids) if data.loss_on == "all" else [0] * start + [1] * (len(ids) - start)
    if len(ids) <= max_length:
        return Encoded(ids, mask)
    if data.overflow == "drop" or start >= max_length:
        return None
    return Encoded(ids[:max_length], mask[:max_length], truncated=True)


def encode_conversations(convs: list[Conversation], tokenizer, data, max_length: int) -> EncodedSplit:
    """One row per assistant turn: input_ids and the completion mask (counted: cut or dropped at max_length)."""
    out = EncodedSplit([])
    for conv in convs:
        conv_data = conv.data or data
        fmt = resolve_prompt_format(conv_data, tokenizer)
        for i in range(len(conv.turns)):
            enc = encode_turn(conv, i, tokenizer, fmt, conv_data, max_length)
            if enc is None:
                out.dropped += 1
                continue
            out.truncated += enc.truncated
            out.rows.append({"input_ids": enc.input_ids, "completion_mask": enc.completion_mask})
    return out


def preview(conv: Conversation, tokenizer, data, max_length: int, color: bool) -> str:
    """One example as the model sees it, trained tokens marked (⟦…⟧ or green), special tokens named."""
    fmt = resolve_prompt_format(data, tokenizer)
    parts = [f"prompt format: {fmt} · loss on: {data.loss_on}"]
    for i in range(len(conv.turns)):
        enc = encode_turn(conv, i, tokenizer, fmt, data, max_length)
        if enc is None:
            parts.append(f"\n--- turn {i + 1}: dropped (longer than model.max_length={max_length})")
            continue
        text, trained = [], None
        for tok, m in zip(enc.input_ids, enc.completion_mask):
            if m != trained:
                if trained:
                    text.append("\033[0m" if color else "⟧")
                if m:
                    text.append("\033[1;32m" if color else "⟦")
                trained = m
            text.append(tokenizer.decode([tok]))
        if trained:
            text.append("\033[0m" if color else "⟧")
        eos = any(t == tokenizer.eos_token_id and m for t, m in zip(enc.input_ids, enc.completion_mask))
        parts.append(f"\n--- turn {i + 1}: {len(enc.input_ids)} tokens, {sum(enc.completion_mask)} trained, "
                     f"EOS ({tokenizer.eos_token}) trained: {'yes' if eos else 'NO - the model will not learn to stop'}"
                     f"{', truncated' if enc.truncated else ''}\n" + "".join(text))
    return "\n".join(parts)

