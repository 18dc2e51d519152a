"""Attention on the CPU for grouped-query models with a mask (packed rows, padding): the query heads of each
key/value group stacked into one longer query, so PyTorch's fused kernel runs on the key/value heads as they are.

transformers' `sdpa` path repeats every key/value head once per query head when a mask is present (`repeat_kv`),
and the CPU flash-attention backward on those repeated heads is slow: SmolLM2-135M (9 query heads, 3 key/value
heads), 4 packed rows × 256 tokens, bf16, one layer forward + backward 21 ms with repeated heads against 12 ms
stacked (AMX Xeon, 2 cores; tests/unit/test_attention.py checks the outputs and gradients are the same).
Stacking is exact: query head h = j·G + g of key/value head j becomes rows g·S … g·S+S-1 of stacked query j, and
the mask (shared by all heads) is tiled G times along the query axis. Everything else — no mask (the kernel's own
`enable_gqa` then applies), one query token, GPUs, per-head masks, attention biases — goes to transformers' `sdpa`.
"""
from __future__ import annotations

NAME = "tunelab_sdpa"


_last_mask: tuple = (None, None)  # (weak reference to the model's mask, its stacked form): one per forward pass


def _stacked_mask(mask, groups: int, dtype):
    """The mask tiled for the stacked query, additive in the query's dtype (what the kernel turns a boolean mask
    into: 0 where attended, -inf elsewhere), made once per forward pass and shared by every layer — each layer
    tiling and converting its own kept 30 copies for the backward (45 MB on the bench/peers.py job)."""
    import weakref

    import torch

    global _last_mask
    ref, stacked = _last_mask
    if ref is not None and ref() is mask and stacked.shape[2] == groups * mask.shape[2] and stacked.dtype == dtype:
        return stacked
    tiled = mask.repeat(1, 1, groups, 1)
    if tiled.dtype == torch.bool:
        tiled = torch.zeros(tiled.shape, dtype=dtype, device=tiled.device).masked_fill_(~tiled, float("-inf"))
    _last_mask = (weakref.ref(mask), tiled)
    return tiled


def _stacked_gqa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                         **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    if (query.device.type != "cpu" or groups <= 1 or attention_mask is None or q_len == 1
            or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or kwargs.get("position_bias") is not None
            or kwargs.get("cache") is not None or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    kv_heads = heads // groups
    stacked = query.reshape(batch, kv_heads, groups * q_len, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        stacked, key, value, attn_mask=_stacked_mask(attention_mask, groups, query.dtype), dropout_p=dropout,
        scale=scaling)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers the attention function (and sdpa's masks under its name) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _stacked_gqa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_stacked_gqa(model) -> bool:
    """Switches a model that runs transformers' `sdpa` to the stacked form where it can matter (grouped-query
    attention); returns whether it did. The saved config is unaffected (transformers does not save the choice)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not heads or not kv or heads == kv:
        return False
    model.set_attn_implementation(register())
    return model.config._attn_implementation == NAME
