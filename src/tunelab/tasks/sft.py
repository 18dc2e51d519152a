"""`sft`: instruction and chat tuning of a causal LM. Rows → conversations → token ids with a loss mask.

Every row becomes a conversation (optional system prompt, then user/assistant turns), whatever its layout:
`alpaca` (instruction, optional input, output), `prompt_response` (two columns, with an optional fixed
instruction), or `messages` (chat turns). Each assistant turn is one training example whose prompt is everything
before it. tunelab renders and tokenizes the examples itself — so `tunelab data preview` shows exactly what
training sees — and hands `input_ids` + `completion_mask` to TRL's SFTTrainer, which pads, masks the labels
and computes the loss.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field

import pandas as pd

from ..data.types import as_list, is_missing, kind, text_value
from ..errors import DataError

ALPACA = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
ROLES = ("system", "user", "assistant")


@dataclass
class Conversation:
    turns: list[dict]
    """[{"instruction": str, "input": str | None, "response": str}, ...] in order."""
    system: str | None = None
    row: dict = field(default_factory=dict)
    """The source row (for user templates)."""
    data: object = None
    """The data settings it was read with (multitask datasets each have their own prompt settings)."""


# ------------------------------------------------------------------------------------------------- rows

def detect_format(columns: list[str], data) -> str:
    if data.format != "auto":
        return data.format
    if data.messages in columns:
        return "messages"
    if {"instruction", "output"} <= set(columns):
        return "alpaca"
    if {data.prompt, data.response} <= set(columns):
        return "prompt_response"
    raise DataError(f"cannot tell the layout of the sft data from its columns ({', '.join(columns)}): expected "
                    f"`{data.messages}` (chat), `instruction` + `output` (alpaca), or `{data.prompt}` + "
                    f"`{data.response}`; set data.format and the column names")


def conversations(frame: pd.DataFrame, spec: str, data) -> tuple[list[Conversation | None], list[str]]:
    """One Conversation per row (None for a dropped bad row) and the problems found, by row.

    With data.bad_rows: error, any problem is a DataError naming the file and the first bad rows."""
    columns = [c for c in frame.columns if not c.startswith("_")]
    layout = detect_format(columns, data)
    needed = {"messages": [data.messages], "alpaca": ["instruction", "output"],
              "prompt_response": [data.prompt, data.response]}[layout]
    if data.prompt_format == "template":
        needed = _template_fields(data.template)
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{spec}: column {', '.join(f'`{c}`' for c in missing)} not found (data.format: {layout}); "
                        f"its columns are: {', '.join(columns)}")
    out, problems = [], []
    for record in frame.to_dict("records"):
        try:
            conv = _conversation(record, layout, data)
            conv.data = data
            out.append(conv)
        except ValueError as exc:
            out.append(None)
            problems.append(f"row {record['_row']}: {exc}")
    if problems and (data.bad_rows or "error") == "error":
        more = f" (and {len(problems) - 5} more rows)" if len(problems) > 5 else ""
        raise DataError(f"{spec}: " + "; ".join(problems[:5]) + more +
                        ". Fix the rows, or set data.bad_rows: drop to skip them (they are counted)")
    return out, problems


def _text(record: dict, column: str, required: bool = True, numbers_ok: bool = False) -> str | None:
    value = record.get(column)
    if is_missing(value) or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"`{column}` is missing or empty")
        return None
    return text_value(value, column, numbers_ok)


def _conversation(record: dict, layout: str, data) -> Conversation:
    n = data.numbers_as_text
    if data.prompt_format == "template":
        for name in _template_fields(data.template):  # every placeholder must be text
            if name != data.response:
                _text(record, name, required=False, numbers_ok=n)
        return Conversation([{"instruction": "", "input": None, "response": _text(record, data.response,
                                                                                 numbers_ok=n)}], row=record)
    if layout == "alpaca":
        return Conversation([{"instruction": _text(record, "instruction", numbers_ok=n),
                              "input": _text(record, "input", False, numbers_ok=n),
                              "response": _text(record, "output", numbers_ok=n)}], row=record)
    if layout == "prompt_response":
        prompt = _text(record, data.prompt, numbers_ok=n)
        turn = ({"instruction": data.instruction, "input": prompt} if data.instruction
                else {"instruction": prompt, "input": None})
        return Conversation([{**turn, "response": _text(record, data.response, numbers_ok=n)}], row=record)
    return _from_messages(record[data.messages], record)


def _from_messages(messages, record: dict) -> Conversation:
    messages = as_list(messages)
    if isinstance(messages, str):
        try:  # a CSV cell can only hold the list as JSON text
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError("`messages` is text, not a list of {role, content} messages (nor such a list written "
                             "as JSON)") from None
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if isinstance(messages, list) else kind(messages)
        raise ValueError(f"`messages` must be a non-empty list of {{role, content}} messages; it is {what}")
    system, turns, pending = None, [], None
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ROLES:
            raise ValueError(f"message {i + 1} has role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"message {i + 1} ({role}) has no content")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i + 1}: a system message may only come first")
            system = content
        elif role == "user":
            if pending is not None:
                raise ValueError(f"message {i + 1}: two user messages in a row")
            pending = content
        else:
            if pending is None:
                raise ValueError(f"message {i + 1}: an assistant message must answer a user message")
            turns.append({"instruction": pending, "input": None, "response": content})
            pending = None
    if not turns:
        raise ValueError("no assistant message to learn from")
    return Conversation(turns, system, record)


# ---------------------------------------------------------------------------------------------- rendering

def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_template(template: str, response: str) -> str | None:
    """A problem with a user template, or None: it must end with the response column's placeholder."""
    fields = _template_fields(template)
    if response not in fields:
        return f"data.template has no `{{{response}}}` placeholder for the response (data.response: {response})"
    if fields.count(response) > 1 or template.rstrip().endswith("{" + response + "}") is False:
        return f"data.template must end with `{{{response}}}`, once: the model learns what follows the prompt"
    return None


