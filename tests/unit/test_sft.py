"""sft: row layouts, rendering, loss masks, EOS, overflow, bad rows, and a tiny end-to-end run."""
import json
import os

import pytest
import torch

import tunelab
from conftest import write_jsonl
from tunelab.config import Config, load_config
from tunelab.errors import ConfigError, DataError
from tunelab.tasks import load_splits, sft

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def cfg(train, tmp_path=None, **data) -> Config:
    return Config.model_validate({"model": {"name": "x"}, "task": "sft", "method": "lora",
                                  "data": {"train": str(train), **data}})


@pytest.fixture
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def chat_tok(tok):
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_layouts_are_detected(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "say hi", "input": "", "output": "hi"}] * 3 +
                         [{"instruction": "add", "input": "1 and 2", "output": "3"}])
    convs = list(load_splits(cfg(alpaca, split={"validation": 0, "test": 0}, leakage="ignore")).train["_conv"])
    assert {c.turns[0]["input"] for c in convs} == {None, "1 and 2"}
    pr = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "response": f"r{i}"} for i in range(10)])
    conv = load_splits(cfg(pr)).train["_conv"].iloc[0]
    assert conv.turns[0]["input"] is None and conv.turns[0]["response"].startswith("r")
    chat = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": f"u{i}"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"}]} for i in range(10)])
    conv = load_splits(cfg(chat)).train["_conv"].iloc[0]
    assert conv.system == "be nice" and [t["response"] for t in conv.turns] == ["a1", "a2"]


def test_unknown_role_and_missing_output_name_the_row(tmp_path):
    bad = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "bot", "content": "yo"}]}])
    with pytest.raises(DataError, match=r"roles\.jsonl: row 1: message 2 has role 'bot'; allowed: system, user"):
        load_splits(cfg(bad))
    rows = [{"instruction": f"i{i}", "output": f"o{i}"} for i in range(8)] + [{"instruction": "no answer"}]
    missing = write_jsonl(tmp_path / "alp.jsonl", rows)
    with pytest.raises(DataError, match=r"row 9: `output` is missing or empty.*data.bad_rows: drop"):
        load_splits(cfg(missing))
    kept = load_splits(cfg(missing, bad_rows="drop", split={"validation": 0, "test": 0}))
    assert len(kept.train) == 8


def test_sharegpt_rows_train_as_the_same_chat(tmp_path, chat_tok):
    """ShareGPT rows (conversations: [{from: system|human|gpt, value}], detected by the column) are the same
    conversations as the {role, content} messages — so they encode to the same training examples; an unknown
    `from` is an error naming the row and the message."""
    turns = [("system", "be nice"), ("human", "u{i}"), ("gpt", "a1"), ("human", "u2"), ("gpt", "a2")]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": f, "value": v.format(i=i)}
                                                                      for f, v in turns]} for i in range(10)])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": roles[f], "content": v.format(i=i)}
                                                               for f, v in turns]} for i in range(10)])
    a, b = (load_splits(cfg(p, prompt_format="chat")) for p in (share, chat))
    assert [(c.system, c.turns) for c in a.train["_conv"]] == [(c.system, c.turns) for c in b.train["_conv"]]
    assert a.train["_conv"].iloc[0].system == "be nice"
    data = cfg(share, prompt_format="chat").data
    encoded = [sft.encode_turn(s.train["_conv"].iloc[0], 1, chat_tok, "chat", data, 256) for s in (a, b)]
    assert encoded[0].input_ids == encoded[1].input_ids and "be nice" in chat_tok.decode(encoded[0].input_ids)
    bad = write_jsonl(tmp_path / "tools.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                                     {"from": "gpt", "value": "yo"}]}] * 3 +
                      [{"conversations": [{"from": "human", "value": "weather?"},
                                          {"from": "function_call", "value": "{}"}]}])
    with pytest.raises(DataError, match=r"tools\.jsonl: row 4: `conversations` message 2 has from 'function_call'; "
                                        r"ShareGPT turns are \{from, value\} with from system, human, gpt"):
        load_splits(cfg(bad))


