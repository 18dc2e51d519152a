"""Integration: `tunelab serve` with two LoRA runs of smollm2-135m on one base and a minilm classifier, driven by
the official `openai` client (completions, chat, streaming) and plain HTTP (classify); every answer must equal
what `tunelab generate` / `tunelab predict` print for the same input (greedy). Server and CLI run as the
commands a user types, in their own processes."""
import json
import subprocess
import sys

import httpx
import pytest
import yaml

import tunelab
from conftest import free_port
from tunelab.serve import wait_until_healthy

pytestmark = pytest.mark.integration


def _train(tmp_path, name, cfg):
    cfg = {**cfg, "output": {"dir": str(tmp_path / name)}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tunelab.train(path).path


def _cli_json(argv):
    out = subprocess.run([sys.executable, "-m", "tunelab.cli", *argv], capture_output=True, text=True, check=True)
    return [json.loads(x) for x in out.stdout.strip().split("\n") if x.startswith("{")]


def _start_server(runs, log, port):
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", *map(str, runs), "--port", str(port),
                                 "--api-key", "k", "--max-tokens", "64", "--log-level", "warning"],
                                stdout=sink, stderr=subprocess.STDOUT)
    state = wait_until_healthy(proc, port, 180)
    assert state == "ready", f"server {state}:\n{log.read_text()}"
    return proc


def test_openai_client_against_two_smollm2_adapters_and_a_classifier(tmp_path):
    from openai import OpenAI

    smol = {"model": {"name": "smollm2-135m", "max_length": 96}, "task": "sft", "method": {"name": "lora", "r": 4},
            "train": {"max_steps": 2, "batch_size": 4}, "eval": {"max_new_tokens": 4, "max_generate": 2,
                                                                  "forgetting": None}}
    french = _train(tmp_path, "french", {**smol, "data": {
        "train": "sample:translate_en_fr", "prompt": "en", "response": "fr", "instruction": "Translate into French.",
        "max_train_examples": 24, "split": {"validation": 0.01, "test": 0.01}}})
    chat = _train(tmp_path, "chat", {**smol, "data": {
        "train": "sample:chitchat", "bad_rows": "drop", "max_train_examples": 24,
        "split": {"validation": 0.01, "test": 0.01}}})
    sentiment = _train(tmp_path, "sentiment", {
        "model": {"name": "minilm", "max_length": 64}, "method": {"name": "lora", "r": 4},
        "data": {"train": "sample:sentiment_uci", "max_train_examples": 200},
        "train": {"max_steps": 4, "batch_size": 16}})

    port, log = free_port(), tmp_path / "server.log"
    server = _start_server([french, chat, sentiment], log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        assert "smollm2-135m: one copy of the base model" in log.read_text()
        assert "shared by 2 adapter run(s): french" in log.read_text()
        client = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"french", "chat", "sentiment"}
        for run, question in ((french, "The weather is nice today."), (chat, "What do you like to do on weekends?")):
            expected = _cli_json(["generate", str(run), "--prompt", question, "--max-new-tokens", "12",
                                          "--json"])[0]["generated"]
            reply = client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": question}],
                                                   max_tokens=12, temperature=0)
            assert reply.choices[0].message.content == expected
            assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 12
            stream = client.chat.completions.create(model=run.name, messages=[{"role": "user", "content": question}],
                                                    max_tokens=12, temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
            # completions take the raw prompt: the rendered one gives the same continuation, unstripped
            rendered = tunelab.load(run).render(question)
            completion = client.completions.create(model=run.name, prompt=rendered, max_tokens=12, temperature=0)
            assert completion.choices[0].text.strip() == expected

        texts = ["An absolute delight from start to finish.", "I want those two hours of my life back."]
        expected = _cli_json(["predict", str(sentiment), *texts, "--json"])
        got = httpx.post(f"{url}/v1/classify", json={"model": "sentiment", "input": texts},
                         headers={"Authorization": "Bearer k"}, timeout=60).json()["data"]
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        for g, e in zip(got, expected):
            assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-6)
        with pytest.raises(Exception) as err:
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert getattr(err.value, "status_code", None) == 401
    finally:
        server.terminate()
        server.wait(timeout=60)
