"""Integration: a LoRA SFT run on SmolLM2 exported to GGUF by llama.cpp's converter and run by llama.cpp
(llama-cpp-python): the f16 file answers the run's test prompts as the trained model does, a q8_0 file adds its
agreement and perplexity ratio to parity.json, and a wrong chat template inside the file fails the check."""
import json

import pytest
import yaml

import tunelab
from tunelab import gguf
from tunelab.cli import main

pytestmark = pytest.mark.integration
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [gguf] extra) is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    cfg = {"model": {"name": "smollm2-135m", "max_length": 128}, "task": "sft",
           "data": {"train": "sample:translate_en_fr", "prompt": "en", "response": "fr",
                    "instruction": "Translate this English user-interface text into French.",
                    "split": {"validation": 0, "test": 0.02, "seed": 42}},
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-4},
           "eval": {"max_new_tokens": 12, "max_generate": 4, "forgetting": None},
           "output": {"dir": str(tmp / "run")}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tunelab.train(path).path


def test_f16_and_q8_0_exports_answer_like_the_trained_model(run, capsys):
    assert main(["export", str(run), "--format", "gguf", "--quant", "f16"]) == 0
    out = capsys.readouterr().out
    assert "ollama create NAME -f" in out and "identical greedy answers" in out
    folder = run / "export-gguf"
    assert (folder / "model-f16.gguf").stat().st_size > 200e6  # 135M parameters in 16 bits
    assert main(["export", str(run), "--format", "gguf", "--quant", "q8_0"]) == 0
    parity = json.loads((folder / "parity.json").read_text())
    assert set(parity) == {"f16", "q8_0"} and (folder / "model-f16.gguf").exists()  # the first file was kept
    f16, q8 = parity["f16"], parity["q8_0"]
    assert f16["prompts"] >= 8 and f16["identical"] >= gguf.AGREEMENT
    assert f16["prompts_identical"] == 1.0 and f16["prompt_tokens_identical"] == 1.0
    assert f16["perplexity_ratio"] == pytest.approx(1.0, abs=0.02)
    assert 0.9 < q8["perplexity_ratio"] < 1.2 and q8["bytes"] < 0.6 * f16["bytes"]
    # the embedded chat template renders a user message as training did, with the fixed instruction
    reader = __import__("gguf").GGUFReader(str(folder / "model-f16.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    assert "Translate this English user-interface text into French." in bytes(field.parts[field.data[0]]).decode()
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in modelfile and "{{ .Prompt }}" in modelfile


def test_a_wrong_template_in_the_file_fails_the_check(run, tmp_path, monkeypatch, capsys):
    """Alpaca rendering put into the GGUF of a run trained with the model's chat template: refused."""
    right = gguf.prompt_template

    def alpaca(generator):
        t = right(generator)
        wrong = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.\n\n### Instruction:\n")
        suffix = "\n\n### Response:\n"
        return {**t, "jinja": "{{ " + json.dumps(wrong) + " }}{{ messages[-1]['content'] }}{{ " + json.dumps(suffix)
                + " }}", "prefix": wrong, "suffix": suffix}

    monkeypatch.setattr(gguf, "prompt_template", alpaca)
    out = tmp_path / "wrong"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 2
    assert "answers differently from the trained model" in capsys.readouterr().err
    parity = json.loads((out / "parity.json").read_text())["f16"]
    assert parity["prompts_identical"] == 0.0 and parity["identical"] < gguf.AGREEMENT
    assert not list(out.glob("*.gguf")) and not (out / "Modelfile").exists()
