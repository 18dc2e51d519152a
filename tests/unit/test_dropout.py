"""Adapter dropout with its CPU mask from NumPy's PCG64 (tunelab/dropout.py): PyTorch's dropout distribution,
seeded by PyTorch's generator, and applied to every LoRA model tunelab trains."""
import pytest
import torch

from tunelab.dropout import LEVELS, CpuDropout


def test_drops_p_of_the_elements_and_keeps_the_expected_value():
    layer = CpuDropout(0.1).train()
    x = torch.ones(512, 1024, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.003)  # 524,288 draws: the standard error is 0.0004
    kept = y[y != 0].detach()
    assert torch.allclose(kept, torch.full_like(kept, LEVELS / (LEVELS - round(0.1 * LEVELS))))
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # unbiased, as PyTorch's dropout
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept elements, scaled alike
    # rows and columns are not correlated: each column and each row drops about p
    per_row, per_col = (y == 0).float().mean(1), (y == 0).float().mean(0)
    assert per_row.std().item() < 0.03 and per_col.std().item() < 0.03


def test_seeded_by_torch_and_a_fresh_mask_per_call():
    layer = CpuDropout(0.3).train()
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    torch.manual_seed(7)
    first, second = layer(x), layer(x)
    torch.manual_seed(7)
    assert torch.equal(layer(x), first) and torch.equal(layer(x), second)  # torch.manual_seed decides it
    assert not torch.equal(first == 0, second == 0)  # but each call draws a new mask
    assert first.dtype == torch.bfloat16


def test_outside_training_and_at_zero_it_is_the_identity():
    x = torch.randn(8, 16)
    assert torch.equal(CpuDropout(0.5).eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)


def test_every_lora_model_gets_it(make_config, tiny_llama, tmp_path):
    """prepare_method, which every task trains through, swaps PEFT's nn.Dropout in `lora_dropout` (here: sft with
    LoRA on the tiny llama, dropout 0.1) and the run trains."""
    from conftest import write_jsonl
    from tunelab.config import load_config
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    rows = [{"prompt": f"say {w} {i}", "response": w} for i in range(6) for w in ["good", "bad"]]
    path = make_config(method={"name": "lora", "r": 4, "dropout": 0.1}, model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)),
                             "split": {"validation": 0, "test": 0}, "leakage": "ignore"}, train={"max_steps": 2})
    config = load_config(path)
    trainer, *_ = TASKS["sft"].build_trainer(config, load_splits(config), str(tiny_llama), RunDir(tmp_path / "x"))
    layers = [d for m in trainer.model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
              for d in m.lora_dropout.values()]
    assert layers and all(type(d) is CpuDropout and d.p == 0.1 for d in layers)
    trainer.train()
    assert trainer.state.global_step == 2


def test_compiled_blocks_keep_dropout_in_the_graph():
    """Inside compiled code (train.compile) it is PyTorch's dropout, which Inductor draws in the graph: NumPy and
    `.item()` there would break the graph of every block."""
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    layer = CpuDropout(0.1).train()
    compiled = torch.compile(lambda x: layer(x) * 2, backend="eager", fullgraph=False)
    x = torch.ones(64, 32, requires_grad=True)
    y = compiled(x)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert (y == 0).any() and (y != 0).any()  # it still drops
