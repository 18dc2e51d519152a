"""`sft`: instruction and chat tuning of a causal LM. Rows → conversations (data/conversations.py) → token ids with
a loss mask.

Each conversation is one training example: a multi-turn chat is rendered once and every assistant turn is in the
loss (not one example per turn, which is quadratic in turns); a single-turn row is its prompt and response. tunelab
renders and tokenizes the examples itself — so `tunelab data preview` shows exactly what training sees — and hands
`input_ids` + `completion_mask` to TRL's SFTTrainer (tasks/sft_trainer.py), which pads, masks the labels and
computes the loss. Metrics: test loss/perplexity, chrF, BLEU, ROUGE-L and exact match of greedy generations, forgetting.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..data.conversations import Conversation, check_template, prompt_messages, render_prompt, resolve_prompt_format
from . import generative
from .generative import EncodedSplit

NAME = "sft"
PROMPTED = frozenset({"format", "prompt", "response", "messages", "conversations", "instruction", "prompt_format",
                      "template", "loss_on", "overflow", "bad_rows"})
DATA_FIELDS = PROMPTED | {"datasets", "replay"}
METRICS = ("loss",)
KIND, USE = "generator", "`tunelab generate`"
PEFT_TASK_TYPE = "CAUSAL_LM"
AUTO_HEAD = "causal-lm"  # the head it builds (checked to exist before any work)
CAUSAL_LM, SERVES, BASELINE = True, "generate", True
CHAT_PROMPTS = True  # it learns from conversations rendered with the chat template (benchmarks too)
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


def answer_spans(conv: Conversation, tokenizer) -> tuple[str, list[tuple[int, int]]] | None:
    """The whole chat rendered once, and the character span of each assistant answer in it (its end-of-turn
    tokens included). None when the chat template does not render each shorter conversation as a prefix of the
    longer one (some templates rewrite earlier turns), or the tokenizer cannot map tokens to characters."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    n = len(conv.turns)
    answered = [prompt_messages(conv, i) + [{"role": "assistant", "content": conv.turns[i]["response"]}]
                for i in range(n)]
    full = tokenizer.apply_chat_template(answered[-1], tokenize=False)
    spans = []
    for i in range(n):
        prompt = tokenizer.apply_chat_template(prompt_messages(conv, i), add_generation_prompt=True, tokenize=False)
        upto = tokenizer.apply_chat_template(answered[i], tokenize=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            return None
        spans.append((len(prompt), len(upto)))
    return full, spans


def encode_conversation(conv: Conversation, tokenizer, data, max_length: int) -> Encoded | None:
    """A multi-turn chat as one example with every assistant answer in the loss; None if dropped (longer than
    max_length with overflow: drop, or no answer starts within it). Raises LookupError when the template cannot
    be rendered incrementally (the caller falls back to one example per turn)."""
    rendered = answer_spans(conv, tokenizer)
    if rendered is None:
        raise LookupError("chat template not incremental")
    full, spans = rendered
    enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])

    def inside(offsets, lo, hi):
        return offsets[1] > offsets[0] and offsets[0] < hi and offsets[1] > lo

    mask = [int(any(inside(o, lo, hi) for lo, hi in spans)) for o in enc["offset_mapping"]]
    last = [t for t, o in zip(ids, enc["offset_mapping"]) if inside(o, *spans[-1])]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in last:
        ids, mask = ids + [tokenizer.eos_token_id], mask + [1]  # the model must learn to stop
    if data.loss_on == "all":
        mask = [1] * len(ids)
    if len(ids) <= max_length:
        return Encoded(ids, mask)
    if data.overflow == "drop" or not any(mask[:max_length]):
        return None
    return Encoded(ids[:max_length], mask[:max_length], truncated=True)


def encode_rows(conv: Conversation, tokenizer, data, max_length: int) -> list[Encoded | None]:
    """The training examples of one conversation: one, or one per assistant turn when its chat template cannot be
    rendered incrementally."""
    fmt = resolve_prompt_format(data, tokenizer)
    if fmt == "chat" and len(conv.turns) > 1:
        try:
            return [encode_conversation(conv, tokenizer, data, max_length)]
        except LookupError:
            pass
    return [encode_turn(conv, i, tokenizer, fmt, data, max_length) for i in range(len(conv.turns))]


def encode_conversations(convs: list[Conversation], tokenizer, data, max_length: int) -> EncodedSplit:
    """One row per conversation: input_ids and the completion mask (counted: cut or dropped at max_length)."""
    out = EncodedSplit([])
    for conv in convs:
        for enc in encode_rows(conv, tokenizer, conv.data or data, max_length):
            if enc is None:
                out.dropped += 1
                continue
            out.truncated += enc.truncated
            out.rows.append({"input_ids": enc.input_ids, "completion_mask": enc.completion_mask})
    return out


def preview(conv: Conversation, tokenizer, data, max_length: int, color: bool) -> str:
    """The training example(s) of a row as the model sees them, trained tokens marked (⟦…⟧ or green), special
    tokens named."""
    fmt = resolve_prompt_format(data, tokenizer)
    rows = encode_rows(conv, tokenizer, data, max_length)
    how = (f"one example, all {len(conv.turns)} answers trained" if len(rows) == 1 and len(conv.turns) > 1 else
           "one example per answer (the chat template does not render turns incrementally)" if len(rows) > 1 else
           "one example")
    parts = [f"prompt format: {fmt} · loss on: {data.loss_on} · {how}"]
    for i, enc in enumerate(rows):
        if enc is None:
            parts.append(f"\n--- example {i + 1}: dropped (longer than model.max_length={max_length})")
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
        parts.append(f"\n--- example {i + 1}: {len(enc.input_ids)} tokens, {sum(enc.completion_mask)} trained, "
                     f"EOS ({tokenizer.eos_token}) trained: {'yes' if eos else 'NO - the model will not learn to stop'}"
                     f"{', truncated' if enc.truncated else ''}\n" + "".join(text))
    return "\n".join(parts)

