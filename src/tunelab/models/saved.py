"""Load the model a run saved: a PEFT adapter onto its base model, tunelab bottleneck adapters, or a full model."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def load_saved(model_dir: Path, auto_class, load_base: Callable[[], object]):
    """`model_dir` holding adapter_config.json (PEFT) or bottleneck.json (method adapter) → `load_base()` plus
    the adapter; otherwise `auto_class` (fp32)."""
    import torch

    from ..methods import adapter

    if (Path(model_dir) / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(), model_dir)
    if (Path(model_dir) / adapter.CONFIG_FILE).exists():
        return adapter.load(load_base(), model_dir)
    return auto_class.from_pretrained(model_dir, dtype=torch.float32)


# tokenizer classes transformers loads from tokenizer.json alone; transformers' Auto* modules import torch (their
# configuration code does), which a command answered by llama.cpp never needs
_TOKENIZERS_ONLY = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(model_dir: Path):
    """The tokenizer a run saved, as AutoTokenizer loads it; without importing torch when its class is the generic
    tokenizers-backed one (a tokenizer folder saved by transformers 5)."""
    import json

    folder = Path(model_dir)
    try:
        named = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        named = None
    if named in _TOKENIZERS_ONLY and (folder / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def place(model):
    """A loaded model on the device inference runs on: the GPU when there is one (a run trained on a GPU is
    evaluated, served and exported from there too), else the CPU. A quantized model stays where it was loaded."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "is_quantized", False) and model.device.type != "cuda":
        model = model.to("cuda")
    return model


def _contiguous(module, args):
    import torch

    return (args[0].contiguous(), *args[1:]) if args and torch.is_tensor(args[0]) else None


def contiguous_head_input(model) -> None:
    """The LM head gets its hidden states contiguous. transformers hands it the last position as a strided slice
    (`logits_to_keep`), and PyTorch's CPU `linear` on a non-contiguous 3-D input without bias runs as a `bmm`
    that copies the weight once per row (pytorch/pytorch#151934): SmolLM2's head on a prefill of 16 prompts in
    bf16 took 1.16 s and 0.9 GB instead of 5 ms (fp32: 53 ms against 16 ms)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module) and not getattr(head, "_tunelab_contiguous", False):
        head.register_forward_pre_hook(_contiguous)
        head._tunelab_contiguous = True
