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


def place(model):
    """A loaded model on the device inference runs on: the GPU when there is one (a run trained on a GPU is
    evaluated, served and exported from there too), else the CPU. A quantized model stays where it was loaded."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "is_quantized", False) and model.device.type != "cuda":
        model = model.to("cuda")
    return model
