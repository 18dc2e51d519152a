"""Shared helpers for methods that train part of a model: freeze, unfreeze, find the transformer blocks."""
from __future__ import annotations


def freeze_all(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def unfreeze(model, prefixes: list[str]) -> None:
    """Make every parameter under one of the module names in `prefixes` trainable."""
    for name, p in model.named_parameters():
        if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
            p.requires_grad_(True)


def transformer_blocks(model) -> tuple[str, object]:
    """The stack of transformer blocks: the ModuleList holding the most parameters.

    Works across architectures without a table (BERT `encoder.layer`, Llama `model.layers`, GPT-2 `h`).
    """
    from torch import nn

    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer blocks (no nn.ModuleList found)")
    return best


def modules_after_blocks(model, blocks_name: str) -> list[str]:
    """Top-level parameter owners registered after the blocks (pooler, final norm, head), in model order.

    These sit between the last block and the loss, so a method training the last N blocks must train them too.
    """
    names, seen_blocks = [], False
    for name, _ in model.named_parameters():
        if name.startswith(blocks_name + "."):
            seen_blocks = True
        elif seen_blocks:
            names.append(name.rsplit(".", 1)[0])
    return names


def count_parameters(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(total, 1), 4)}
