"""Every parameter-efficient method: what trains, and that a saved-and-reloaded run computes exactly what the
in-memory model computed (greedy generations of a causal LM, class logits of a classifier)."""
import json

import pytest
import torch

from tunelab.methods import METHODS
from tunelab.methods.freezing import count_parameters
from tunelab.models.saved import load_saved

GENERATIVE = {"lora": {}, "dora": {}, "prefix": {"virtual_tokens": 4}, "prompt": {"virtual_tokens": 4},
              "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
              "adapter": {"size": 8}}


def _train_a_little(model):
    """Move every trainable tensor off its initial value (LoRA's B and the adapters' up start at zero, which
    would make any reload look right)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


def _save(model, name, directory):
    save = getattr(METHODS[name], "save", None)
    directory.mkdir(parents=True, exist_ok=True)
    save(model, directory) if save else model.save_pretrained(directory)


@pytest.mark.parametrize("name", list(GENERATIVE))
def test_reloaded_generative_adapter_generates_what_the_trained_model_did(name, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)

    torch.manual_seed(0)
    options = METHODS[name].Options(name=name, **GENERATIVE[name])
    model = METHODS[name].prepare(base(), options, [], task_type="CAUSAL_LM", model_dir=str(tiny_llama))
    counts = count_parameters(model)
    assert 0 < counts["trainable"] < 0.2 * counts["total"], counts
    _train_a_little(model)
    prompt = torch.tensor([[5, 9, 17, 3, 40, 2]])
    model.eval()
    before = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                            do_sample=False, pad_token_id=1)
    with torch.no_grad():
        changed = (model(input_ids=prompt).logits[0, -1] - base()(input_ids=prompt).logits[0, -1]).abs().max()
    assert changed > 1e-3, "the perturbed method should change the model's output"
    _save(model, name, tmp_path / "model")
    reloaded = load_saved(tmp_path / "model", AutoModelForCausalLM, base).eval()
    after = reloaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False, pad_token_id=1)
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", ["lora", "prefix", "prompt", "ia3", "adapter"])
def test_reloaded_classifier_adapter_gives_the_same_logits(name, tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.tasks.classifier import load_model

    labels = ["neg", "pos"]
    torch.manual_seed(0)
    _, model, new = load_model(str(tiny_bert), labels)
    extra = {"ia3": {"target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]},
             "prefix": {"virtual_tokens": 4}, "prompt": {"virtual_tokens": 4}}.get(name, {})
    model = METHODS[name].prepare(model, METHODS[name].Options(name=name, **extra), new, task_type="SEQ_CLS")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable), "the new head must train with the adapter"
    _train_a_little(model)
    enc = AutoTokenizer.from_pretrained(tiny_bert)(["a great film", "dull and long"], return_tensors="pt",
                                                    padding=True)
    model.eval()
    with torch.no_grad():
        before = model(**enc).logits
    _save(model, name, tmp_path / "model")
    reloaded = load_saved(tmp_path / "model", AutoModelForSequenceClassification,
                          lambda: load_model(str(tiny_bert), labels)[1]).eval()
    with torch.no_grad():
        after = reloaded(**enc).logits
    torch.testing.assert_close(before, after, rtol=0, atol=1e-6)


def test_adapter_starts_as_the_identity(tiny_llama):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        expected = base(ids).logits
        wrapped = METHODS["adapter"].prepare(base, METHODS["adapter"].Options(size=8), [])
        torch.testing.assert_close(wrapped(ids).logits, expected, rtol=0, atol=0)
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all(".bottleneck." in n for n in names)
    assert sum(n.endswith("o_proj.bottleneck.down.weight") for n in names) == 2  # one per block
    assert sum(n.endswith("down_proj.bottleneck.down.weight") for n in names) == 2


def test_ia3_list_without_feedforward_modules_is_explained(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="feedforward_modules must name"):
        METHODS["ia3"].prepare(model, METHODS["ia3"].Options(target_modules=["k_proj"]), [], task_type="CAUSAL_LM")


def test_per_method_default_learning_rates():
    from tunelab.config import Config

    lrs = {name: Config.model_validate({"model": {"name": "x"}, "task": "sft", "method": name,
                                        "data": {"train": "a.jsonl"}}).lr for name in GENERATIVE}
    # PEFT's own comparisons: prompt/prefix learning fails at LoRA's rate; they need far higher ones
    assert lrs["prompt"] > lrs["prefix"] > lrs["ia3"] > lrs["lora"]


@pytest.mark.parametrize("name", ["prompt", "prefix", "lora", "ia3", "adapter"])
def test_generator_loss_matches_the_models_own_loss(name, tiny_llama):
    """Test perplexity is computed by Generator.loss; with virtual tokens prepended it must still line up."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import Config
    from tunelab.tasks.generate import Generator

    torch.manual_seed(0)
    model = METHODS[name].prepare(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                  METHODS[name].Options(name=name, **GENERATIVE[name]), [], task_type="CAUSAL_LM")
    _train_a_little(model)
    config = Config.model_validate({"model": {"name": "x"}, "task": "sft", "method": name,
                                    "data": {"train": "a.jsonl"}})
    rows = [{"input_ids": [5, 9, 17, 3, 40, 1], "completion_mask": [0, 0, 0, 1, 1, 1]},
            {"input_ids": [7, 8, 1], "completion_mask": [0, 1, 1]}]
    model.eval()  # no dropout, as the Generator evaluates
    with torch.no_grad():  # before the Generator, which places the model on the GPU where there is one
        expected = []
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.where(torch.tensor([r["completion_mask"]]).bool(), ids, -100)
            expected.append((model(input_ids=ids, labels=labels).loss.item(), sum(r["completion_mask"][1:])))
    mean = sum(loss * n for loss, n in expected) / sum(n for _, n in expected)
    gen = Generator(config, AutoTokenizer.from_pretrained(tiny_llama), model)
    assert gen.loss(rows) == pytest.approx(mean, rel=1e-5)


