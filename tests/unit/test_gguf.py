"""GGUF export without llama.cpp's runtime: the prompt format a run trained with becomes the chat template inside
the file and the Ollama Modelfile's TEMPLATE, each checked against training's own rendering; runs llama.cpp
cannot hold are refused. The conversion and the parity check run in tests/integration/test_gguf.py."""
from __future__ import annotations

import jinja2
import pytest
import torch

import tunelab
from conftest import write_jsonl
from tunelab import gguf
from tunelab.cli import main

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|sys|>default<|end|>\\n' }}"
          "{% endif %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def _generator(tiny_llama, **data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.config import Config
    from tunelab.tasks.generate import Generator

    config = Config.model_validate({"model": {"name": str(tiny_llama)}, "task": "sft", "method": "lora",
                                    "data": {"train": "a.jsonl", **data}})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    return Generator(config, AutoTokenizer.from_pretrained(tiny_llama), model)


def _jinja(template: str, messages: list[dict]) -> str:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("data", [{}, {"instruction": "Translate this into French."},
                                  {"prompt_format": "chat", "instruction": "Translate this into French."}])
def test_single_turn_formats_become_a_template_that_renders_what_training_did(data, tiny_llama):
    gen = _generator(tiny_llama, **data)
    if data.get("prompt_format") == "chat":
        gen.tokenizer.chat_template = CHATML
    t = gguf.prompt_template(gen)
    assert t["kind"] == "single_turn"
    text = 'a "quoted" line\nand {braces} and émojis ✓'
    assert _jinja(t["jinja"], [{"role": "user", "content": text}]) == gen.render(text)
    mf = gguf.modelfile("model-f16.gguf", t, gen.tokenizer)
    assert "FROM ./model-f16.gguf\n" in mf and 'PARAMETER stop "</s>"' in mf
    template = mf.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.replace("{{ .Prompt }}", text) == gen.render(text)


def test_chat_template_pieces_make_the_ollama_template_and_a_branching_template_is_left_to_ollama(tiny_llama):
    gen = _generator(tiny_llama, prompt_format="chat")
    gen.tokenizer.chat_template = CHATML
    t = gguf.prompt_template(gen)
    assert t["kind"] == "model" and t["jinja"] is None  # the model's own template goes into the GGUF unchanged
    talk = [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}]
    for messages in (talk, talk[1:], talk[1:2]):
        assert gguf.render_pieces(t["pieces"], messages) == gen.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False)
    mf = gguf.modelfile("model-q8_0.gguf", t, gen.tokenizer)
    assert '{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ else }}<|sys|>default<|end|>\n{{ end }}' in mf
    assert '{{ if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n' in mf and mf.count("{{") == mf.count("}}")
    # a template that changes the content (here: trims it) is more than fixed text around each message
    gen.tokenizer.chat_template = CHATML.replace("m['content']", "(m['content'] | trim)")
    t = gguf.prompt_template(gen)
    assert t["pieces"] is None
    mf = gguf.modelfile("model-f16.gguf", t, gen.tokenizer)
    assert "TEMPLATE" not in mf.replace("no TEMPLATE", "") and "reads the one inside the GGUF" in mf


def test_runs_llama_cpp_cannot_hold_are_refused(make_config, tiny_llama, tmp_path, capsys):
    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 8]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    prompt_run = tunelab.train(make_config(method={"name": "prompt", "virtual_tokens": 4}, name="gg-prompt",
                                           model={"name": str(tiny_llama)}, task="sft",
                                           data={"train": str(data), "leakage": "ignore"},
                                           train={"max_steps": 1}, eval={"max_new_tokens": 2})).path
    assert main(["export", str(prompt_run), "--format", "gguf"]) == 2
    assert "is a `prompt` run, which llama.cpp cannot hold" in capsys.readouterr().err
    from tunelab.errors import RunError

    with pytest.raises(RunError, match="cannot hold"):  # the Python API takes the same options
        tunelab.export(prompt_run, "gguf", quant="q8_0")
    clf = tunelab.train(make_config(method="head", name="gg-clf", train={"max_steps": 1})).path
    assert main(["export", str(clf), "--format", "gguf"]) == 2
    assert "GGUF export handles decoder-only generative runs" in capsys.readouterr().err
    assert not (prompt_run / "export-gguf").exists() and not (clf / "export-gguf").exists()
