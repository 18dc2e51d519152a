"""Conversations: the row layout every instruction-tuning row becomes (an optional system prompt, then user /
assistant turns), read from `alpaca` (instruction, optional input, output), `prompt_response` (two columns, with
an optional fixed instruction), `messages` (chat turns: {role, content}) or `sharegpt` (chat turns as ShareGPT
writes them: `conversations: [{from: system|human|gpt, value}]`, the layout LLaMA-Factory and Axolotl read) rows —
and rendered into the text a model sees: its own chat template, the Alpaca text, `plain` (T5 style) or a user
template. Training (tasks/sft.py, seq2seq.py), generation and serving all render prompts here, so what a model sees
is the same everywhere.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field

from ..errors import DataError
from .types import as_list, is_missing, kind, text_value

ALPACA = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
ROLES = ("system", "user", "assistant")
SHAREGPT = {"system": "system", "human": "user", "gpt": "assistant"}
"""ShareGPT's `from` values and the roles they are (LLaMA-Factory's sharegpt tags, Axolotl's sharegpt type)."""


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
    if data.conversations in columns:
        return "sharegpt"
    if {"instruction", "output"} <= set(columns):
        return "alpaca"
    if {data.prompt, data.response} <= set(columns):
        return "prompt_response"
    raise DataError(f"cannot tell the layout of the sft data from its columns ({', '.join(columns)}): expected "
                    f"`{data.messages}` (chat), `{data.conversations}` (ShareGPT chat), `instruction` + `output` "
                    f"(alpaca), or `{data.prompt}` + "
                    f"`{data.response}`; set data.format and the column names")


def conversations(frame, spec: str, data) -> tuple[list[Conversation | None], list[str]]:
    """One Conversation per row (None for a dropped bad row) and the problems found, by row.

    With data.bad_rows: error, any problem is a DataError naming the file and the first bad rows."""
    columns = [c for c in frame.columns if not c.startswith("_")]
    layout = detect_format(columns, data)
    needed = {"messages": [data.messages], "sharegpt": [data.conversations], "alpaca": ["instruction", "output"],
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
    if layout == "sharegpt":
        return from_messages(from_sharegpt(record[data.conversations], data.conversations), record)
    return from_messages(record[data.messages], record)


def _listed(messages, what: str, items: str):
    """A column's list of turns: a list (or array), or a CSV cell holding it as JSON text; `items`: what a turn
    is, for the messages."""
    messages = as_list(messages)
    if isinstance(messages, str):
        try:  # a CSV cell can only hold the list as JSON text
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError(f"{what} is text, not a list of {items} (nor such a list written as JSON)") from None
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else kind(messages)
        raise ValueError(f"{what} must be a non-empty list of {items}; it is {got}")
    return messages


def from_sharegpt(turns, column: str = "conversations") -> list[dict]:
    """ShareGPT turns ({from, value}) as {role, content} messages: system, human → user, gpt → assistant; any other
    `from` (a tool call, an observation, a typo) is an error naming the message."""
    out = []
    for i, m in enumerate(_listed(turns, f"`{column}`", "{from, value} turns")):
        source, value = (m.get("from"), m.get("value")) if isinstance(m, dict) else (None, None)
        if source not in SHAREGPT:
            got = f"from {source!r}" if isinstance(m, dict) else kind(m)
            raise ValueError(f"`{column}` message {i + 1} has {got}; ShareGPT turns are {{from, value}} with from "
                             f"{', '.join(SHAREGPT)}")
        out.append({"role": SHAREGPT[source], "content": value})
    return out


def from_messages(messages, record: dict) -> Conversation:
    messages = _listed(messages, "`messages`", "{role, content} messages")
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


def prompt_text(prompt) -> str:
    """A prompt (a string, or chat messages) as plain text: a chat prompt's message contents, one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def user_content(turn: dict) -> str:
    return turn["instruction"] if not turn["input"] else f"{turn['instruction']}\n\n{turn['input']}"


def prompt_messages(conv: Conversation, index: int) -> list[dict]:
    """Chat messages up to (and including) the user message that assistant turn `index` answers."""
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for turn in conv.turns[:index]:
        msgs += [{"role": "user", "content": user_content(turn)}, {"role": "assistant", "content": turn["response"]}]
    return msgs + [{"role": "user", "content": user_content(conv.turns[index])}]


def resolve_prompt_format(data, tokenizer, encoder_decoder: bool = False) -> str:
    """data.prompt_format in effect: `auto` is the model's chat template when it has one, else alpaca; for an
    encoder-decoder model (no chat template) `plain`."""
    if encoder_decoder:
        if data.prompt_format == "chat":
            raise DataError("an encoder-decoder model has no chat template; use prompt_format plain (auto), alpaca "
                            "or template")
        return "plain" if data.prompt_format == "auto" else data.prompt_format
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


def prompt_with_demonstrations(conv: Conversation, tokenizer, fmt: str, data, demos: list[Conversation]) -> str:
    """The prompt for the last turn of `conv` with solved examples before it (in-context learning): in a chat
    format, each demonstration is a user / assistant exchange before the conversation; otherwise each is rendered
    as a prompt followed by its answer, a blank line apart, then the query's prompt."""
    if not demos:
        return render_prompt(conv, len(conv.turns) - 1, tokenizer, fmt, data)
    if fmt == "chat":
        turns = [t for d in demos for t in d.turns] + conv.turns
        merged = Conversation(turns, conv.system, conv.row, conv.data)
        return render_prompt(merged, len(turns) - 1, tokenizer, fmt, data)
    shown = [render_prompt(d, 0, tokenizer, fmt, d.data or data) + d.turns[0]["response"] for d in demos]
    return "\n\n".join(shown + [render_prompt(conv, len(conv.turns) - 1, tokenizer, fmt, data)])