def test_template_without_response_placeholder_is_a_config_error(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: {name: x}\ntask: sft\nmethod: lora\n"
                    "data: {train: a.jsonl, prompt_format: template, template: 'English: {en}', response: fr}\n")
    with pytest.raises(ConfigError, match=r"data.template has no `\{fr\}` placeholder"):
        load_config(path)


def test_classification_keys_are_refused_for_sft(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("model: {name: x}\ntask: sft\nmethod: lora\ndata: {train: a.jsonl, label: y}\n")
    with pytest.raises(ConfigError, match="data.label do\\(es\\) not apply to task sft"):
        load_config(path)


def conv(instruction="describe the movie", response="great film"):
    return sft.Conversation([{"instruction": instruction, "input": None, "response": response}])


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_loss_only_on_response_and_eos(tok, chat_tok, fmt):
    tokenizer = chat_tok if fmt == "chat" else tok
    data = cfg("x.jsonl", prompt_format=fmt).data
    enc = sft.encode_turn(conv(), 0, tokenizer, fmt, data, max_length=256)
    prompt = sft.render_prompt(conv(), 0, tokenizer, fmt, data)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert enc.completion_mask[:n_prompt] == [0] * n_prompt
    assert all(enc.completion_mask[n_prompt:])
    trained = [t for t, m in zip(enc.input_ids, enc.completion_mask) if m]
    assert tokenizer.decode(trained).replace(" ", "").startswith("greatfilm")
    assert tokenizer.eos_token_id in trained  # the model learns to stop


def test_trainer_takes_no_loss_on_prompt_tokens(tok, tiny_llama, tmp_path):
    """The real SFTTrainer built on our rows: labels are -100 exactly on the prompt, and on padding."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    data = cfg("x.jsonl", prompt_format="alpaca").data
    rows = [sft.encode_turn(conv(response=r), 0, tok, "alpaca", data, 256) for r in ("great film", "a very bad movie")]
    tok.pad_token = tok.eos_token
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama),
                         args=SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[],
                                        use_cpu=True, max_length=256),
                         train_dataset=datasets.Dataset.from_list(
                             [{"input_ids": e.input_ids, "completion_mask": e.completion_mask} for e in rows]),
                         processing_class=tok)
    for i, e in enumerate(rows):
        labels = trainer.train_dataset[i]["labels"]
        assert [x == -100 for x in labels] == [m == 0 for m in e.completion_mask]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    short = len(rows[0].input_ids)
    assert (batch["labels"][0][short:] == -100).all()  # padding takes no loss either


def test_loss_on_all_tokens(tok):
    data = cfg("x.jsonl", prompt_format="alpaca", loss_on="all").data
    assert all(sft.encode_turn(conv(), 0, tok, "alpaca", data, 256).completion_mask)


def test_overflow_truncate_and_drop_are_counted(tok):
    long = [conv(response=" ".join(["chat"] * 80)), conv()]
    cut = sft.encode_conversations(long, tok, cfg("x.jsonl", prompt_format="alpaca").data, max_length=60)
    assert cut.truncated == 1 and cut.dropped == 0 and max(len(r["input_ids"]) for r in cut.rows) == 60
    dropped = sft.encode_conversations(long, tok, cfg("x.jsonl", prompt_format="alpaca", overflow="drop").data,
                                       max_length=60)
    assert dropped.dropped == 1 and len(dropped.rows) == 1


def test_multi_turn_chat_trains_each_answer_with_its_history(chat_tok):
    c = sft.Conversation([{"instruction": "hi", "input": None, "response": "good"},
                          {"instruction": "and the plot", "input": None, "response": "bad"}], system="be nice")
    data = cfg("x.jsonl", prompt_format="chat").data
    second = sft.encode_turn(c, 1, chat_tok, "chat", data, 256)
    text = chat_tok.decode(second.input_ids)
    assert "nice" in text and "good" in text and "bad" in text
    trained = chat_tok.decode([t for t, m in zip(second.input_ids, second.completion_mask) if m])
    assert "bad" in trained and "good" not in trained


def _three_turns():
    return sft.Conversation([{"instruction": "the film", "input": None, "response": "good"},
                             {"instruction": "and the plot", "input": None, "response": "bad"},
                             {"instruction": "the actors", "input": None, "response": "great acting"}],
                            system="be nice")


def test_multi_turn_chat_is_one_example_with_every_answer_trained(chat_tok):
    """A three-turn chat is one training example; exactly the tokens of the three answers (with their end-of-turn
    token) carry labels — the same tokens each answer gets when it is trained as its own example."""
    c = _three_turns()
    data = cfg("x.jsonl", prompt_format="chat").data
    split = sft.encode_conversations([c], chat_tok, data, max_length=256)
    assert len(split.rows) == 1
    ids, mask = split.rows[0]["input_ids"], split.rows[0]["completion_mask"]
    assert chat_tok.decode(ids) == chat_tok.decode(chat_tok(sft.answer_spans(c, chat_tok)[0])["input_ids"])
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    assert [chat_tok.decode(r) for r in runs] == ["good </s>", "bad </s>", "great acting </s>"]
    for i, run in enumerate(runs):  # per-turn encoding of the same answer trains the same tokens
        alone = sft.encode_turn(c, i, chat_tok, "chat", data, 256)
        assert [t for t, m in zip(alone.input_ids, alone.completion_mask) if m] == run
    untrained = chat_tok.decode([t for t, m in zip(ids, mask) if not m])
    assert all(w in untrained for w in ("nice", "film", "plot", "actors")) and "good" not in untrained
    # too long: truncated after the first answer, counted; with overflow drop the conversation goes
    cut = sft.encode_conversations([c], chat_tok, data, max_length=len(ids) - 3)
    assert cut.truncated == 1 and sum(cut.rows[0]["completion_mask"]) < sum(mask)
    dropped = sft.encode_conversations([c], chat_tok, cfg("x.jsonl", prompt_format="chat", overflow="drop").data,
                                       max_length=len(ids) - 3)
    assert dropped.dropped == 1 and dropped.rows == []
    preview = sft.preview(c, chat_tok, data, 256, color=False)
    assert "one example, all 3 answers trained" in preview and preview.count("⟦") == 3


def test_chat_template_that_rewrites_history_falls_back_to_one_example_per_answer(chat_tok):
    """Some templates render earlier turns differently once more follow (here: a marker on the last message), so
    the conversation cannot be cut into answers: each answer is trained as its own example, as before."""
    chat_tok.chat_template = ("{% for m in messages %}{% if loop.last %}<last> {% endif %}<{{ m['role'] }}> "
                              "{{ m['content'] }} </s> {% endfor %}"
                              "{% if add_generation_prompt %}<assistant> {% endif %}")
    c = _three_turns()
    data = cfg("x.jsonl", prompt_format="chat").data
    assert sft.answer_spans(c, chat_tok) is None
    assert len(sft.encode_conversations([c], chat_tok, data, max_length=256).rows) == 3
    assert "one example per answer" in sft.preview(c, chat_tok, data, 256, color=False)


def test_user_template(tok):
    data = cfg("x.jsonl", prompt_format="template", template="English: {en}\nFrench: {fr}", response="fr").data
    c = sft.Conversation([{"instruction": "", "input": None, "response": "le chat"}], row={"en": "the cat",
                                                                                            "fr": "le chat"})
    assert sft.render_prompt(c, 0, tok, "template", data) == "English: the cat\nFrench: "


def test_template_rows_are_split_and_checked_by_their_own_text():
    """Regression: with a user template, rows were keyed by their response only, so a one-word-label task (two
    distinct responses) collapsed into two groups and could not be split."""
    config = cfg("sample:sentiment_uci", prompt="text", response="label", prompt_format="template",
                 template="Review: {text}\nSentiment: {label}")
    splits = load_splits(config)
    sizes = splits.sizes()
    assert sizes["test"] > 500 and sizes["validation"] > 250 and sizes["train"] > 2000
    assert splits.train["_text_key"].nunique() > 2000


def test_sft_end_to_end_and_reload_generates_the_same(make_config, tiny_llama, tmp_path, capsys):
    from tunelab.cli import main
    from tunelab.tasks.generate import Generator

    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 12]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "lora", "r": 4}, name="sft", model={"name": str(tiny_llama)},
                       task="sft", data={"train": str(data), "split": {"validation": 0.2, "test": 0.2},
                                         "leakage": "ignore"},
                       train={"max_steps": 5, "precision": "bf16"}, eval={"max_new_tokens": 4})
    result = tunelab.train(path)
    m = result.metrics
    assert m["validation"]["loss"] > 0 and m["test"]["examples"] > 0 and "chrf" in m["test"]
    assert (result.path / "model" / "adapter_model.safetensors").exists()
    saved = [json.loads(x) for x in (result.path / "predictions_test.jsonl").read_text().split("\n") if x]
    again = tunelab.load(result.path).generate([s["prompt"] for s in saved], max_new_tokens=4)
    assert again == [s["generated"] for s in saved]
    assert main(["generate", str(result.path), "--prompt", "say good", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().split("\n")[-1])
    gen = tunelab.load(result.path)
    assert out["generated"] == gen.generate([gen.render("say good")], max_new_tokens=4)[0]
    capsys.readouterr()
    batch = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "say good"}, {"prompt": "say bad"}])
    assert main(["generate", str(result.path), "--input", str(batch), "--max-new-tokens", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().split("\n")[-2:]]
    assert [x["generated"] for x in lines] == gen.generate([gen.render("say good"), gen.render("say bad")],
                                                            max_new_tokens=4)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "say good"}])
    assert main(["generate", str(result.path), "--input", str(bad)]) == 2
    assert "bad.jsonl, line 1: no `prompt` text (use --field" in capsys.readouterr().err
    assert main(["predict", str(result.path), "hello"]) == 2
    assert "is a `sft` run (generator), not a classifier; use it with `tunelab generate`" in capsys.readouterr().err
    # merged: a plain causal LM that generates what the adapter generated
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(result.path)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(result.path / "merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    merged_gen = Generator(result.config, tunelab.load(result.path).tokenizer, plain)
    assert merged_gen.generate([s["prompt"] for s in saved], max_new_tokens=4) == [s["generated"] for s in saved]


def test_compiled_blocks_train_the_same_adapter(make_config, tiny_llama, tmp_path):
    """train.compile: the blocks run compiled and the result is the uncompiled run's (same adapter keys, same
    losses to rounding) — compilation changes speed, not what is learned or saved."""
    from safetensors.torch import load_file

    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 8]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    runs = {}
    for compiled in (False, True):
        path = make_config(method={"name": "lora", "r": 4, "dropout": 0.0}, name=f"c{compiled}",
                           model={"name": str(tiny_llama)}, task="sft",
                           data={"train": str(data), "split": {"validation": 0, "test": 0.2}, "leakage": "ignore"},
                           train={"max_steps": 3, "logging_steps": 1, "compile": compiled}, eval={"max_new_tokens": 2})
        runs[compiled] = tunelab.train(path).path
    losses = {c: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().split("\n") if '"loss"' in x]
              for c, p in runs.items()}
    assert len(losses[True]) == 3 and losses[True] == pytest.approx(losses[False], rel=1e-3)
    a, b = (load_file(runs[c] / "model" / "adapter_model.safetensors") for c in (False, True))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)
    # and the compiled run really compiled every block
    from tunelab.config import load_config
    from tunelab.methods.freezing import transformer_blocks
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    config = load_config(runs[True] / "config.yaml")
    trainer, *_ = TASKS[config.task].build_trainer(config, load_splits(config), str(tiny_llama), RunDir(tmp_path / "x"))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(trainer.model)[1])


def test_compile_auto_rule(monkeypatch):
    """train.compile auto: on only where Inductor can run and the run is long enough to pay back the compile time;
    true/false are obeyed; each decision says why."""
    from tunelab import compiling

    assert compiling.decide("auto", compiling.MIN_STEPS, None)[0] is True
    off, why = compiling.decide("auto", compiling.MIN_STEPS - 1, None)
    assert off is False and "too few" in why
    assert compiling.decide("auto", None, None) == (False, "off: the number of steps is unknown")
    assert compiling.decide("auto", 10**6, "no C++ compiler found")[1] == "off: no C++ compiler found"
    assert compiling.decide(True, 1, "anything")[0] is True and compiling.decide(False, 10**6, None)[0] is False
    if not torch.cuda.is_available():  # this CPU: a compiler and Python's headers are here (the suite compiles)
        assert compiling.unsupported() is None
        monkeypatch.delenv("CXX", raising=False)
        monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
        assert "no C++ compiler" in compiling.unsupported()


def test_compile_auto_counts_the_planned_steps(make_config, tiny_llama, tmp_path, monkeypatch):
    """The decision uses the optimizer steps the Trainer will take (packed rows / batch / accumulation × epochs)
    and lands in metrics.json; a short run stays uncompiled, and so does an unpacked one."""
    from tunelab import compiling
    from tunelab.config import load_config
    from tunelab.methods.freezing import transformer_blocks
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 8]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "lora", "r": 4, "dropout": 0.0}, model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(data), "split": {"validation": 0, "test": 0.2}, "leakage": "ignore"},
                       train={"epochs": 3, "batch_size": 4, "grad_accum": 2}, eval={"max_new_tokens": 2})
    config = load_config(path)
    assert config.train.compile == "auto"
    trainer, *_ = TASKS["sft"].build_trainer(config, load_splits(config), str(tiny_llama), RunDir(tmp_path / "x"))
    train_rows = len(trainer.train_dataset)  # 32 of the 40 (20% test)
    assert compiling.planned_steps(trainer) == (-(-train_rows // 4) // 2) * 3 == 12
    # unpacked batches are as wide as their longest example, a new shape nearly every step: auto leaves them eager
    assert trainer.compiled is False and "without train.packing" in trainer.compile_decision["reason"]
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in transformer_blocks(trainer.model)[1])
    result = tunelab.train(path)
    assert result.metrics["train"]["compile"] == trainer.compile_decision
    # packed rows have one shape: there the number of steps decides
    packed = config.model_copy(update={"train": config.train.model_copy(update={"packing": True})})
    trainer, *_ = TASKS["sft"].build_trainer(packed, load_splits(packed), str(tiny_llama), RunDir(tmp_path / "y"))
    steps = compiling.planned_steps(trainer)
    assert trainer.compiled is False and f"{steps} steps are too few" in trainer.compile_decision["reason"]
    monkeypatch.setattr(compiling, "MIN_STEPS", steps)  # the same run counted as long enough
    trainer, *_ = TASKS["sft"].build_trainer(packed, load_splits(packed), str(tiny_llama), RunDir(tmp_path / "z"))
    assert trainer.compiled is True and trainer.compile_decision["reason"].startswith(f"on: {steps} steps")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in transformer_blocks(trainer.model)[1])
    assert (trainer.data_collator.width, trainer.data_collator.rows) == (config.model.max_length, 4)
    # adapter dropout: compiled masks were slower than eager ones, so auto leaves such a run eager
    dropping = packed.model_copy(update={"method": packed.method.model_copy(update={"dropout": 0.1})})
    trainer, *_ = TASKS["sft"].build_trainer(dropping, load_splits(dropping), str(tiny_llama), RunDir(tmp_path / "d"))
    assert trainer.compiled is False and "adapter dropout" in trainer.compile_decision["reason"]


def test_compiled_training_validates_uncompiled(make_config, tiny_llama, tmp_path):
    """Validation passes of a compiled run run eagerly: without gradients the blocks would compile again (a second
    graph per block, tens of seconds on a CPU, for a pass that runs a few times per run); packed rows are padded to
    model.max_length so training compiles one shape."""
    import torch._dynamo

    from tunelab.config import load_config
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 8]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "lora", "r": 4, "dropout": 0.0}, model={"name": str(tiny_llama),
                                                                               "max_length": 48}, task="sft",
                       data={"train": str(data), "split": {"validation": 0.2, "test": 0.2}, "leakage": "ignore"},
                       train={"max_steps": 2, "compile": True, "packing": True})
    config = load_config(path)
    trainer, *_ = TASKS["sft"].build_trainer(config, load_splits(config), str(tiny_llama), RunDir(tmp_path / "x"))
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["input_ids"].shape[1] == 48
    assert trainer.compiled
    # the blocks are compiled (compiling happens at their first call): a validation pass that ran them compiled
    # would compile a graph now — dynamo's frame count would grow (and this test would take tens of seconds)
    frames = torch._dynamo.utils.counters["frames"]["total"]
    assert "eval_loss" in trainer.evaluate()
    assert torch._dynamo.utils.counters["frames"]["total"] == frames


def test_trl_keeps_its_metrics_where_tunelab_writes_them(make_config, tiny_llama, tmp_path):
    """tasks/sft_trainer.record_metrics writes TRL's private metric store (the CPU loss path replaces TRL's);
    this fails if TRL renames it, and checks the values reach TRL's logs."""
    from tunelab.config import load_config
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 8]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "lora", "r": 4}, name="m", model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(data), "split": {"validation": 0, "test": 0}, "leakage": "ignore"},
                       train={"max_steps": 2, "logging_steps": 1})
    config = load_config(path)
    trainer, *_ = TASKS[config.task].build_trainer(config, load_splits(config), str(tiny_llama),
                                                   RunDir(tmp_path / "x"))
    assert set(trainer._metrics) >= {"train", "eval"} and isinstance(trainer._total_train_tokens, int)
    trainer.train()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert logged and all(0 <= r["mean_token_accuracy"] <= 1 and r["entropy"] > 0 for r in logged)
    assert logged[-1]["num_tokens"] == trainer._total_train_tokens > 0


