"""`adapter`: bottleneck adapters (Houlsby et al., 2019) after the attention and feed-forward output projections.

No maintained library supports this transformers version (`adapters` pins transformers 4.57), so tunelab
injects them itself: each chosen linear layer gets a child `bottleneck` (down-projection, GELU, up-projection
started at zero, residual) applied to its output by a forward hook. At the start the model computes exactly what
the base model did; the base weights stay frozen.

A run saves only what trained (adapters + any new head) as `model/bottleneck.safetensors` with
`model/bottleneck.json` (targets, size, base model); `load` rebuilds it on the base model.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..schema import Section
from .freezing import freeze_all, transformer_blocks, unfreeze

DEFAULT_LR = 1e-3
# the base weights stay frozen: with bf16 on they are loaded in bf16 (precision.base_dtype)
FROZEN_BASE = True
CONFIG_FILE, WEIGHTS_FILE = "bottleneck.json", "bottleneck.safetensors"
SAVED_FILE = CONFIG_FILE  # a model/ folder holding it is loaded with `load` below
MERGE_NOTE = "its bottleneck modules are layers of their own and cannot be folded into the weights; serve it as an " \
    "adapter on the base model"

# Output projections of attention and FFN: Llama/Mistral/Qwen, BERT, GPT-2, T5, OPT/BART, GPT-NeoX.
_OUTPUT_SUFFIXES = ("o_proj", "down_proj", "attention.output.dense", ".output.dense", "c_proj", "wo", "out_proj",
                    "fc2", "dense_4h_to_h", "attention.dense")


class Options(Section):
    name: Literal["adapter"] = "adapter"
    size: int = Field(64, ge=1)
    """Width of the bottleneck (hidden → size → hidden)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["auto"] | list[str] = "auto"
    """Linear layers (name suffixes) after which adapters go; `auto`: the attention and FFN output projections."""


@functools.cache
def _bottleneck_class():
    """The adapter module (defined on first use: importing this module does not import torch)."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, dim: int, size: int, dropout: float):
            super().__init__()
            self.down, self.up = nn.Linear(dim, size), nn.Linear(size, dim)
            self.act, self.drop = nn.GELU(), nn.Dropout(dropout)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x):
            return x + self.up(self.drop(self.act(self.down(x))))

    return Bottleneck


def _hook(module, args, output):
    return module.bottleneck(output)


def find_targets(model, target_modules) -> list[str]:
    from torch import nn

    blocks_name, _ = transformer_blocks(model)
    suffixes = _OUTPUT_SUFFIXES if target_modules == "auto" else tuple(target_modules)
    found = [name for name, m in model.named_modules()
             if name.startswith(blocks_name + ".") and isinstance(m, nn.Linear)
             and any(name == s or name.endswith(s if s.startswith(".") else "." + s) for s in suffixes)]
    if not found:
        raise ValueError(f"no linear layer in the blocks of {type(model).__name__} matches "
                         f"{', '.join(suffixes)}; set method.target_modules to layer names")
    return found


def inject(model, targets: list[str], size: int, dropout: float) -> None:
    modules = dict(model.named_modules())
    Bottleneck = _bottleneck_class()
    for name in targets:
        linear = modules[name]
        linear.add_module("bottleneck", Bottleneck(linear.out_features, size, dropout).to(linear.weight.device))
        linear.register_forward_hook(_hook)


def prepare(model, options: Options, new_modules: list[str], **_):
    targets = find_targets(model, options.target_modules)
    inject(model, targets, options.size, options.dropout)
    freeze_all(model)
    unfreeze(model, [f"{t}.bottleneck" for t in targets] + new_modules)
    model._tunelab_bottleneck = {"targets": targets, "size": options.size, "dropout": options.dropout}
    return model


def save(model, directory: Path) -> None:
    """Only the trained tensors, plus what is needed to rebuild them on the base model."""
    from safetensors.torch import save_file

    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(Path(directory) / WEIGHTS_FILE))
    info = {**model._tunelab_bottleneck, "base_model": getattr(model.config, "_name_or_path", None)}
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(info, indent=2))


def load(base, directory: Path):
    """The base model with the saved adapters (and new head) of `directory`."""
    import torch
    from safetensors.torch import load_file

    info = json.loads((Path(directory) / CONFIG_FILE).read_text())
    inject(base, info["targets"], info["size"], info["dropout"])
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    result = base.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{directory}: saved adapter tensors do not fit the base model: "
                         f"{', '.join(result.unexpected_keys[:5])}")
    return base
