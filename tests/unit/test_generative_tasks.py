"""causal_lm, seq2seq, multitask + replay, and the methods' user-facing errors, end to end on tiny models."""
import json

import pytest

import tunelab
from conftest import write_jsonl
from tunelab.config import load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.tasks import load_splits

WORDS = ["good", "bad", "great", "awful", "fine", "dull", "sharp", "slow"]


def test_causal_lm_end_to_end(make_config, tiny_llama, tmp_path, capsys):
    from tunelab.cli import main

    docs = [{"text": " ".join(WORDS[(i + j) % 8] for j in range(5 + i % 30))} for i in range(60)]
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    path = make_config(method={"name": "lora", "r": 4}, name="clm", task="causal_lm",
                       model={"name": str(tiny_llama), "max_length": 16},
                       data={"train": str(data), "text": "text", "split": {"validation": 0.2, "test": 0.2}},
                       train={"max_steps": 4, "packing": True})
    result = tunelab.train(path)
    m = result.metrics
    assert m["test"]["perplexity"] > 1 and m["validation"]["loss"] > 0
    assert "chrf" not in m["test"]  # raw text: perplexity only
    # long documents are cut into max_length pieces when packing, none lost
    assert m["train"]["encoded"]["train"]["examples"] > len(load_splits(result.config).train)
    assert result.manifest["tokens_per_s"] > 0
    gen = tunelab.load(result.path)
    assert gen.render("good bad") == "good bad"  # raw continuation, no template
    # any other text file: perplexity of the run on it (what fine-tuning did to general text)
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "good bad great"}, {"text": "slow sharp dull fine"}])
    assert main(["eval", str(result.path), "--data", str(other)]) == 0
    saved = json.loads((result.path / "evaluations" / "other.json").read_text())
    assert saved["perplexity"] > 1 and "chrf" not in saved


def test_causal_lm_refuses_empty_text_and_classify_keys(make_config, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "good"}] * 5 + [{"text": "  "}])
    path = make_config(name="clm", task="causal_lm", model={"name": str(tiny_llama)},
                       data={"train": str(data), "text": "text"})
    with pytest.raises(TunelabError, match=r"docs\.jsonl: 1 row\(s\) with an empty `text` \(rows 6\)"):
        tunelab.train(path)
    path = make_config(name="clm2", task="causal_lm", model={"name": str(tiny_llama)},
                       data={"train": str(data), "label": "y"})
    with pytest.raises(ConfigError, match="data.label do\\(es\\) not apply to task causal_lm"):
        load_config(path)


def test_seq2seq_bert2bert_end_to_end(make_config, tiny_bert, tmp_path):
    rows = [{"prompt": f"the {w} film", "response": f"{w} film"} for w in WORDS * 8]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    path = make_config(method="full", name="s2s", task="seq2seq",
                       data={"train": str(data), "split": {"validation": 0.2, "test": 0.2}, "leakage": "ignore"},
                       train={"max_steps": 4, "lr": 1e-3}, eval={"max_new_tokens": 4})
    result = tunelab.train(path)
    m = result.metrics
    assert "chrf" in m["test"] and m["validation"]["loss"] > 0
    from transformers import AutoModelForSeq2SeqLM

    # the saved folder is a plain encoder-decoder that loads with AutoModelForSeq2SeqLM
    model = AutoModelForSeq2SeqLM.from_pretrained(result.path / "model")
    assert model.config.is_encoder_decoder
    saved = [json.loads(x) for x in (result.path / "predictions_test.jsonl").read_text().split("\n") if x]
    again = tunelab.load(result.path).generate([s["prompt"] for s in saved], max_new_tokens=4)
    assert again == [s["generated"] for s in saved]


def test_seq2seq_has_no_chat_format(make_config, tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(20)])
    path = make_config(name="s2s", task="seq2seq", data={"train": str(data), "prompt_format": "chat"})
    with pytest.raises(TunelabError, match="prompt_format chat does not apply to task seq2seq"):
        tunelab.train(path)


