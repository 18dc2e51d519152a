"""Text generation with a finished sft run or a base model, and its evaluation on conversations."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from . import sft


class Generator:
    """A causal LM ready to generate: `generate(prompts)`, `evaluate(conversations)`."""

    def __init__(self, config, tokenizer, model, path=None):
        self.config, self.tokenizer, self.model, self.path = config, tokenizer, model.eval(), path
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at the edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def load(cls, run_path) -> "Generator":
        from ..runs import open_finished

        return cls.from_saved(*open_finished(run_path, task="sft"))

    @classmethod
    def from_saved(cls, path, config) -> "Generator":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models import resolve
        from ..models.saved import load_saved

        model_dir = Path(path) / "model"
        model = load_saved(model_dir, AutoModelForCausalLM, lambda: AutoModelForCausalLM.from_pretrained(
            resolve(config.model.name), dtype=torch.float32))
        return cls(config, AutoTokenizer.from_pretrained(model_dir), model, path)

    @classmethod
    def base(cls, config) -> "Generator":
        """The untrained model of a config, for before/after comparisons."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..models import resolve

        directory = resolve(config.model.name)
        return cls(config, AutoTokenizer.from_pretrained(directory),
                   AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32))

    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
                 progress: bool = False) -> list[str]:
        """Completions of already-rendered prompts (see `render`), stopping at EOS."""
        out = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
            enc = self.tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=True).to(self.model.device)
            kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
                      "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            ids = self.model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1]:]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [text.strip() for text in out]

    def render(self, user_text: str) -> str:
        """A free-text prompt in the run's prompt format (with the run's fixed instruction, if any)."""
        data = self.config.data
        turn = ({"instruction": data.instruction, "input": user_text} if data.instruction
                else {"instruction": user_text, "input": None})
        conv = sft.Conversation([{**turn, "response": ""}], row={data.prompt: user_text})
        fmt = sft.resolve_prompt_format(data, self.tokenizer)
        if fmt == "template":
            from ..errors import TunelabError

            raise TunelabError("this run renders prompts from data columns with data.template; free-text "
                               "--prompt needs a chat or alpaca prompt format")
        return sft.render_prompt(conv, 0, self.tokenizer, fmt, data)

    def evaluate(self, convs: list, max_new_tokens: int) -> tuple[dict, pd.DataFrame]:
        """Generation metrics on the last assistant turn of each conversation, greedy."""
        from ..evaluate import generation_metrics

        fmt = sft.resolve_prompt_format(self.config.data, self.tokenizer)
        prompts = [sft.render_prompt(c, len(c.turns) - 1, self.tokenizer, fmt, self.config.data) for c in convs]
        references = [c.turns[-1]["response"] for c in convs]
        generated = self.generate(prompts, max_new_tokens=max_new_tokens, progress=len(prompts) > 16)
        rows = pd.DataFrame({"prompt": prompts, "reference": references, "generated": generated})
        return generation_metrics(references, generated), rows
