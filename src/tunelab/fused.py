"""RMSNorm and the SwiGLU product with their own backward, so a training step keeps less for it — the same outputs.

transformers' Llama-family RMSNorm computes in fp32, and autograd keeps that fp32 copy of the input of every norm
(twice per layer) for the backward; its MLP keeps the gate projection, its SiLU and the up projection. On the
bench/peers.py job (SmolLM2-135M, bf16 base, 4 × 256 tokens) those are 135 MiB and 270 MiB of the 771 MiB a step
keeps. Here the norm keeps its input in the model's dtype plus one fp32 scale per token, and the MLP keeps the two
projections and recomputes the SiLU in the backward (a few elementwise passes) — what Liger Kernel does on GPUs with
Triton kernels; it has no CPU kernels, so these are written with PyTorch operations and run on any device.

They replace the forward of modules whose forward is, line for line, transformers' Llama RMSNorm or Llama MLP with
a SiLU (Llama, Mistral, Qwen2/3, SmolLM … copy them) of every model tunelab trains (`trainer.prepare_method`),
and only where a graph is recorded: inference, tracing, ONNX export and torch.compile (which fuses these itself)
run the module's own forward.
tests/unit/test_fused.py compares outputs and gradients with transformers' and counts what is kept.
"""
from __future__ import annotations

import inspect
import types
from functools import cache

import torch


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        # the operations of transformers' LlamaRMSNorm.forward, in its order (so outputs are bit-identical)
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xhat.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(x.dtype).to(torch.float32)  # what autograd passes back through `.to(input_dtype)`
            grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_w, None


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors  # the kernels autograd runs for `act_fn(gate) * up`, the SiLU recomputed
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _records_graph(*tensors) -> bool:
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def _norm_forward(self, hidden_states):
    if _records_graph(hidden_states, self.weight):
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if _records_graph(gate, up):
        return self.down_proj(_SiLUMul.apply(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


@cache
def _source(cls) -> str | None:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return None


def _llama():
    from transformers.models.llama import modeling_llama

    return _source(modeling_llama.LlamaRMSNorm), _source(modeling_llama.LlamaMLP)


def _is_silu(act) -> bool:
    from transformers.activations import SiLUActivation

    return type(act) in (torch.nn.SiLU, SiLUActivation)


def use_fused_layers(model) -> int:
    """Gives every Llama-style RMSNorm and SiLU MLP of `model` the forward above; returns how many modules."""
    norm_source, mlp_source = _llama()
    count = 0
    for module in model.modules():
        source = _source(type(module))
        if source is None or "forward" in vars(module):
            continue
        if source == norm_source and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
        elif source == mlp_source and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        count += 1
    return count