def test_validation_loss_in_slices_equals_one_piece(make_config, tiny_llama, tmp_path, monkeypatch):
    """Without gradients the LM head runs in slices of labelled tokens (bounded memory for a 64-row validation
    batch); the loss, entropy and accuracy are those of one piece, and training (with gradients) is unchanged."""
    from tunelab.config import load_config
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits, sft_trainer

    rows = [{"prompt": f"say {w}", "response": f"{w} {w} {w}"} for w in ["good", "bad", "great", "awful", "fine"] * 8]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "lora", "r": 4, "dropout": 0.0}, model={"name": str(tiny_llama)}, task="sft",
                       data={"train": str(data), "split": {"validation": 0, "test": 0}, "leakage": "ignore"},
                       train={"max_steps": 2})
    config = load_config(path)
    trainer, *_ = TASKS[config.task].build_trainer(config, load_splits(config), str(tiny_llama),
                                                   RunDir(tmp_path / "x"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    trainer.model.eval()
    seen = {}
    for size in (100_000, 7):  # one piece, then slices of 7 labelled tokens (several slices)
        monkeypatch.setattr(sft_trainer, "SLICE", size)
        trainer._metrics["eval"].clear()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        seen[size] = (loss.item(), trainer._metrics["eval"]["entropy"][-1],
                      trainer._metrics["eval"]["mean_token_accuracy"][-1])
    assert labelled > 7
    assert seen[7] == pytest.approx(seen[100_000], rel=1e-5)
    trainer.model.train()
    with torch.enable_grad():
        assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(seen[7][0], rel=1e-5)


@pytest.mark.parametrize("trainable_head", [False, True])
def test_fused_head_loss_equals_the_plain_loss_without_holding_the_logits(trainable_head):
    """The LM head's loss in slices with the gradient taken in the forward pass: the same loss, entropy, top-1
    count and gradients (hidden states and, when the head trains, its weight) as cross-entropy on the whole
    logits — and no [tokens, vocabulary] tensor is kept for the backward pass (the head called as a module, the
    path for LoRA-wrapped heads, keeps one: the check can see it)."""
    import torch.nn.functional as F

    from tunelab.tasks.sft_trainer import head_loss

    torch.manual_seed(0)
    tokens, width, vocab = 37, 16, 50
    hidden0, weight0 = torch.randn(tokens, width), torch.randn(vocab, width) * 0.5
    target = torch.randint(0, vocab, (tokens,))

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            out = fn()
        return out, shapes

    hidden, head = hidden0.clone().requires_grad_(), torch.nn.Linear(width, vocab, bias=False)
    head.weight.data = weight0.clone()
    head.weight.requires_grad_(trainable_head)
    (loss, entropy, correct), shapes = saved_shapes(lambda: head_loss(hidden, head, target, torch.float32, size=5))
    (loss * 0.3).backward()

    ref_hidden, ref_weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_(trainable_head)
    logits = ref_hidden @ ref_weight.T
    ref = F.cross_entropy(logits, target, reduction="sum")
    (ref * 0.3).backward()
    logp = logits.detach().log_softmax(-1)

    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert entropy.item() == pytest.approx(-(logp.exp() * logp).sum().item(), rel=1e-5)
    assert correct.item() == (logits.argmax(-1) == target).sum().item()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)
    if trainable_head:
        torch.testing.assert_close(head.weight.grad, ref_weight.grad)
    assert all(s[-1] != vocab for s in shapes), shapes  # no logits (…, vocabulary) kept, not even one slice's

    class Wrapped(torch.nn.Module):  # a head that is not a plain Linear (LoRA on lm_head): called as a module
        def __init__(self):
            super().__init__()
            self.inner = head

        def forward(self, x):
            return self.inner(x)

    hidden.grad = None
    (loss2, entropy2, correct2), shapes2 = saved_shapes(
        lambda: head_loss(hidden, Wrapped(), target, torch.float32, size=5))
    assert (loss2.item(), entropy2.item(), correct2.item()) == pytest.approx(
        (loss.item(), entropy.item(), correct.item()), rel=1e-5)
    assert (tokens, vocab) in shapes2


@pytest.mark.parametrize("grad", [False, True])
def test_head_loss_stays_on_the_hidden_states_device(grad):
    """head_loss also computes the evaluation loss on GPUs: its sums live on the hidden states' device (checked on
    PyTorch's `meta` device, which a CPU-made accumulator would not be on)."""
    from tunelab.tasks.sft_trainer import head_loss

    hidden = torch.randn(7, 4, device="meta").requires_grad_(grad)
    head = torch.nn.Linear(4, 11, bias=False, device="meta")
    with torch.set_grad_enabled(grad):
        out = head_loss(hidden, head, torch.zeros(7, dtype=torch.long, device="meta"), torch.float32, size=3)
    assert [o.device.type for o in out] == ["meta"] * 3


def test_an_adapter_names_its_base_by_hub_id_and_loads_with_plain_peft(make_config, tiny_llama, tmp_path,
                                                                         monkeypatch):
    """A run on a packaged model: adapter_config.json and PEFT's model card name the base by its Hub id (not this
    machine's cache folder), the manifest keeps the local folder, and plain peft loads the adapter folder alone
    with that base from a Hub cache (offline) — the same logits as tunelab's own load."""
    import shutil
    import subprocess
    import sys

    from tunelab.models import registry

    monkeypatch.setitem(registry.PACKAGED, "tiny-llama", registry.PackagedModel(
        "tiny-llama", "tiny-llama-pkg", "0.0.1", "a tiny llama", lambda entry: tiny_llama, "acme/tiny-llama"))
    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 4]
    path = make_config(method={"name": "lora", "r": 4}, name="portable", model={"name": "tiny-llama"}, task="sft",
                       data={"train": str(write_jsonl(tmp_path / "p.jsonl", rows)), "leakage": "ignore"},
                       train={"max_steps": 2}, eval={"max_new_tokens": 2})
    run = tunelab.train(path).path
    adapter = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "acme/tiny-llama"
    card = (run / "model" / "README.md").read_text()
    assert "base_model: acme/tiny-llama" in card and str(tiny_llama) not in card
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_model"] == {"name": "tiny-llama", "hub_id": "acme/tiny-llama", "path": str(tiny_llama)}
    # the Hub's cache layout, as a download of acme/tiny-llama leaves it
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    ids = [[5, 6, 7, 8]]
    probe = ("import sys, json, torch; from peft import AutoPeftModelForCausalLM; "
             "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval(); "
             f"print(json.dumps(m(torch.tensor({ids})).logits[0, -1].tolist()))")
    done = subprocess.run([sys.executable, "-c", probe, str(run / "model")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    plain = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    ours = tunelab.load(run).model.float()
    with torch.no_grad():
        assert torch.allclose(ours(torch.tensor(ids)).logits[0, -1], plain, atol=1e-5)
