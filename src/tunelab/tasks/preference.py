"""What the preference tasks (reward, dpo, rl) share: their data fields and config checks, the policy they train,
how a prompt is shown to a causal LM, and the log-likelihood of a response given a prompt (DPO's margins, RL's KL
to the reference)."""
from __future__ import annotations

from ..data.conversations import Conversation, from_messages, render_prompt, resolve_prompt_format
from ..methods import METHODS, trait

DATA_FIELDS = frozenset({"prompt", "chosen", "rejected", "responses", "scores", "ranking_pairs", "instruction",
                         "prompt_format", "bad_rows"})


def check(config) -> list[str]:
    """Problems any preference task has with a config: a method without gradients or with virtual tokens (TRL's
    preference trainers do not handle them), a user template."""
    problems = []
    name = config.method.name
    if trait(name, "GRADIENT_FREE") or trait(name, "VIRTUAL_TOKENS"):
        usable = [m for m in METHODS
                  if m != "lora" and not trait(m, "GRADIENT_FREE") and not trait(m, "VIRTUAL_TOKENS")]
        problems.append(f"method {name} cannot be used with task {config.task}; use lora (or {', '.join(usable)})")
    if config.data.prompt_format == "template":
        problems.append(f"data.prompt_format template is for sft; task {config.task} uses auto, chat, alpaca or "
                        f"plain")
    return problems


def load_policy(config, model_dir: str, task_type: str):
    """The causal LM the preference task trains, with the method applied: (tokenizer, model, params)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..trainer import load_kwargs, prepare_method

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{"dtype": torch.float32, **load_kwargs(config)})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model, params = prepare_method(config, model, [], model_dir, task_type)
    return tokenizer, model, params


def conversation(prompt, data) -> Conversation:
    """A preference prompt (string or chat messages) as a Conversation whose last turn is to be answered."""
    if isinstance(prompt, str):
        turn = ({"instruction": data.instruction, "input": prompt} if data.instruction
                else {"instruction": prompt, "input": None})
        return Conversation([{**turn, "response": ""}])
    return from_messages(list(prompt) + [{"role": "assistant", "content": "-"}], {})


def render(prompt, tokenizer, data) -> str:
    """The text a causal LM sees before its response, in data.prompt_format (auto: chat when the model has a
    chat template, `plain`: the prompt as it is, to be continued)."""
    conv = conversation(prompt, data)
    fmt = resolve_prompt_format(data, tokenizer)
    return render_prompt(conv, len(conv.turns) - 1, tokenizer, fmt, data)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_response(tokenizer, prompt: str, response: str, add_eos: bool, max_length: int) -> tuple[list[int], int]:
    """Token ids of prompt + response (+ EOS) and where the response starts — split where the tokenized prompt and
    prompt + response stop agreeing, as TRL's DPOTrainer does. Cut to the last `max_length` tokens of the prompt
    side so the response survives."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + response)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None and full[-1:] != [tokenizer.eos_token_id]:
        full = full + [tokenizer.eos_token_id]
    start = _common_prefix(prompt_ids, full)
    if len(full) > max_length:
        cut = min(len(full) - max_length, start)
        full, start = full[cut:][:max_length], start - cut
    return full, start


def response_logps(model, tokenizer, prompts: list[str], responses: list[str], *, add_eos: bool = True,
                   max_length: int = 1024, batch_size: int = 16):
    """Sum of the log-probabilities of each response's tokens given its (rendered) prompt (a numpy array)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    rows = [encode_response(tokenizer, p, r, add_eos, max_length) for p, r in zip(prompts, responses)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc="scoring responses", disable=len(rows) <= 4 * batch_size,
                  leave=False):
        chunk = rows[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in chunk], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        for row, (r, start) in enumerate(chunk):
            out.append(float(logp[row, max(start, 1) - 1:len(r) - 1].sum()))
    return np.array(out)


def token_lengths(config, frame, tokenizer):
    """Tokens of each rendered prompt with its chosen response (rl: the prompt alone), for the data check."""
    import numpy as np

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    responses = frame["_chosen"] if "_chosen" in frame else [""] * len(frame)
    return np.array([len(tokenizer(render(p, tokenizer, config.data) + r)["input_ids"])
                     for p, r in zip(frame["_prompt"], responses)])