def _tuned_generator(name, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import Config
    from tunelab.tasks.generate import Generator

    torch.manual_seed(0)
    model = METHODS[name].prepare(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
                                  METHODS[name].Options(name=name, **GENERATIVE[name]), [], task_type="CAUSAL_LM",
                                  model_dir=str(tiny_llama))
    _train_a_little(model)
    config = Config.model_validate({"model": {"name": str(tiny_llama)}, "task": "sft", "method": name,
                                    "data": {"train": "a.jsonl"}, "eval": {"forgetting_max": 4}})
    return config, Generator(config, AutoTokenizer.from_pretrained(tiny_llama), model.eval())


def test_generator_loss_projects_only_the_trained_positions(tiny_llama, monkeypatch):
    """The vocabulary projection runs on trained tokens only (head_loss, in slices), in length-sorted batches."""
    from tunelab.tasks import sft_trainer

    _, gen = _tuned_generator("lora", tiny_llama)
    rows = [{"input_ids": list(range(5, 5 + n)), "completion_mask": [0] * (n - 3) + [1] * 3} for n in (30, 6, 12, 4)]
    seen = []
    projected = sft_trainer.head_loss

    def head_loss(hidden, *args, **kwargs):
        seen.append(tuple(hidden.shape))
        return projected(hidden, *args, **kwargs)

    monkeypatch.setattr(sft_trainer, "head_loss", head_loss)
    value = gen.loss(rows, max_tokens=24)
    # each row's 3 trained tokens are predicted from the 3 positions before them: 12 projected, not 52 * 4
    assert sum(shape[0] for shape in seen) == 12 and all(len(shape) == 2 for shape in seen)
    assert len(seen) == 3  # lengths 4, 6, 12 | ... : (4, 6) fit 24 padded tokens, 12 then 30 do not
    each = [gen.loss([r]) for r in rows]  # one row at a time: no batching, no padding
    assert value == pytest.approx(sum(each) / len(each), rel=1e-5)


@pytest.mark.parametrize("name", ["lora", "prompt", "ia3"])
def test_forgetting_switches_the_adapter_off_instead_of_loading_the_base(name, tiny_llama, monkeypatch):
    """Forgetting's base perplexity from the tuned model with its adapter off equals the separately loaded base's,
    and no second model is loaded."""
    from tunelab.tasks.generate import Generator
    from tunelab.tasks.generative import forgetting

    config, gen = _tuned_generator(name, tiny_llama)
    config = config.model_copy(update={"model": config.model.model_copy(update={"max_length": 32})})
    expected = forgetting(config, gen, Generator.base(config))
    monkeypatch.setattr(Generator, "base", classmethod(lambda cls, c: pytest.fail("a second model was loaded")))
    got = forgetting(config, gen)
    assert got["base_perplexity"] == pytest.approx(expected["base_perplexity"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert got["ratio"] != pytest.approx(1.0, abs=1e-3)  # the adapter was back on for the tuned figure


def test_generate_batches_by_length_and_answers_in_the_callers_order(tiny_llama):
    _, gen = _tuned_generator("lora", tiny_llama)
    prompts = ["the cat sat on the mat and then it", "a", "the house of the people and the", "it was"]
    alone = [gen.generate([p], max_new_tokens=5)[0] for p in prompts]
    assert len(set(alone)) > 1  # distinguishable answers, so an order mix-up would show
    widths = []
    generate = gen.model.generate
    gen.model.generate = lambda **kw: widths.append(kw["input_ids"].shape[1]) or generate(**kw)
    assert gen.generate(prompts, max_new_tokens=5, batch_size=2) == alone
    # the two short prompts went together: one narrow batch and one wide, not two wide ones
    assert sorted(widths)[0] <= 3 < sorted(widths)[1]


@pytest.mark.parametrize("options", [{"init": "gaussian"}, {"init": "pissa"}, {"init": "olora", "rslora": True},
                                     {"target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"}])
def test_lora_variants_train_what_they_say_and_reload_identically(options, tiny_llama, tmp_path):
    """PEFT's LoRA variants as method options: the adapter starts as the unchanged model (pissa/olora move the
    weights' top part into it), rslora scales by alpha/sqrt(r), a pattern adapts only the layers it matches, and
    a saved run reloads to the same outputs (pissa/olora repeat their decomposition on load)."""
    from transformers import AutoModelForCausalLM

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)

    ids = torch.tensor([[5, 9, 17, 3, 40, 1]])
    with torch.no_grad():
        untouched = base()(input_ids=ids).logits
    lora = METHODS["lora"]
    model = lora.prepare(base(), lora.Options(r=4, alpha=8, dropout=0.0, **options), [], task_type="CAUSAL_LM")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, untouched, atol=1e-4)  # no change before training
    layers = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    if "target_modules" in options:
        assert sorted(n.removeprefix("base_model.model.model.") for n in layers) == [
            "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    module = dict(model.named_modules())[layers[0]]
    assert module.scaling["default"] == pytest.approx(8 / 2 if options.get("rslora") else 8 / 4)
    q = module.base_layer.weight
    original = dict(base().named_parameters())[layers[0].removeprefix("base_model.model.") + ".weight"]
    assert torch.equal(q, original) == (options.get("init") not in ("pissa", "olora"))  # residual kept in base
    _train_a_little(model)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert not torch.allclose(trained, untouched, atol=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_saved(tmp_path / "adapter", None, base).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, trained, atol=1e-5)


def test_qlora_refuses_the_inits_that_decompose_full_precision_weights():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="init pissa decomposes full-precision weights"):
        METHODS["qlora"].Options(init="pissa")


@pytest.mark.parametrize("name", list(GENERATIVE))
def test_bf16_runs_are_evaluated_as_generate_loads_them(name, make_config, tiny_llama, tmp_path):
    """A frozen-base run trained in bf16 is evaluated, generates and serves with its base in bf16 under autocast,
    as it trained: the test predictions are what `tunelab.load(run).generate` gives, the test loss is the fp32
    reload's to bf16 rounding, and merge/export (`full_precision`) still load every weight in fp32."""
    import tunelab
    from conftest import write_jsonl
    from tunelab.tasks import TASKS, load_splits, sft

    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 8]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": name, **GENERATIVE[name]}, model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(data), "split": {"validation": 0, "test": 0.25}, "leakage": "ignore"},
                       train={"max_steps": 3, "precision": "bf16", "lr": 0.05}, eval={"max_new_tokens": 3})
    result = tunelab.train(path)
    assert result.metrics["test"]["precision"] == "bf16"
    gen = tunelab.load(result.path)
    assert gen.bf16 and torch.bfloat16 in {p.dtype for p in gen.model.parameters()}
    saved = [json.loads(x) for x in (result.path / "predictions_test.jsonl").read_text().split("\n") if x]
    assert gen.generate([s["prompt"] for s in saved], max_new_tokens=3) == [s["generated"] for s in saved]
    full = TASKS["sft"].load(result.path, result.config, full_precision=True)
    assert not full.bf16 and all(p.dtype == torch.float32 for p in full.model.parameters())
    test_rows = sft.encode(result.config, load_splits(result.config).test, gen.tokenizer).rows
    assert gen.loss(test_rows) == pytest.approx(result.metrics["test"]["loss"], rel=1e-6)
    assert gen.loss(test_rows) == pytest.approx(full.loss(test_rows), rel=0.03)


def test_the_lm_head_gets_contiguous_hidden_states(tiny_llama):
    """transformers hands the LM head the last position as a strided slice; PyTorch's CPU linear on such an input
    copies the weight once per row (pytorch/pytorch#151934: 0.9 GB and 1.2 s per prefill for SmolLM2 in bf16), so
    the Generator's head makes it contiguous first."""
    _, gen = _tuned_generator("lora", tiny_llama)
    head = gen.model.get_output_embeddings()
    seen = []
    spy = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    gen.generate(["the cat sat on the mat", "a dog"], max_new_tokens=3)
    spy.remove()
    assert len(seen) >= 3 and all(seen)
    x = torch.randn(2, 5, head.in_features)[:, -1:, :]
    assert not x.is_contiguous()
    torch.testing.assert_close(head(x), x @ head.weight.T)
