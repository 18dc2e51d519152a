"""In-context learning: label-word scoring (checked against one-sequence-at-a-time likelihoods and a rigged
vocabulary), demonstrations (random and FAISS-retrieved) and the `icl` method end to end on tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tunelab.methods import icl


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    return model, tok


def brute_force(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) from one unpadded sequence."""
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont)))


CONTEXTS = ["a great movie , i loved it . label :", "bad", "the food was cold and the service was slow . label :",
            "not worth it"]


@pytest.mark.parametrize("continuations", [[" good", " bad"], [" very good", " bad", " not bad at all"]])
def test_batched_scores_equal_one_sequence_likelihoods(lm, continuations):
    model, tok = lm
    got = icl.label_logprobs(model, tok, CONTEXTS, continuations, max_length=64, batch_size=3)
    want = np.array([[brute_force(model, tok, c, k) for k in continuations] for c in CONTEXTS])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_rigged_vocabulary_decides_the_label(lm):
    """Boost one label word's logit at every position: that label wins for every text; boost the other: it wins."""
    model, tok = lm
    good, bad, very = (tok.convert_tokens_to_ids(w) for w in ("good", "bad", "very"))
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
    original = model.lm_head
    model.lm_head = head
    try:
        for boosted, expect in ((good, 0), (bad, 1)):
            with torch.no_grad():
                head.bias.zero_()
                head.bias[boosted] = 25.0
            scores = icl.label_logprobs(model, tok, CONTEXTS, [" good", " bad"], max_length=64, batch_size=2)
            assert (scores.argmax(1) == expect).all(), scores
            # multi-token label words go through the other code path: boost "very" too, and the two-token
            # word made of boosted tokens wins over a one-token word that is not boosted
            with torch.no_grad():
                head.bias[very] = 25.0
            words = [" very good", " bad"] if expect == 0 else [" good", " very bad"]
            scores = icl.label_logprobs(model, tok, CONTEXTS, words, max_length=64, batch_size=2)
            assert (scores.argmax(1) == expect).all(), scores
    finally:
        model.lm_head = original


def test_contexts_are_cut_from_the_left(lm):
    model, tok = lm
    long = " ".join(["movie"] * 80) + " label :"
    got = icl.label_logprobs(model, tok, [long], [" good"], max_length=16)
    kept = tok.decode(tok(long)["input_ids"][-15:])
    assert got[0, 0] == pytest.approx(brute_force(model, tok, kept, " good"), abs=1e-4)


def test_template_checks():
    with pytest.raises(ValueError, match="end with"):
        icl.Options(templates=["{label} is the answer for {text}"])
    with pytest.raises(ValueError, match="only"):
        icl.Options(templates=["{text} {stars} {label}"])
    assert icl.split_template("Review: {text}\nSentiment: {label}") == ("Review: {text}\nSentiment:", " ")


def _pool():
    return [{"text": "a great movie , loved it", "label": "positive"},
            {"text": "terrible food , cold and slow", "label": "negative"},
            {"text": "great service and great food", "label": "positive"},
            {"text": "the movie was boring and bad", "label": "negative"}]


def test_random_demonstrations_are_seeded_per_text(lm):
    model, tok = lm
    learner = icl.ICL(icl.Options(shots=2), ["negative", "positive"], _pool(), model, tok, 64)
    first = learner.demonstrations(["one text", "another text"])
    assert learner.demonstrations(["another text", "one text"]) == first[::-1]  # order-independent
    assert all(len(d) == 2 for d in first)
    prompt = learner.prompts(["one text"], None, "Text: {text}\nLabel: {label}")[0]
    # two solved demonstrations, then the query without its label
    assert prompt.count("Label:") == 3 and prompt.endswith("Text: one text\nLabel:")
    assert prompt.split("\n\n")[0] in {f"Text: {d['text']}\nLabel: {d['label']}" for d in _pool()}


def test_retrieved_demonstrations_are_the_nearest_and_never_the_query(lm, tiny_bert, tmp_path):
    model, tok = lm
    retriever = icl.Retriever(str(tiny_bert))
    pool = _pool()
    retriever.build([r["text"] for r in pool])
    retriever.save(tmp_path / "demos.faiss")
    reloaded = icl.Retriever.load(str(tiny_bert), tmp_path / "demos.faiss")
    vectors = reloaded.embed([r["text"] for r in pool])
    query = "the movie was boring and bad"  # a pool text: it must not be its own demonstration
    learner = icl.ICL(icl.Options(shots=2, demos="retrieved"), ["negative", "positive"], pool, model, tok, 64,
                      reloaded)
    demos = learner.demonstrations([query])[0]
    assert query not in [d["text"] for d in demos] and len(demos) == 2
    similarity = vectors @ reloaded.embed([query])[0]
    ranked = [pool[i]["text"] for i in np.argsort(-similarity) if pool[i]["text"] != query]
    assert [d["text"] for d in demos] == ranked[:2][::-1]  # nearest last, right before the query


def test_icl_run_end_to_end(make_config, tiny_llama, tiny_bert, tmp_path):
    from tunelab import load
    from tunelab.train import train

    templates = ["Text: {text}\nLabel: {label}", "{text}\nIs it {labels}? {label}"]
    path = make_config(method={"name": "icl", "shots": 2, "demos": "retrieved", "retriever": str(tiny_bert),
                               "templates": templates}, model={"name": str(tiny_llama), "max_length": 128},
                       name="icl")
    result = train(path)
    m = result.metrics
    assert m["params"]["trainable"] == 0
    assert set(m["train"]["templates"]) == set(templates)  # every template scored on validation
    chosen = m["train"]["template"]
    assert m["train"]["templates"][chosen]["f1_macro"] == max(t["f1_macro"] for t in m["train"]["templates"].values())
    model_dir = result.path / "model"
    assert (model_dir / "demos.faiss").exists()
    assert json.loads((model_dir / "icl.json").read_text())["template"] == chosen
    # the saved run predicts as the evaluation did (same prompts, same demonstrations, from the saved index)
    rows = [json.loads(x) for x in (result.path / "predictions_test.jsonl").read_text().split("\n") if x.strip()]
    clf = load(result.path)
    assert clf.predict([r["text"] for r in rows]) == [r["predicted"] for r in rows]
    assert 0 <= m["test"]["accuracy"] <= 1


def test_icl_refuses_an_encoder_before_any_work(make_config, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.train import train

    path = make_config(method={"name": "icl"}, name="icl-bert")  # tiny BERT: no causal LM head
    with pytest.raises(TunelabError, match="encoder"):
        train(path)
    assert not (tmp_path / "runs" / "icl-bert").exists()
