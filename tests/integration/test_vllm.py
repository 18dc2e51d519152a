"""Integration: `tunelab generate --engine vllm` on a LoRA SFT run of SmolLM2, through vLLM's CPU engine in its own
environment (`make test` makes .venv-vllm and names it in $TUNELAB_VLLM_PYTHON): the adapter is merged on first use,
the parity with the trained model is checked and recorded, and in fp32 vLLM writes the very answers the torch
engine writes. One vLLM load (tens of seconds); `auto`'s choice is checked without loading it again."""
import json

import pytest

import tunelab
from conftest import train_translate_run
from tunelab.cli import main
from tunelab.generation import choose, missing, read_record
from tunelab.generation import vllm as vllm_engine

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(missing("vllm") is not None, reason=str(missing("vllm")))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_translate_run(tmp_path_factory.mktemp("vllm"), precision="fp32")  # fp32: the very same text


def test_generate_through_vllm_answers_as_torch_does_and_records_its_parity(run, tmp_path, capsys):
    rows = [json.loads(x) for x in (run / "predictions_test.jsonl").read_text().splitlines()]
    texts = ["Save changes", "Open a new window", "Delete this file?", "Settings"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    capsys.readouterr()
    assert main(["generate", str(run), "--engine", "vllm", "--input", str(prompts), "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert "engine vllm" in captured.err and "fp32" in captured.err
    got = [json.loads(x)["generated"] for x in captured.out.splitlines()]
    torch_engine = choose("torch", tunelab.load(run), run, len(texts))
    expected = torch_engine.generate([torch_engine.generator.render(t) for t in texts], max_new_tokens=12)
    assert got == expected  # fp32: the same greedy text
    assert (run / "merged" / "config.json").is_file()  # merged once, by `tunelab merge`
    record = read_record(run)["vllm"]
    assert record["passed"] and record["precision"] == "fp32" and record["checked_tokens"] > 10
    assert record["next_token_agreement"] >= 0.99 and abs(record["perplexity_ratio"] - 1) < 0.01
    assert record["greedy_identical"] == f"{min(len(rows), 8)} of {min(len(rows), 8)}"


def test_auto_takes_vllm_for_a_large_job_once_its_parity_passed(run, monkeypatch):
    """After the test above recorded vLLM's parity: auto picks it for a job of MIN_TOKENS tokens or more, torch
    below (and for one prompt); with the record gone it is not picked."""
    def opened(gen, path, why=None, answers=None):
        return type("Opened", (), {"name": "vllm", "why": why})()
    monkeypatch.setattr(vllm_engine, "open", opened)
    gen = tunelab.load(run)
    big = choose("auto", gen, run, 64, vllm_engine.MIN_TOKENS // 64)
    assert big.name == "vllm" and "64 prompts" in big.why and "agreed with the trained model" in big.why
    assert choose("auto", tunelab.load(run), run, 4, 16).name == "torch"
    kept = (run / "engines.json").read_text()
    record = json.loads(kept)
    record["vllm"]["passed"] = False
    (run / "engines.json").write_text(json.dumps(record))
    try:
        assert choose("auto", tunelab.load(run), run, 64, vllm_engine.MIN_TOKENS // 64).name == "torch"
    finally:
        (run / "engines.json").write_text(kept)  # the serving test below reads the record


def test_serve_on_vllm_answers_the_openai_client_as_generate_does(run, tmp_path):
    """`tunelab serve RUN --engine vllm`: tunelab's routes, checks and rendering in front of vLLM's engine — the
    OpenAI client's completions, chat and streamed chat give the torch engine's greedy answers (fp32), bad input
    still gets the server's 4xx, and a client gone mid-stream is aborted in vLLM."""
    import subprocess
    import sys
    import time

    import httpx
    from openai import BadRequestError, NotFoundError, OpenAI

    from conftest import free_port
    from tunelab.serve import wait_until_healthy

    port, log = free_port(), tmp_path / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", str(run), "--engine", "vllm",
                                 "--port", str(port), "--max-tokens", "200", "--log-level", "warning"],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        state = wait_until_healthy(proc, port, 400)
        assert state == "ready", f"server {state}:\n{log.read_text()}"
        assert "continuous batching in vLLM" in log.read_text() and "agreed with the trained model" in log.read_text()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        gen = tunelab.load(run)
        torch_engine = choose("torch", gen, run, 1)
        for text in ("Save changes", "Delete this file?"):
            expected = torch_engine.generate([torch_engine.generator.render(text)], max_new_tokens=12)[0]
            chat = client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": text}],
                                                  max_tokens=12, temperature=0)
            assert chat.choices[0].message.content == expected
            stream = client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": text}],
                                                    max_tokens=12, temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == expected
            completion = client.completions.create(model=run.name, prompt=torch_engine.generator.render(text),
                                                   max_tokens=12, temperature=0)
            assert completion.choices[0].text.strip() == expected
        with pytest.raises(BadRequestError, match="max_tokens must be between 1 and 200"):
            client.completions.create(model=run.name, prompt="x", max_tokens=0)
        with pytest.raises(NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
                "model": run.name, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 4:
                    break
        t0 = time.monotonic()
        quick = client.completions.create(model=run.name, prompt="Hello", max_tokens=1, temperature=0)
        assert quick.usage.completion_tokens == 1 and time.monotonic() - t0 < 10
    finally:
        proc.terminate()
        proc.wait(timeout=60)
