"""Classification with a decoder-only model (Llama family, like smollm2): pad = EOS, last-token pooling."""
import pytest
import torch

import tunelab
from tunelab.methods import METHODS
from tunelab.methods.freezing import modules_after_blocks, transformer_blocks
from tunelab.methods.lora import auto_targets
from tunelab.tasks.classifier import load_model

LABELS = ["negative", "positive"]


def test_decoder_gets_a_pad_token_and_the_right_parts(tiny_llama):
    tokenizer, model, new = load_model(str(tiny_llama), LABELS)
    assert tokenizer.pad_token == tokenizer.eos_token and model.config.pad_token_id == tokenizer.eos_token_id
    assert new == ["score"]
    blocks, _ = transformer_blocks(model)
    assert blocks == "model.layers"
    assert set(modules_after_blocks(model, blocks)) == {"model.norm", "score"}
    assert auto_targets(model) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_padding_does_not_change_a_decoder_prediction(tiny_llama):
    tokenizer, model, _ = load_model(str(tiny_llama), LABELS)
    model.eval()
    short, long = "a great film", "the plot was thin but the acting was wonderful and the music even better"
    with torch.no_grad():
        alone = model(**tokenizer([short], return_tensors="pt")).logits
        batch = model(**tokenizer([short, long], padding=True, return_tensors="pt")).logits
    assert torch.allclose(alone[0], batch[0], atol=1e-5)  # pooled at the last real token, not at a pad


@pytest.mark.parametrize("method", ["head", {"name": "last_layers", "layers": 1}, {"name": "lora", "r": 4}],
                         ids=["head", "last_layers", "lora"])
def test_decoder_methods_end_to_end(make_config, tiny_llama, method):
    result = tunelab.train(make_config(method=method, name="llama", model={"name": str(tiny_llama)},
                                       train={"max_steps": 4}))
    clf = tunelab.load(result.path)
    texts = ["great phone", "worst service ever"]
    assert clf.predict(texts) == clf.predict(texts[::-1])[::-1]
    name = method if isinstance(method, str) else method["name"]
    if name == "head":
        prepared = METHODS["head"].prepare(load_model(str(tiny_llama), LABELS)[1], METHODS["head"].Options(), ["score"])
        trainable = {n.rsplit(".", 1)[0] for n, p in prepared.named_parameters() if p.requires_grad}
        assert trainable == {"model.norm", "score"}