def test_multitask_weights_replay_and_per_task_metrics(make_config, tiny_llama, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"en": f"say {w} {i}", "fr": w} for i, w in enumerate(WORDS * 5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"is {w} {i}", "label": w} for i, w in enumerate(WORDS * 5)])
    replay = write_jsonl(tmp_path / "r.jsonl", [{"body": " ".join(WORDS[i:] + WORDS[:i])} for i in range(8)] * 4)
    path = make_config(method={"name": "lora", "r": 4}, name="multi", task="sft",
                       model={"name": str(tiny_llama)},
                       data={"train": None, "prompt": "en", "response": "fr",
                             "split": {"validation": 0.2, "test": 0.2},
                             "datasets": [{"train": str(a), "instruction": "translate"},
                                          {"train": str(b), "name": "sentiment", "prompt": "text",
                                           "response": "label", "instruction": "classify", "weight": 0.5}],
                             "replay": {"train": str(replay), "text": "body", "fraction": 0.25}},
                       train={"max_steps": 3}, eval={"max_new_tokens": 3, "max_generate": 8})
    config = load_config(path)
    splits = load_splits(config)
    counts = splits.train["_task"].value_counts().to_dict()
    assert counts["a"] == 24 and counts["sentiment"] == 12  # 40 rows → 24 train each; weight 0.5 → 12
    assert len(splits.replay) == 9  # 25% of 36
    convs = list(splits.train["_conv"])
    assert {c.data.instruction for c in convs} == {"translate", "classify"}
    result = tunelab.train(path)
    assert set(result.metrics["test_by_task"]) == {"a", "sentiment"}
    saved = [json.loads(x) for x in (result.path / "predictions_test.jsonl").read_text().split("\n") if x]
    assert {s["task"] for s in saved} == {"a", "sentiment"} and len(saved) == 8  # equal share of max_generate
    assert any(s["prompt"].startswith("classify") or "classify" in s["prompt"] for s in saved)


def test_multitask_config_errors(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model: {name: x}\ntask: sft\nmethod: lora\n"
                    "data:\n  train: a.jsonl\n  datasets: [{train: b.jsonl, wieght: 2}]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "`data.datasets.0.wieght`: unknown key; did you mean `weight`?" in str(err.value)


def test_packing_with_prompt_tuning_is_refused(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("model: {name: x}\ntask: sft\nmethod: prompt\ndata: {train: a.jsonl}\ntrain: {packing: true}\n")
    with pytest.raises(ConfigError, match="train.packing cannot be used with method prompt"):
        load_config(path)


def test_qlora_check_reports_a_missing_backend(monkeypatch):
    import bitsandbytes.functional as F

    from tunelab.methods import qlora

    qlora.check(qlora.Options(bits=4))  # this machine's bitsandbytes quantizes (on the CPU, or CUDA where present)

    def broken(*a, **k):
        raise NotImplementedError("no kernel for this device")

    monkeypatch.setattr(F, "quantize_4bit", broken)
    with pytest.raises(RuntimeError, match="cannot quantize to 4-bit on (cpu|cuda) .*use method lora"):
        qlora.check(qlora.Options(bits=4))


def test_qlora_trains_a_quantized_base(make_config, tiny_llama, tmp_path):
    rows = [{"prompt": f"say {w}", "response": w} for w in WORDS * 6]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "qlora", "bits": 8, "r": 4, "target_modules": ["q_proj", "v_proj"]}, name="q",
                       model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(data), "split": {"validation": 0, "test": 0.2}, "leakage": "ignore"},
                       train={"max_steps": 2, "precision": "bf16"}, eval={"max_new_tokens": 2})
    result = tunelab.train(path)
    assert (result.path / "model" / "adapter_model.safetensors").exists()
    cfg = json.loads((result.path / "model" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


def test_adapter_sft_run_saves_only_what_trained(make_config, tiny_llama, tmp_path):
    rows = [{"prompt": f"say {w}", "response": w} for w in WORDS * 6]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "adapter", "size": 4}, name="ad", model={"name": str(tiny_llama)},
                       task="sft", data={"train": str(data), "split": {"validation": 0, "test": 0.2},
                                         "leakage": "ignore"},
                       train={"max_steps": 2}, eval={"max_new_tokens": 3})
    result = tunelab.train(path)
    from safetensors.torch import load_file

    saved = load_file(result.path / "model" / "bottleneck.safetensors")
    assert saved and all(".bottleneck." in k for k in saved)
    assert not (result.path / "model" / "model.safetensors").exists()
    rows = [json.loads(x) for x in (result.path / "predictions_test.jsonl").read_text().split("\n") if x]
    assert tunelab.load(result.path).generate([r["prompt"] for r in rows], max_new_tokens=3) == \
        [r["generated"] for r in rows]


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_prompt_learning_runs_with_validation_finish(name, make_config, tiny_llama, tmp_path):
    """transformers cannot reload a prefix/prompt checkpoint as the best model; the run must still finish,
    with the final model, and the validation loss of that final model."""
    rows = [{"prompt": f"say {w}", "response": w} for w in WORDS * 6]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    options = {"name": name, "virtual_tokens": 4, **({"projection": True} if name == "prefix" else {})}
    path = make_config(method=options, name=name, model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(data), "split": {"validation": 0.2, "test": 0.2}, "leakage": "ignore"},
                       train={"max_steps": 4, "eval_every": 2}, eval={"max_new_tokens": 2})
    result = tunelab.train(path)
    evals = [json.loads(x) for x in (result.path / "metrics.jsonl").read_text().split("\n") if "eval_loss" in x]
    assert len(evals) == 2 and result.metrics["validation"]["loss"] == evals[-1]["eval_loss"]
    bad = make_config(method=options, name=f"{name}-es", model={"name": str(tiny_llama)}, task="sft",
                      data={"train": str(data)}, train={"early_stopping_patience": 2})
    with pytest.raises(ConfigError, match="early_stopping_patience cannot be used with method"):
        load_config(bad)