def identity_text(conv: Conversation) -> str:
    """The text that identifies an example (for duplicates and train/test leakage): its prompts and responses,
    or, for a user template, every column the template reads."""
    data = getattr(conv, "data", None)
    if data is not None and data.prompt_format == "template":
        return " ".join(str(conv.row.get(f, "")) for f in _template_fields(data.template))
    return " ".join(user_content(t) + " " + t["response"] for t in conv.turns)


def user_content(turn: dict) -> str:
    return turn["instruction"] if not turn["input"] else f"{turn['instruction']}\n\n{turn['input']}"


def prompt_messages(conv: Conversation, index: int) -> list[dict]:
    """Chat messages up to (and including) the user message that assistant turn `index` answers."""
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for turn in conv.turns[:index]:
        msgs += [{"role": "user", "content": user_content(turn)}, {"role": "assistant", "content": turn["response"]}]
    return msgs + [{"role": "user", "content": user_content(conv.turns[index])}]


def resolve_prompt_format(data, tokenizer) -> str:
    if data.prompt_format != "auto":
        return data.prompt_format
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def render_prompt(conv: Conversation, index: int, tokenizer, fmt: str, data) -> str:
    """The text the model sees before it must produce assistant turn `index` (also used for generation)."""
    if fmt == "chat":
        return tokenizer.apply_chat_template(prompt_messages(conv, index), add_generation_prompt=True, tokenize=False)
    if len(conv.turns) > 1:
        raise DataError(f"prompt_format {fmt} renders single-turn rows only; use prompt_format: chat for "
                        f"multi-turn conversations")
    if fmt == "plain":  # seq2seq: the instruction and input as they are (T5 style)
        return user_content(conv.turns[0])
    if fmt == "alpaca":
        turn = conv.turns[0]
        block = f"### Input:\n{turn['input']}\n\n" if turn["input"] else ""
        return ALPACA.format(with_input=", paired with an input that provides further context" if block else "",
                             instruction=turn["instruction"], input_block=block)
    head = data.template.rstrip()[: -len("{" + data.response + "}")]
    try:
        return head.format_map({k: v for k, v in conv.row.items() if not str(k).startswith("_")})
    except KeyError as exc:
        raise DataError(f"data.template uses {{{exc.args[0]}}}, which is not a column") from None


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


@dataclass
class EncodedSplit:
    rows: list[dict]
    truncated: int = 0
    dropped: int = 0


def encode(convs: list[Conversation], tokenizer, data, max_length: int) -> EncodedSplit:
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


def encode_text(texts: list[str], tokenizer, max_length: int, overflow: str, split_long: bool) -> EncodedSplit:
    """Raw text for causal LM training (task causal_lm, replay): every token trained, EOS appended.

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

