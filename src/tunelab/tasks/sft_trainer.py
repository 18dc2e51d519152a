"""The trainer behind sft and causal_lm: TRL's SFTTrainer, with CPU fixes measured by bench/sft.py.

- `PackedRows`: packed rows stay rows of the batch. TRL's padding-free collator flattens the whole batch into one
  row; without a varlen flash-attention kernel (CPUs) that is one (batch·max_length)² masked attention.
- `SFTTrainer.compute_loss` on CPU: the LM head runs on the positions that carry a label only, in the autocast
  dtype, with the ordinary cross-entropy. TRL's fused head scores *every* position off Triton devices, in fp32
  tiles with entropy; on this 2-core CPU it took half of each step (7.5 of 15 s at batch 8 × 256). The head's
  cross-entropy runs in slices with its gradient taken in the forward pass (`head_loss`), so the step's logits
  are never held whole (4 fp32 steps of the bench/peers.py job, measured once when it was written: peak RSS
  3.67 → 3.10 GB at the same s/step; bench/peers.py measures whole runs).
  On CUDA/XPU TRL's own fused head (Triton) is kept.
- `SFTTrainer.training_step` under bf16: adapters take their bf16 input as it is (PEFT's fp32 cast switched off;
  see the method). With tunelab/attention.py's stacked grouped-query attention (on for every such model,
  tasks/generative.py), bench/sft.py went from 541 to 741 real tokens/s (batch 8 × 256, AMX Xeon, 2 cores).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from trl import SFTTrainer as _TRLSFTTrainer

# labelled tokens per LM-head slice: a slice's logits, their log-softmax and softmax are 3 × 128 × vocabulary fp32
# (75 MB for SmolLM2), held while the step's activations are, so they add to its peak. 128 rather than 256: the
# bench/peers.py job's peak RSS 1,567 → 1,511 MB at the same speed (one run each); the head's matmul is as fast per
# token at 128 rows as at 256 on the AMX Xeon (64 rows: a third slower)
SLICE = 128


class SFTTrainer(_TRLSFTTrainer):
    compile_decision: dict | None = None  # set by tunelab.compiling.apply

    @property
    def compiled(self) -> bool:
        return bool(self.compile_decision and self.compile_decision["on"])

    def evaluate(self, *args, **kwargs):
        """Validation runs the blocks uncompiled: without gradients they would compile again (another graph, tens
        of seconds on a CPU) for a pass that runs a few times per run."""
        if not self.compiled:
            return super().evaluate(*args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return super().evaluate(*args, **kwargs)

    def training_step(self, model, *args, **kwargs):
        """Under bf16 autocast, PEFT's cast of each adapter's input to its fp32 weights is a copy that autocast
        casts straight back (and keeps, per adapter, for the backward): PEFT's own switch turns it off for
        tunelab's loss — its forward (compute_loss) and the step's backward, where checkpointed blocks run their
        forward again."""
        with adapter_inputs_uncast(model, active=self.args.bf16 and self._own_loss(model)):
            return super().training_step(model, *args, **kwargs)

    def _own_loss(self, model) -> bool:
        from peft import PeftModel

        unwrapped = self.accelerator.unwrap_model(model)
        # prompt-learning PEFT models insert virtual tokens in their own forward: leave them to TRL
        if isinstance(unwrapped, PeftModel) and unwrapped.peft_config[unwrapped.active_adapter].is_prompt_learning:
            return False
        if self.args.device.type != "cpu":
            return False
        return backbone_and_head(unwrapped) is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        """The documented hook; any argument a later TRL adds goes through to it unchanged."""
        if return_outputs or kwargs or not self._own_loss(model):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch, **kwargs)
        mode = "train" if model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        backbone, head = backbone_and_head(self.accelerator.unwrap_model(model))
        target = labels[:, 1:]
        mask = target != -100
        # calling the backbone directly skips the autocast wrapper accelerate puts on the model's forward
        with torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=self.args.bf16), \
                adapter_inputs_uncast(backbone, active=self.args.bf16):  # see training_step
            hidden = backbone(**inputs).last_hidden_state[:, :-1][mask]
        target = target[mask]
        count = mask.sum()
        dtype = torch.bfloat16 if self.args.bf16 else hidden.dtype
        loss, entropy, correct = head_loss(hidden, head, target, dtype)
        loss = loss / (count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            n = self.accelerator.gather_for_metrics(count).sum()
            entropy = self.accelerator.gather_for_metrics(entropy).sum()
            correct = self.accelerator.gather_for_metrics(correct).sum()
            tokens = None
            if mode == "train":
                real = inputs["attention_mask"].sum() if "attention_mask" in inputs else \
                    torch.tensor(inputs["input_ids"].numel())
                tokens = int(self.accelerator.gather_for_metrics(real).sum().item())
            record_metrics(self, mode, (entropy / n).item() if n > 0 else 0.0,
                           (correct / n).item() if n > 0 else 0.0, tokens)
        return loss


@contextmanager
def adapter_inputs_uncast(model, active: bool = True):
    """PEFT's `cast_input_dtype_enabled` switch off, for the duration, on every adapter layer that has it — what
    `peft.helpers.disable_input_dtype_casting` does, except that PEFT's helper (0.21) raises AttributeError on
    layers without the switch (IA3's)."""
    layers = [m for m in model.modules() if getattr(m, "cast_input_dtype_enabled", None) is True] if active else []
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.cast_input_dtype_enabled = True


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """A causal LM (or a PEFT model around one) as its backbone — hidden states, with any LoRA layers inside — and
    its output head, for `head_loss`; None for models whose logits are more than the head's output (soft-capping,
    a logit scale), which are left to their own forward."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    config = getattr(model, "config", None)
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or getattr(config, "final_logit_softcapping", None) \
            or getattr(config, "logit_scale", None) or getattr(config, "is_encoder_decoder", False):
        return None
    return backbone, head


def head_loss(hidden: torch.Tensor, head: torch.nn.Module, target: torch.Tensor, dtype: torch.dtype,
              size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the LM head on labelled tokens (matmul in `dtype`, softmax in fp32), with the sum of
    their entropies and the count of top-1 hits, the logits existing one slice of `size` tokens at a time.

    A plain head (a bias-free Linear: every causal LM tunelab knows) with gradients: each slice's gradient is
    computed in the forward pass and its logits dropped — what Liger's fused linear cross-entropy does on GPUs,
    here in plain PyTorch — so the step's logits, their log-softmax and its gradient (three [tokens, vocabulary]
    fp32 tensors: 600 MB for 1,000 labelled tokens of SmolLM2) are never held at once. Any other head (one with
    LoRA or a bias) is called as a module, in slices without gradients and in one piece with them."""
    size = size or SLICE
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    if not (isinstance(head, torch.nn.Linear) and head.bias is None):
        return _module_slices(hidden, head, target, dtype, (len(target) or 1) if grad else size)
    if grad:
        return _FusedHeadLoss.apply(hidden, head.weight, target, dtype, size)
    return _head_slices(hidden, head.weight, target, dtype, size, grads=False)[:3]


def _module_slices(hidden, head, target, dtype, size):
    device = hidden.device
    loss, entropy = torch.zeros((), device=device), torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for a in range(0, len(target), size):
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = head(hidden[a:a + size]).float()
        t = target[a:a + size]
        loss = loss + F.cross_entropy(logits, t, reduction="sum")
        with torch.no_grad():
            logp = logits.detach().log_softmax(-1)
            entropy -= torch.dot(logp.exp().flatten(), logp.flatten())
            correct += (logits.detach().argmax(-1) == t).sum()
    return loss, entropy, correct


def _head_slices(hidden, weight, target, dtype, size, grads: bool, need_hidden=True, need_weight=False):
    w, device = weight.to(dtype), hidden.device
    loss, entropy = torch.zeros((), device=device), torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    grad_h = torch.empty_like(hidden) if grads and need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads and need_weight else None
    rows = torch.arange(min(size, max(len(target), 1)), device=device)
    for a in range(0, len(target), size):
        h, t = hidden[a:a + size].to(dtype), target[a:a + size]
        logits = (h @ w.T).float()  # [slice, vocabulary]
        correct += (logits.argmax(-1) == t).sum()
        logp = logits.log_softmax(-1)
        del logits
        loss -= logp[rows[:len(t)], t].sum()
        p = logp.exp()
        entropy -= torch.dot(p.flatten(), logp.flatten())  # Σ p·log p without a third [slice, vocabulary] tensor
        del logp
        if grads:  # d(Σ cross-entropy)/d logits = softmax − one-hot
            p[rows[:len(t)], t] -= 1
            g = p.to(dtype)
            if grad_h is not None:
                grad_h[a:a + size] = (g @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (g.T @ h).float()
        del p
    return loss, entropy, correct, grad_h, grad_w


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, dtype, size):
        loss, entropy, correct, grad_h, grad_w = _head_slices(
            hidden, weight, target, dtype, size, grads=True,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(entropy, correct)
        return loss, entropy, correct

    @staticmethod
    def backward(ctx, grad_loss, _entropy, _correct):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None)


def record_metrics(trainer, mode: str, entropy: float, accuracy: float, tokens: int | None) -> None:
    """Report what TRL's own loss path reports — mean entropy, top-1 token accuracy, tokens seen — where TRL keeps
    it: private attributes of its SFTTrainer (`_metrics[mode]`, `_total_train_tokens` in TRL 1.16), read by its
    `log`. This is the one place tunelab touches TRL's private state; tests/unit/test_sft.py
    (test_trl_keeps_its_metrics_where_tunelab_writes_them) fails if TRL renames them."""
    store = trainer._metrics[mode]
    store["entropy"].append(entropy)
    store["mean_token_accuracy"].append(accuracy)
    if tokens is not None:
        trainer._total_train_tokens += tokens
    store["num_tokens"] = [trainer._total_train_tokens]


class PackedRows:
    """Collator for packed training: each packed row stays a row of the batch (`[batch, max_length]`), with
    position ids restarting at every example and no attention mask, so transformers builds a block-diagonal
    causal mask per row. TRL's own padding-free collator flattens the whole batch into one row instead, which
    on a CPU (no varlen flash-attention kernel) turns the attention into one (batch·max_length)² masked product:
    8× the attention work and memory at batch 8.

    The tail of a short row is padding with its own position ids (a separate segment nobody attends to) and no
    loss; the first token of every example has no loss either (it would be predicted from the previous one).

    Compiled blocks (`fixed`) see one shape: every row padded to `width` and a short batch (an epoch's last) filled
    up to `rows` with rows of padding alone, which carry no loss and count no tokens — a new batch size would
    otherwise recompile every block with dynamic shapes, 30–45 s on a 2-core CPU for one step."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.width = None  # every batch padded to this width (compiled blocks: one shape); None: the longest row
        self.rows = None  # a shorter batch filled up to this many rows (compiled blocks); None: as it comes

    def fixed(self, width: int, rows: int) -> None:
        """One batch shape from now on: `rows` × `width` (what compiled blocks are compiled for)."""
        self.width, self.rows = width, rows

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        width = max([len(e["input_ids"]) for e in examples] + [self.width or 0])
        if self.rows and len(examples) < self.rows:
            examples = list(examples) + [{"input_ids": []}] * (self.rows - len(examples))
        ids, labels, positions = [], [], []
        for e in examples:
            n = len(e["input_ids"])
            lengths = list(e.get("seq_lengths") or [n])
            pos = [p for length in lengths for p in range(length)] + list(range(width - n))
            lab = list(e.get("labels", e["input_ids"])) + [-100] * (width - n)
            ids.append(list(e["input_ids"]) + [self.pad] * (width - n))
            labels.append([-100 if p == 0 else t for t, p in zip(lab, pos)])
            positions.append(pos)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions)}