def test_forgetting_is_measured_on_general_text_by_default(make_config, tiny_llama, tmp_path):
    rows = [{"prompt": f"say {w}", "response": w} for w in WORDS * 6]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method="full", name="forget", model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(data), "split": {"validation": 0, "test": 0.2}, "leakage": "ignore"},
                       train={"max_steps": 3, "lr": 1e-2},
                       eval={"max_new_tokens": 2, "forgetting": "sample:sotu", "forgetting_max": 5})
    f = tunelab.train(path).metrics["forgetting"]
    assert f["data"] == "sample:sotu" and f["documents"] == 5
    assert f["ratio"] == pytest.approx(f["perplexity"] / f["base_perplexity"], rel=1e-6)
    assert f["ratio"] != pytest.approx(1.0, abs=1e-4)  # full fine-tuning at a high rate changed the model
    # the forgetting text being the training text is no measure: skipped, with the reason
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": " ".join(WORDS[i:])} for i in range(8)] * 3)
    path = make_config(method="full", name="forget2", model={"name": str(tiny_llama)}, task="causal_lm",
                       data={"train": str(docs), "split": {"validation": 0, "test": 0.2}, "leakage": "ignore"},
                       train={"max_steps": 1}, eval={"forgetting": str(docs)})
    assert tunelab.train(path).metrics["forgetting"]["skipped"] == "this text is part of the training data"


def test_causal_lm_streaming_trains_from_a_stream(make_config, tiny_llama, tmp_path, monkeypatch):
    """data.streaming: the train file is read row by row while training (never as a table), leaked documents are
    skipped and counted, and the same documents give the same model as the whole-file run with the same order."""
    from tunelab.data import load as load_module

    docs = [{"text": " ".join(WORDS[(i + j) % 8] for j in range(4 + i % 9)) + f" {i}"} for i in range(40)]
    held = [{"text": "slow sharp dull fine"}, {"text": docs[3]["text"]}]  # the second one leaks
    train = write_jsonl(tmp_path / "docs.jsonl", docs)
    test = write_jsonl(tmp_path / "test.jsonl", held)
    common = dict(task="causal_lm", method={"name": "lora", "r": 4}, model={"name": str(tiny_llama),
                  "max_length": 16}, train={"max_steps": 3, "packing": False, "batch_size": 2})
    path = make_config(name="stream", data={"train": str(train), "test": str(test), "streaming": True}, **common)
    real = load_module.read_table
    monkeypatch.setattr(load_module, "read_table",  # only the test file is read as a whole table
                        lambda spec: real(spec) if spec != str(train) else pytest.fail("train read as a table"))
    result = tunelab.train(path)
    enc = result.metrics["train"]["encoded"]["train"]
    assert enc["streamed"] and enc["leaked_skipped"] == 1
    assert 6 <= enc["examples"] <= 40  # 3 steps × 2 rows consumed (plus the stream's read-ahead)
    assert result.manifest["examples"]["train"] is None and result.manifest["examples"]["test"] == 2
    assert result.metrics["test"]["perplexity"] > 1


def test_streaming_config_and_row_errors(make_config, tiny_llama, tmp_path):
    train = write_jsonl(tmp_path / "docs.jsonl", [{"text": "good bad"}] * 3 + [{"text": 7}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "fine"}])
    path = make_config(name="s1", task="causal_lm", model={"name": str(tiny_llama)},
                       data={"train": str(train), "streaming": True})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.streaming needs train.max_steps" in str(err.value)
    assert "data.streaming needs data.validation and/or data.test" in str(err.value)
    path = make_config(name="s2", task="sft", model={"name": str(tiny_llama)}, train={"max_steps": 2},
                       data={"train": str(train), "test": str(test), "streaming": True})
    with pytest.raises(ConfigError, match="data.streaming applies to task\\(s\\) causal_lm, not sft"):
        load_config(path)
    path = make_config(name="s3", task="causal_lm", model={"name": str(tiny_llama), "max_length": 8},
                       train={"max_steps": 5, "batch_size": 4},
                       data={"train": str(train), "test": str(test), "streaming": True})
    with pytest.raises(TunelabError, match=r"docs\.jsonl, row 4: `text` holds an integer \(7\), not text"):
        tunelab.train(path)
