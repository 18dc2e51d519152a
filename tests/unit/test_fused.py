"""RMSNorm and SiLU·up with their own backward (tunelab/fused.py): transformers' outputs and gradients, less kept
for the backward, and only on modules that compute what Llama's do."""
import copy

import pytest
import torch

from tunelab import fused
from tunelab.fused import use_fused_layers

HIDDEN, INTER, LAYERS = 32, 48, 2


def _model(dtype=torch.float32, act="silu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, hidden_act=act)
    return LlamaForCausalLM(config).to(dtype)


def _ids():
    torch.manual_seed(1)
    return torch.randint(0, 64, (2, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_give_transformers_outputs_and_gradients(dtype):
    plain = _model(dtype)
    lean = copy.deepcopy(plain)
    # per layer: two norms and the MLP; plus the final norm
    assert use_fused_layers(lean) == 3 * LAYERS + 1
    ids = _ids()
    losses = {}
    for name, model in (("plain", plain), ("lean", lean)):
        losses[name] = model(input_ids=ids, labels=ids).loss
        losses[name].backward()
    assert losses["lean"].item() == losses["plain"].item()  # the forward is the same operations in the same order
    grads = dict(plain.named_parameters())
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    for name, p in lean.named_parameters():  # every parameter trains: norm weights too
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.float(), grads[name].grad.float(), **tol, msg=name)


def _kept(model, ids) -> list[tuple[tuple, torch.dtype]]:
    """What autograd keeps for the backward of one forward pass (one entry per storage), the weights excepted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in weights:
            seen.setdefault(key, (tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False).logits.sum()
    return list(seen.values())


def test_fused_layers_keep_no_fp32_copy_and_not_the_silu():
    # a frozen bf16 base whose residual stream needs gradients (what an adapter upstream makes it)
    plain = _model(torch.bfloat16).requires_grad_(False)
    plain.get_input_embeddings().weight.requires_grad_(True)
    lean = copy.deepcopy(plain)
    use_fused_layers(lean)
    ids = _ids()
    batch, seq = ids.shape
    kept = {name: _kept(model, ids) for name, model in (("plain", plain), ("lean", lean))}
    hidden_fp32 = [s for s in kept["plain"] if s == ((batch, seq, HIDDEN), torch.float32)]
    assert len(hidden_fp32) == 2 * LAYERS + 1  # transformers: every norm keeps an fp32 copy of its input
    assert ((batch, seq, HIDDEN), torch.float32) not in kept["lean"]
    inter = ((batch, seq, INTER), torch.bfloat16)
    assert kept["plain"].count(inter) == 3 * LAYERS  # gate, SiLU(gate), up
    assert kept["lean"].count(inter) == 2 * LAYERS  # gate, up

    def size(entries):
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in entries)
    # fp32 copy (4 bytes) → bf16 input (2) per norm; one SiLU (2) per layer
    saved = (2 * LAYERS + 1) * batch * seq * HIDDEN * 2 + LAYERS * batch * seq * INTER * 2
    assert size(kept["plain"]) - size(kept["lean"]) >= saved


def test_without_a_graph_the_modules_run_their_own_forward(monkeypatch):
    model = _model()
    use_fused_layers(model)
    called = []
    for cls in (fused._RMSNorm, fused._SiLUMul):
        monkeypatch.setattr(cls, "apply", lambda *a, _cls=cls, _apply=cls.apply: called.append(_cls) or _apply(*a))
    with torch.no_grad():
        model(input_ids=_ids())
    assert called == []
    model(input_ids=_ids())
    assert fused._RMSNorm in called and fused._SiLUMul in called


def test_only_what_computes_llama_s_norm_and_silu_mlp_is_replaced(tmp_path):
    class ScaledNorm(torch.nn.Module):  # Gemma-style: (1 + weight); another computation under a similar name
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(HIDDEN)), 1e-6

        def forward(self, hidden_states):
            return hidden_states * (1 + self.weight)

    gelu = _model(act="gelu")
    gelu.model.norm = ScaledNorm()
    assert use_fused_layers(gelu) == 2 * LAYERS  # the layers' norms; not the GELU MLPs, not the other norm
    assert "forward" not in vars(gelu.model.norm) and "forward" not in vars(gelu.model.layers[0].mlp)
    assert use_fused_layers(gelu) == 0  # once
    # the replacement lives on the instances: saved checkpoints and copies are ordinary
    gelu.save_pretrained(tmp_path)
    copied = copy.deepcopy(gelu)
    assert copied.model.layers[0].input_layernorm.forward.__self__ is copied.model.layers[0].input_layernorm


def test_every_trained_model_gets_them(make_config, tiny_llama, tmp_path):
    """prepare_method, which every task trains through, applies them (here: sft with LoRA on the tiny llama)."""
    from conftest import write_jsonl
    from tunelab.config import load_config
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    rows = [{"prompt": f"say {w} {i}", "response": w} for i in range(6) for w in ["good", "bad"]]
    path = make_config(method={"name": "lora", "r": 4}, model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)),
                             "split": {"validation": 0, "test": 0}, "leakage": "ignore"}, train={"max_steps": 1})
    config = load_config(path)
    trainer, *_ = TASKS["sft"].build_trainer(config, load_splits(config), str(tiny_llama), RunDir(tmp_path / "x"))
    replaced = [type(m).__name__ for m in trainer.model.modules() if "forward" in vars(m)
                and getattr(m.forward, "__func__", None) in (fused._norm_forward, fused._mlp_forward)]
    assert "LlamaRMSNorm" in replaced and "LlamaMLP" in replaced
