"""Frozen-prefix activation caching for `head` and `last_layers` (train.cache_frozen).

When the embeddings and the first K transformer blocks are frozen, their output for an example never changes.
So before training, one no-grad pass (eval mode: no dropout in the frozen part) runs the model over the train
and validation examples and keeps the output of block K-1 per example; during training the embeddings return
that cached output and the frozen blocks pass it through, so every epoch runs only the trainable blocks and
the head. Examples are found by their token ids (padding removed), so the Trainer's shuffling, padding and
evaluation need nothing special. The cache lives in memory, bounded by train.cache_frozen_mb (estimated
before it is built; over the bound, training runs uncached and says so). After training the original modules
are put back, so the saved model is the ordinary one.

Differences from uncached training, by design: the frozen blocks see no dropout (as in feature extraction);
the trainable part is unchanged. tests/unit/test_frozen_cache.py checks the logits match the model's own.
"""
from __future__ import annotations

import torch
from torch import nn

from .freezing import transformer_blocks


def frozen_blocks(model: nn.Module) -> tuple[str, nn.ModuleList, int]:
    """Name of the block stack, the stack, and how many leading blocks are entirely frozen."""
    name, blocks = transformer_blocks(model)
    k = 0
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        k += 1
    return name, blocks, k


def _embeddings(model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
    """The module that turns input ids into the first block's input: BERT's `embeddings` (word + position +
    type + norm) or a decoder's `embed_tokens` — the innermost module holding the word embeddings that does not
    also hold the blocks."""
    word = model.get_input_embeddings()
    for module in model.modules():
        if any(c is word for c in module.children()) and not any(m is blocks for m in module.modules()):
            return module
    return word


class _Stop(Exception):
    """Raised by the capture hook: nothing after the last frozen block needs to run in the caching pass."""


class FrozenCache:
    def __init__(self, model: nn.Module, pad_token_id: int):
        self.model, self.pad = model, pad_token_id
        self.blocks_name, self.blocks, self.k = frozen_blocks(model)
        self.store: dict[bytes, torch.Tensor] = {}
        self.as_tuple = False
        self._patched: list[nn.Module] = []

    def _key(self, row: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        keep = row != self.pad
        return row[keep].cpu().numpy().tobytes(), keep

    def estimate_mb(self, n_tokens: int) -> float:
        hidden = self.model.config.hidden_size
        return n_tokens * hidden * 4 / 2 ** 20

    @torch.no_grad()
    def build(self, datasets, collator, batch_size: int, autocast: bool, progress=None) -> int:
        """One pass over the examples: keep the output of the last frozen block for each."""
        captured = {}

        def hook(_module, _inputs, output):
            self.as_tuple = isinstance(output, tuple)
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _Stop

        handle = self.blocks[self.k - 1].register_forward_hook(hook)
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            for ds in datasets:
                for start in range(0, len(ds), batch_size):
                    batch = collator([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
                    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        try:
                            self.model(**batch)
                        except _Stop:
                            pass
                    h = captured["h"]
                    for row, states in zip(batch["input_ids"], h):
                        key, keep = self._key(row)
                        self.store[key] = states[keep].clone()
                    if progress:
                        progress(len(batch["input_ids"]))
        finally:
            handle.remove()
            self.model.train(was_training)
        return len(self.store)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids:
            key, keep = self._key(row)
            states = self.store.get(key)
            if states is None:
                raise RuntimeError("frozen cache: an example that was not cached reached the model")
            out = states.new_zeros((row.shape[0], states.shape[-1]))
            out[keep] = states
            rows.append(out)
        return torch.stack(rows)

    def install(self) -> None:
        """Route the embeddings to the cache and make the frozen blocks pass their input through. Only the
        modules' `forward` is replaced, so the state dict (checkpoints, the saved model) is untouched."""
        as_tuple = self.as_tuple

        def cached(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise RuntimeError("frozen cache: the model was called without input_ids")
            return self.lookup(ids)

        def passthrough(hidden_states=None, *args, **kwargs):
            return (hidden_states,) if as_tuple else hidden_states

        self._patched = [_embeddings(self.model, self.blocks)] + [self.blocks[i] for i in range(self.k)]
        self._patched[0].forward = cached
        for block in self._patched[1:]:
            block.forward = passthrough

    def callback(self):
        """A TrainerCallback that calls `remove` when training ends (before the run saves the model)."""
        from transformers import TrainerCallback

        cache = self

        class _Remove(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                cache.remove()

        return _Remove()

    def remove(self) -> None:
        """Give the modules their own forward back (before saving); the cache is freed."""
        for module in getattr(self, "_patched", []):
            del module.forward
        self._patched = []
        self.store.clear()
