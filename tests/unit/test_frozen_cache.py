"""Frozen-prefix caching (head, last_layers): cached logits are the model's own, the saved model is the ordinary
one, an uncached example is refused, and the memory bound turns the cache off."""
import json

import pytest
import torch
from transformers import DataCollatorWithPadding

from conftest import sample_rows
from tunelab import load, train
from tunelab.methods import METHODS
from tunelab.methods.frozen_cache import FrozenCache
from tunelab.tasks.classifier import load_model

LABELS = ["negative", "positive"]


def _prepared(path, method, **options):
    tokenizer, model, new = load_model(str(path), LABELS)
    return tokenizer, METHODS[method].prepare(model, METHODS[method].Options(**options), new)


@pytest.mark.parametrize("model_fixture,method,options,frozen", [
    ("tiny_bert", "head", {}, 2), ("tiny_bert", "last_layers", {"layers": 1}, 1),
    ("tiny_llama", "last_layers", {"layers": 1}, 1)], ids=["bert-head", "bert-last1", "llama-last1"])
def test_cached_logits_equal_the_models(request, model_fixture, method, options, frozen):
    tokenizer, model = _prepared(request.getfixturevalue(model_fixture), method, **options)
    texts = [r["text"] for r in sample_rows(12)]
    examples = [dict(tokenizer(t, truncation=True, max_length=64)) for t in texts]
    collator = DataCollatorWithPadding(tokenizer)
    batch = collator(examples[3:9])  # padded to this batch's longest, unlike the caching pass's batches
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    cache = FrozenCache(model, tokenizer.pad_token_id)
    assert cache.k == frozen
    assert cache.build([examples], collator, batch_size=5, autocast=False) == len(set(texts))
    cache.install()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():  # the frozen part does not run any more: poisoning its weights changes nothing
            for p in cache.blocks[0].parameters():
                p.fill_(float("nan"))
            got = model(**batch).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # an example never cached is refused, not silently recomputed
        with pytest.raises(RuntimeError, match="not cached"):
            model(**collator([dict(tokenizer("a sentence nobody cached at all"))]))
    finally:
        cache.remove()
        model.load_state_dict(saved)
    keys = set(model.state_dict())
    with torch.no_grad():  # the modules have their own forward again
        torch.testing.assert_close(model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert keys == set(model.state_dict())


def test_cached_training_saves_an_ordinary_model(make_config):
    path = make_config(method="head", name="cached", train={"epochs": 2})
    result = train(path)
    cache = result.metrics["train"]["frozen_cache"]
    assert cache["used"] and cache["frozen_blocks"] == 2 and cache["examples"] > 100
    assert len(result.metrics["train"]["epoch_s"]) == 2
    # the saved model predicts through its own (uncached) forward and reproduces the metrics written
    clf = load(result.path)
    test = [json.loads(line) for line in (result.path / "predictions_test.jsonl").read_text().split("\n") if line]
    assert clf.predict([r["text"] for r in test[:20]]) == [r["predicted"] for r in test[:20]]


def test_memory_bound_turns_the_cache_off(make_config, capsys):
    path = make_config(method="head", name="bound", train={"cache_frozen_mb": 0})
    result = train(path)
    assert result.metrics["train"]["frozen_cache"]["used"] is False
    assert "not caching the frozen layers" in capsys.readouterr().out
