"""Text generation with a finished generative run (sft, seq2seq, causal_lm) or a base model, and its
evaluation on conversations."""
from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..data.conversations import Conversation, render_prompt, resolve_prompt_format, user_content
from ..errors import TunelabError

if TYPE_CHECKING:
    import pandas as pd


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM


def _inference_mode(method):
    """`@torch.inference_mode()`, with torch imported when the method runs: a command answered by llama.cpp
    (`tunelab generate` on the run's GGUF export) renders its prompts here without importing torch at all."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return method(*args, **kwargs)
    return run


def _load_base(config, dtype=None):
    """The untrained model of a config, in `dtype` (default fp32; or a function that gives it; seq2seq from an
    encoder: bert2bert, as training built it)."""
    import torch

    dtype = dtype() if callable(dtype) else dtype

    from ..models import resolve

    directory = resolve(config.model.name)
    if config.task == "seq2seq":
        from ..models.encoder_decoder import build_model

        return build_model(directory)[:2]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory), _auto_class(config.task).from_pretrained(
        directory, dtype=dtype or torch.float32)


class Generator:
    """A generative model ready to generate: `generate(prompts)`, `evaluate(conversations)`.

    `model` is the loaded model, or a function that loads it: then it is loaded on first use of `model` (or of
    what depends on it: `bf16`, `precision`), so a command answered by an engine that never touches the trained
    model in torch (llama.cpp on the run's GGUF export) does not pay for importing peft and loading the weights.
    `encoder_decoder` is given with a loader (it cannot be read off a model not yet loaded)."""

    def __init__(self, config, tokenizer, model, path=None, encoder_decoder: bool | None = None):
        self.config, self.tokenizer, self.path = config, tokenizer, path
        self._model, self._load, self._bf16 = None, None, None
        if hasattr(model, "parameters"):  # a model (torch.nn.Module), not a function that loads one
            self._model = self._placed(model)
        else:
            self._load = model
        self.demonstrations = None  # method icl: solved examples put before each prompt
        self.encoder_decoder = (bool(getattr(model.config, "is_encoder_decoder", False)) if encoder_decoder is None
                                else encoder_decoder)
        # decoder-only: pad on the left so every prompt ends at the edge; encoder-decoder: the encoder reads it all
        self.tokenizer.padding_side = "right" if self.encoder_decoder else "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _placed(self, model):
        import torch

        from ..models.saved import contiguous_head_input, place

        model = place(model).eval()
        # a base loaded in bf16 (what training ran: base_dtype) runs under bf16 autocast, as in training, so the
        # fp32 parts (adapter weights, virtual tokens) meet bf16 activations the way they did there
        self._bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        contiguous_head_input(model)
        return model

    @property
    def model(self):
        """The model, loaded now if it was not yet."""
        if self._model is None:
            load, self._load = self._load, None
            # first used inside `generate`/`loss` (inference mode): loaded outside it all the same, or its weights
            # are inference tensors that peft cannot switch (disable_adapter sets requires_grad on them)
            import torch

            with torch.inference_mode(False):
                self._model = self._placed(load())
        return self._model

    @model.setter
    def model(self, model) -> None:  # merged, moved or cast in place by an engine or an export: kept as given
        self._model, self._load = model, None

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded (see the class docstring)."""
        return self._model is not None

    @property
    def bf16(self) -> bool:
        """Whether its base computes in bf16 (under bf16 autocast); loads the model to know."""
        if self._bf16 is None:
            self.model  # noqa: B018 — loading sets it
        return bool(self._bf16)

    @classmethod
    def from_saved(cls, path, config, dtype=None) -> "Generator":
        """The run's saved model, loaded on first use; `dtype` is its base's (default fp32; a full model is always
        fp32), or a function that gives it when the model loads."""
        from ..models.saved import load_saved, load_tokenizer

        model_dir = Path(path) / "model"
        if config.method.name == "icl":  # nothing was trained: the base model, prompted with demonstrations
            from ..methods.demonstrations import load

            generator = cls(config, *_load_base(config, dtype), path)
            generator.demonstrations = load(model_dir, config.method)
            return generator
        return cls(config, load_tokenizer(model_dir),
                   lambda: load_saved(model_dir, _auto_class(config.task),
                                      lambda: _load_base(config, dtype)[1]),
                   path, encoder_decoder=config.task == "seq2seq")

    @classmethod
    def base(cls, config, dtype=None) -> "Generator":
        """The untrained model of a config, for before/after comparisons."""
        return cls(config, *_load_base(config, dtype))

    @property
    def dtype(self):
        """The dtype it computes in (its base's): what a model to compare it with is loaded in."""
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self):
        """The context its model runs in (bf16 autocast for a bf16 base): whoever calls `model` directly (the
        server's batches) enters it too, or a bf16 run's adapters compute in fp32 and its output drifts from
        `generate`'s."""
        import torch

        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @_inference_mode
    def generate(self, prompts: list[str], max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16,
                 progress: bool = False, strip: bool = True, ignore_eos: bool = False) -> list[str]:
        """Completions of already-rendered prompts (see `render`), stopping at EOS (`ignore_eos`: always
        `max_new_tokens`, as benchmarks force); `strip=False` keeps their leading space (a continuation of plain
        text)."""
        out = [""] * len(prompts)
        kwargs = self._generate_kwargs(max_new_tokens, do_sample, temperature, top_p, ignore_eos)
        # prompts of similar length batched together: less padding computed, and a batch's few long prompts do
        # not make every row in it wide (the answers come back in the caller's order)
        order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
        for i in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
            batch = order[i:i + batch_size]
            enc = self.tokenizer([prompts[k] for k in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=True).to(self.model.device)
            enc.pop("token_type_ids", None)
            with self.autocast():
                ids = self.model.generate(**enc, **kwargs)
            new = ids if self.encoder_decoder else ids[:, enc["input_ids"].shape[1]:]
            for k, text in zip(batch, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                out[k] = text
        return [text.strip() for text in out] if strip else out

    def _generate_kwargs(self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float,
                         ignore_eos: bool) -> dict:
        eos = self.model.generation_config.eos_token_id if self.encoder_decoder else self.tokenizer.eos_token_id
        kwargs = {"do_sample": do_sample, "max_new_tokens": max_new_tokens,
                  "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": eos}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        if ignore_eos:
            kwargs["min_new_tokens"] = max_new_tokens
        return kwargs

    def stream(self, prompt: str, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
               top_p: float = 1.0):
        """The completion of one rendered prompt as it is written: pieces of text, in order, that join into what
        `generate([prompt])` returns before its strip (transformers' TextIteratorStreamer; `generate` runs in a
        thread, as in transformers' own streaming example)."""
        import threading

        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=not self.encoder_decoder,
                                        skip_special_tokens=True, timeout=600)
        enc = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=True).to(self.model.device)
        enc.pop("token_type_ids", None)
        kwargs = self._generate_kwargs(max_new_tokens, do_sample, temperature, top_p, False)
        failed = []

        def run() -> None:
            import torch

            try:
                with torch.inference_mode(), self.autocast():
                    self.model.generate(**enc, **kwargs, streamer=streamer)
            except BaseException as exc:  # noqa: BLE001 — raised again in the caller's thread
                failed.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="tunelab-stream", daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if failed:
            raise failed[0]

    @_inference_mode
    def loss(self, rows: list[dict], max_tokens: int = 1024) -> float:
        """Mean cross-entropy per trained token over encoded rows (see `_loss`), in the model's precision."""
        with self.autocast():
            return self._loss(rows, max_tokens)

    def _loss(self, rows: list[dict], max_tokens: int) -> float:
        """Mean cross-entropy per trained token over encoded rows (decoder-only: `input_ids` +
        `completion_mask`; encoder-decoder: `input_ids` + `labels`).

        Rows are batched by length (at most `max_tokens` padded tokens per batch, so little is spent on padding),
        and a decoder-only model projects onto its vocabulary only at the trained positions, 256 at a time
        (`head_loss`; `logits_to_keep` as a mask where the head cannot be called on its own): with a 49k
        vocabulary the logits of every position, not the model, would be most of an evaluation batch's memory
        and a fifth of its compute."""
        import torch
        import torch.nn.functional as F

        from .sft_trainer import backbone_and_head, head_loss

        total, count = 0.0, 0
        pad, device = self.tokenizer.pad_token_id, self.model.device
        keeps_logits = self._keeps_logits
        split = backbone_and_head(self.model) if keeps_logits and not self.encoder_decoder else None
        for chunk in _length_batches(rows, max_tokens):
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in chunk], device=device)
            mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in chunk],
                                device=device)
            if self.encoder_decoder:
                lw = max(len(r["labels"]) for r in chunk)
                target = torch.tensor([r["labels"] + [-100] * (lw - len(r["labels"])) for r in chunk], device=device)
                logits = self.model(input_ids=ids, attention_mask=mask, labels=target).logits
            else:
                trained = torch.tensor([r["completion_mask"] + [0] * (width - len(r["input_ids"])) for r in chunk],
                                       device=device)
                target = torch.where(trained.bool(), ids, -100)[:, 1:]  # position i predicts token i + 1
                if split is not None:
                    backbone, head = split
                    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
                    keep = target.ne(-100)
                    summed = head_loss(hidden[keep], head, target[keep], hidden.dtype)[0]
                    total += summed.item()
                    count += int(keep.sum())
                    continue
                if keeps_logits:  # logits of the trained positions only, flattened (transformers' mask form)
                    keep = torch.nn.functional.pad(target.ne(-100), (0, 1))
                    logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                    target = target[target.ne(-100)]
                else:  # every position; prompt tuning prepends its virtual tokens: the last ones are the text's
                    logits = self.model(input_ids=ids, attention_mask=mask).logits
                    logits = logits[:, logits.shape[1] - width:-1]
            if target.dim() > 1:  # every position kept: the rows' trained ones, flattened
                selected = target.ne(-100)
                logits, target = logits[selected], target[selected]
            # in slices: cross_entropy's log-softmax is another copy of the logits (200 MB for 1,024 tokens of a
            # 49k vocabulary in fp32), a slice's is 1/4 of that
            for a in range(0, len(target), 256):
                total += F.cross_entropy(logits[a:a + 256].float(), target[a:a + 256], reduction="sum").item()
            count += len(target)
        return total / max(count, 1)

    @property
    def _keeps_logits(self) -> bool:
        """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do; prompt-learning PEFT
        models, whose outputs are longer than their inputs, are left to compute every position)."""
        import inspect

        peft_config = getattr(self.model, "active_peft_config", None)
        if peft_config is not None and peft_config.is_prompt_learning:
            return False
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    @contextmanager
    def adapter_disabled(self):
        """The untrained model's behaviour from the same loaded weights, when the run trained a PEFT adapter
        (LoRA, IA3, prompt/prefix tuning...): the adapter switched off instead of a second model in memory.
        Yields None for a model that has no such switch (full fine-tuning, the bottleneck adapter)."""
        switch = getattr(self.model, "disable_adapter", None)
        if switch is None or self.demonstrations is not None:
            yield None
            return
        with switch():
            yield self

    def render(self, user_text: str) -> str:
        """A free-text prompt in the run's prompt format (with the run's fixed instruction, if any)."""
        if self.config.task == "causal_lm":
            return user_text  # raw text: the model continues it
        data = self.config.data
        turn = ({"instruction": data.instruction, "input": user_text} if data.instruction
                else {"instruction": user_text, "input": None})
        conv = Conversation([{**turn, "response": ""}], row={data.prompt: user_text})
        if self.prompt_format(data) == "template" or data.datasets:
            raise TunelabError("this run renders prompts from data columns (data.template or per-dataset prompts); "
                               "free-text --prompt needs a single chat, alpaca or plain prompt format")
        return self.render_conversation(conv)

    def prompt_format(self, data=None) -> str:
        """The prompt format in effect for `data` (default: the run's data settings): chat, alpaca, plain or
        template."""
        return resolve_prompt_format(data or self.config.data, self.tokenizer, self.encoder_decoder)

    def render_conversation(self, conv) -> str:
        """The prompt for the last assistant turn of a conversation, with the settings it was read with."""
        data = conv.data or self.config.data
        if self.demonstrations is not None:
            return self.demonstrations.prompt(conv, self.tokenizer, self.prompt_format(data), data,
                                              self.config.model.max_length)
        return render_prompt(conv, len(conv.turns) - 1, self.tokenizer, self.prompt_format(data), data)

    def evaluate(self, convs: list, max_new_tokens: int, open_engine=None) -> tuple[dict, pd.DataFrame]:
        """Generation metrics on the last assistant turn of each conversation, greedy, written by the engine
        `open_engine(generator, n_prompts, max_new_tokens, answers)` opens (generation.choose for the run, passed in
        from above: tasks do not import the generation layer built on them), or by this model's own HF generate;
        the engine and why it was chosen go into metrics["inference"]. The engine may merge an adapter into this
        model in place: compute losses first."""
        import sys
        import time

        import pandas as pd

        from ..metrics import generation_metrics

        prompts = [self.render_conversation(c) for c in convs]
        references = [c.turns[-1]["response"] for c in convs]
        opened = time.perf_counter()
        chosen = (open_engine(self, len(prompts), max_new_tokens, list(zip(prompts, references))) if open_engine
                  else _OwnGenerate(self))
        print(f"tunelab: test answers written by {chosen.why}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            generated = chosen.generate(prompts, max_new_tokens=max_new_tokens, progress=len(prompts) > 16)
        finally:
            if hasattr(chosen, "close"):
                chosen.close()
        seconds = time.perf_counter() - started
        # the user's message beside the prompt as rendered (the UI shows the message, the template on demand)
        rows = pd.DataFrame({"prompt": prompts, "message": [user_content(c.turns[-1]) for c in convs],
                             "reference": references, "generated": generated})
        metrics = generation_metrics(references, generated)
        if self.demonstrations is not None:
            metrics["demonstrations"] = self.demonstrations.report()
        # what answering costs: greedy generation time per request, and the tokens each prompt holds (in-context
        # learning pays for its demonstrations on every call)
        n = max(len(prompts), 1)
        metrics["inference"] = {
            "seconds": round(seconds, 3), "examples": len(prompts), "per_1000_s": round(1000 * seconds / n, 3),
            "prompt_tokens": round(sum(len(self.tokenizer(p)["input_ids"]) for p in prompts) / n, 1),
            "generated_tokens": round(sum(len(self.tokenizer(g, add_special_tokens=False)["input_ids"])
                                          for g in generated) / n, 1),
            "engine": chosen.label, "engine_why": chosen.why,
            "engine_ready_s": round(started - opened, 3)}  # merging, starting, checking it: paid once, not per request
        return metrics, rows


class _OwnGenerate:
    """The engine interface over a Generator's own HF generate, adapter unmerged (no engine was passed in)."""
    name = "torch"

    def __init__(self, generator: Generator):
        self.generate = generator.generate
        self.label = self.why = f"HF generate in this process ({generator.precision}, any adapter unmerged)"


def _length_batches(rows: list[dict], max_tokens: int):
    """Rows in batches of similar length, each at most `max_tokens` padded tokens (at least one row)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]) + len(rows[i].get("labels", ())))
    batch: list[dict] = []
    for i in order:
        size = len(rows[i]["input_ids"]) + len(rows[i].get("labels", ()))
        if batch and size * (len(batch) + 1) > max_tokens:  # ascending lengths: this row is the widest
            yield batch
            batch = []
        batch.append(rows[i])
    if batch:
        yield batch
