"""Integration: a LoRA SFT run on SmolLM2 exported to GGUF by llama.cpp's converter and run by llama.cpp
(llama-cpp-python): the f16 file answers the run's test prompts as the trained model does, and a wrong chat
template inside the file fails the check. (q8_0 and q4_k_m go through the same code; bench/llamacpp.py exports and
times all three — a second quantization here would add minutes to the suite.)"""
import json

import pytest

from conftest import train_translate_run
from tunelab import gguf
from tunelab.cli import main

pytestmark = pytest.mark.integration
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the [gguf] extra) is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_translate_run(tmp_path_factory.mktemp("gguf"), max_generate=4, precision="fp32")  # exact text: fp32


def test_f16_export_answers_like_the_trained_model(run, capsys):
    (run / "export-gguf").mkdir()
    (run / "export-gguf" / "export.json").write_text(json.dumps({"format": "gguf", "quants": ["q8_0"]}))
    (run / "export-gguf" / "model-q8_0.gguf").write_bytes(b"an earlier export")
    assert main(["export", str(run), "--format", "gguf", "--quant", "f16"]) == 0
    out = capsys.readouterr().out
    assert "ollama create NAME -f" in out and "identical greedy answers" in out
    folder = run / "export-gguf"
    assert (folder / "model-f16.gguf").stat().st_size > 200e6  # 135M parameters in 16 bits
    assert (folder / "model-q8_0.gguf").read_bytes() == b"an earlier export"  # other quantizations are kept
    f16 = json.loads((folder / "parity.json").read_text())["f16"]
    assert f16["prompts"] >= 8 and f16["identical"] >= gguf.AGREEMENT
    assert f16["prompts_identical"] == 1.0 and f16["prompt_tokens_identical"] == 1.0
    assert f16["perplexity_ratio"] == pytest.approx(1.0, abs=0.02)
    # the embedded chat template renders a user message as training did, with the fixed instruction
    reader = __import__("gguf").GGUFReader(str(folder / "model-f16.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    assert "Translate this English user-interface text into French." in bytes(field.parts[field.data[0]]).decode()
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and "{{ .Prompt }}" in modelfile


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


def test_generate_through_llamacpp_answers_like_torch_and_auto_takes_it_for_one_prompt(run, capsys):
    """`tunelab generate --engine llamacpp` runs the run's f16 GGUF (made by the export above, or now) on tunelab's
    own prompt tokens: the same greedy answers as the torch engine on the run's test prompts; its parity goes into
    RUN/engines.json; `auto` takes it for a single prompt once the export passed, and torch for several."""
    from tunelab.generation import choose, read_record
    from tunelab.gguf import held_out_conversations
    from tunelab.runs import open_finished
    from tunelab.tasks import TASKS

    path, config = open_finished(run)
    task = TASKS[config.task]
    llama = choose("llamacpp", task.load(path, config), path, 8)
    assert llama.name == "llamacpp" and (run / "export-gguf" / "model-f16.gguf").is_file()
    torch_engine = choose("torch", task.load(path, config), path, 8)
    prompts = [torch_engine.generator.render_conversation(c) for c in held_out_conversations(path, config, task, 8)]
    ours, theirs = torch_engine.generate(prompts, max_new_tokens=12), llama.generate(prompts, max_new_tokens=12)
    assert sum(a == b for a, b in zip(ours, theirs)) >= 0.75 * len(prompts), list(zip(ours, theirs))
    record = read_record(run)["llamacpp"]
    assert record["identical"] >= gguf.AGREEMENT and record["prompt"] == "tunelab's rendering, as token ids"
    assert choose("auto", task.load(path, config), path, 1).name == "llamacpp"
    assert choose("auto", task.load(path, config), path, 4).name == "torch"
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Save changes", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "engine auto: one prompt, and" in captured.err and "answered like the trained model" in captured.err
    assert captured.out.strip() == llama.generate([llama.generator.render("Save changes")], max_new_tokens=12)[0]


def test_one_prompt_answered_by_llamacpp_never_imports_torch(run):
    """The one-prompt job on the run's GGUF export renders its prompt with the run's tokenizer and hands it to
    llama.cpp: neither torch nor peft is imported and the weights are never loaded in torch (the job is ~1 s of
    tunelab around llama.cpp's own time, not the 3 s torch's import took)."""
    import subprocess
    import sys

    probe = ("import sys; from tunelab.cli import main\n"
             f"code = main(['generate', {str(run)!r}, '--prompt', 'Save changes', '--max-new-tokens', '4'])\n"
             "print('LOADED', code, [m for m in ('torch', 'peft') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert "engine auto: one prompt" in done.stderr, done.stderr[-2000:]
    assert "LOADED 0 []" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
