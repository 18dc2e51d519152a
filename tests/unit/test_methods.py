"""Each method trains exactly the parameters it promises: check after one real optimizer step."""
import pytest
import torch

from tunelab.methods import METHODS
from tunelab.methods.freezing import (
    count_parameters,
    modules_after_blocks,
    transformer_blocks,
)
from tunelab.tasks.classifier import load_model

LABELS = ["negative", "positive"]


def one_step(model, tokenizer):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["a great film", "an awful plot"], padding=True, return_tensors="pt")
    model.train()
    loss = model(**batch, labels=torch.tensor([1, 0])).loss
    loss.backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def prepared(tiny_bert, name, **opts):
    tokenizer, model, new = load_model(str(tiny_bert), LABELS)
    options = METHODS[name].Options(name=name, **opts)
    return tokenizer, METHODS[name].prepare(model, options, new), new


def test_new_modules_are_the_head(tiny_bert):
    _, _, new = load_model(str(tiny_bert), LABELS)
    assert new == ["classifier"]


def test_block_detection(tiny_bert):
    _, model, _ = load_model(str(tiny_bert), LABELS)
    name, blocks = transformer_blocks(model)
    assert name == "bert.encoder.layer" and len(blocks) == 2
    assert modules_after_blocks(model, name) == ["bert.pooler.dense"] * 2 + ["classifier"] * 2


def test_head_trains_only_the_output_layers(tiny_bert):
    tokenizer, model, _ = prepared(tiny_bert, "head")
    changed = one_step(model, tokenizer)
    assert changed == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def test_last_layers_trains_last_block_and_above(tiny_bert):
    tokenizer, model, _ = prepared(tiny_bert, "last_layers", layers=1)
    changed = one_step(model, tokenizer)
    assert changed and all(n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in changed)
    assert any(n.startswith("bert.encoder.layer.1.") for n in changed)
    assert not any(n.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for n in changed)


def test_last_layers_more_than_the_model_has(tiny_bert):
    with pytest.raises(ValueError, match="only 2 blocks"):
        prepared(tiny_bert, "last_layers", layers=3)


def test_full_trains_everything(tiny_bert):
    tokenizer, model, _ = prepared(tiny_bert, "full")
    changed = one_step(model, tokenizer)
    assert count_parameters(model)["percent"] == 100.0
    # every parameter with a gradient path changes (the token_type / position rows not used do not get grads)
    assert {n for n in changed if "encoder.layer.0" in n} and "classifier.weight" in changed


@pytest.mark.parametrize("dora", [False, True])
def test_lora_trains_adapters_and_head_only(tiny_bert, dora):
    tokenizer, model, _ = prepared(tiny_bert, "lora", r=4, dora=dora)
    changed = one_step(model, tokenizer)
    assert changed
    for n in changed:
        assert "lora_" in n or "modules_to_save" in n, n
    assert any("modules_to_save" in n and "classifier" in n for n in changed)
    assert any("lora_magnitude" in n for n in changed) == dora
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in changed if "lora_A" in n}
    assert targets == {"query", "key", "value"}
    assert count_parameters(model)["percent"] < 15


def test_lora_explicit_targets(tiny_bert):
    _, model, _ = prepared(tiny_bert, "lora", target_modules=["dense"])
    assert any(".dense.lora_A" in n for n, _ in model.named_parameters())
    assert not any(".query.lora_A" in n for n, _ in model.named_parameters())
