"""tunelab serve on tiny models: one base shared by two LoRA runs, batching that changes nothing in the outputs,
streaming, classify, and every kind of bad request answered with a 4xx in OpenAI's error shape."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import yaml

import tunelab
from conftest import Serving, sample_rows, write_jsonl
from tunelab.serve import Limits, Registry, create_app


def _config(root, name, model, method, task, data, **train):
    cfg = {"model": {"name": str(model), "max_length": 64}, "task": task, "method": method,
           "data": {"train": str(data), "split": {"validation": 0.2, "test": 0.2, "seed": 1}, "leakage": "ignore"},
           "train": {"batch_size": 8, "eval_batch_size": 16, "precision": "fp32", "logging_steps": 5, **train},
           "output": {"dir": str(root / "runs" / name)}, "eval": {"forgetting": None, "max_new_tokens": 4}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, tiny_bert):
    """Two LoRA sft runs on the tiny llama taught opposite answers, and a LoRA classifier on the tiny bert."""
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for name, word in (("says-good", "good"), ("says-bad", "bad")):
        rows = [{"prompt": f"say something about the {w}", "response": f"{word} {word} {word}"}
                for w in ["movie", "film", "plot", "actor", "story", "ending"] * 10]
        data = write_jsonl(root / f"{name}.jsonl", rows)
        out[name] = tunelab.train(_config(root, name, tiny_llama, {"name": "lora", "r": 4}, "sft", data,
                                          max_steps=30, lr=2e-2)).path
    data = write_jsonl(root / "sentiment.jsonl", sample_rows(200))
    out["sentiment"] = tunelab.train(_config(root, "sentiment", tiny_bert, {"name": "lora", "r": 4}, "classify",
                                             data, max_steps=6)).path
    return out


def _app(runs, **limits):
    return create_app([runs["says-good"], runs["says-bad"], runs["sentiment"]], Limits(**limits))


def test_two_adapters_share_one_base_and_answer_as_generate_does(runs):

    app = _app(runs)
    registry: Registry = app.state.registry
    good, bad = registry.models["says-good"], registry.models["says-bad"]
    assert good.engine.model is bad.engine.model and good.worker is bad.worker  # one model, one base in memory
    assert set(good.engine.model.peft_config) == {good.adapter, bad.adapter}
    assert any("shared by 2 adapter run(s): says-good" in line and "less than a copy each" in line
               for line in registry.lines)

    prompt_text = "say something about the movie"
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        listed = http.get("/v1/models").json()["data"]
        assert {m["id"] for m in listed} == {"says-good", "says-bad", "sentiment"}
        assert next(m for m in listed if m["id"] == "says-good")["shares_base_with"] == ["says-bad"]

        answers = {}
        for name in ("says-good", "says-bad"):
            gen = tunelab.load(runs[name])
            rendered = gen.render(prompt_text)
            expected_raw = gen.generate([rendered], max_new_tokens=6, strip=False)[0]
            r = http.post("/v1/completions", json={"model": name, "prompt": rendered, "max_tokens": 6,
                                                   "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["text"] == expected_raw
            assert body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0
            # chat with one user message renders as `tunelab generate --prompt` does
            chat = http.post("/v1/chat/completions", json={
                "model": name, "messages": [{"role": "user", "content": prompt_text}], "max_tokens": 6,
                "temperature": 0}).json()
            assert chat["choices"][0]["message"] == {"role": "assistant", "content": expected_raw.strip()}
            answers[name] = expected_raw
        assert answers["says-good"] != answers["says-bad"]  # each request really ran its own adapter

        # 16 concurrent requests over both adapters: batched together, each answer unchanged
        def ask(i):
            name = ("says-good", "says-bad")[i % 2]
            rendered = registry.models[name].engine.render(prompt_text)
            return name, http.post("/v1/completions", json={"model": name, "prompt": rendered, "max_tokens": 6,
                                                            "temperature": 0}).json()["choices"][0]["text"]
        before = (good.worker.batches, good.worker.batched_jobs)
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, range(16)))
        assert all(text == answers[name] for name, text in results)
        batches, jobs = good.worker.batches - before[0], good.worker.batched_jobs - before[1]
        assert jobs == 16 and batches < 16  # some requests shared a forward pass

        # streaming: the deltas add up to the non-streamed text; the stream ends with [DONE]
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "says-bad", "messages": [{"role": "user", "content": prompt_text}], "max_tokens": 6,
                "temperature": 0, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answers["says-bad"].strip()
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

        texts = [r["text"] for r in sample_rows(10)]
        got = http.post("/v1/classify", json={"model": "sentiment", "input": texts}).json()["data"]
        expected = tunelab.load(runs["sentiment"]).predict_proba(texts)
        assert [g["label"] for g in got] == [max(p, key=p.get) for p in expected]
        for g, p in zip(got, expected):
            assert g["probabilities"] == pytest.approx(p, abs=1e-5)
        health = http.get("/health").json()
        assert health["status"] == "ok"


def test_a_single_adapter_run_is_served_merged_and_answers_as_generate_does(runs):
    """One adapter over its base is served with the adapter merged (as `tunelab generate` does); the answers are
    those of the unmerged run."""
    app = create_app([runs["says-good"]], Limits())
    served = app.state.registry.models["says-good"]
    assert not hasattr(served.engine.model, "peft_config") and served.adapter is None
    assert any("adapter merged into the base" in line for line in app.state.registry.lines)
    gen = tunelab.load(runs["says-good"])
    assert hasattr(gen.model, "peft_config")  # tunelab.load alone keeps it unmerged
    prompts = [gen.render(f"say something about the {w}") for w in ("movie", "ending", "plot")]
    expected = gen.generate(prompts, max_new_tokens=6, strip=False)
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        got = [http.post("/v1/completions", json={"model": "says-good", "prompt": p, "max_tokens": 6,
                                                  "temperature": 0}).json()["choices"][0]["text"] for p in prompts]
    assert got == expected


def test_a_bf16_run_is_served_as_it_generates(tiny_llama, tmp_path, monkeypatch):
    """A run trained in bf16 generates with its base in bf16 under autocast; the server's batches run its model
    directly and must enter the same autocast (else the adapters compute in fp32 and answers drift from
    `tunelab generate`'s, as a SmolLM2 adapter's did)."""
    rows = [{"prompt": f"say something about the movie {i}", "response": "good good"} for i in range(20)]
    data = write_jsonl(tmp_path / "bf16.jsonl", rows)
    path = tunelab.train(_config(tmp_path, "bf16", tiny_llama, {"name": "lora", "r": 4}, "sft", data, max_steps=3,
                                 precision="bf16")).path
    app = create_app([path], Limits())
    model = app.state.registry.models["bf16"].engine.model
    assert model.dtype == torch.bfloat16
    seen = []
    forward = model.forward  # the server's step loop calls the model itself, token by token
    monkeypatch.setattr(model, "forward", lambda *a, **kw: seen.append(torch.is_autocast_enabled("cpu"))
                        or forward(*a, **kw))
    rendered = tunelab.load(path).render("say something about the film")
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": "bf16", "prompt": rendered, "max_tokens": 4,
                                               "temperature": 0})
    assert r.status_code == 200, r.text
    assert seen and all(seen)  # the prefill and every step
    assert r.json()["choices"][0]["text"] == tunelab.load(path).generate([rendered], max_new_tokens=4,
                                                                         strip=False)[0]


def test_bad_requests_get_4xx_in_openai_error_shape_and_the_server_keeps_answering(runs):
    app = _app(runs, max_tokens=32)
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        def check(r, status, code=None, param=None):
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if code:
                assert err["code"] == code, err
            if param:
                assert err["param"] == param, err

        ok = {"model": "says-good", "prompt": "say good", "max_tokens": 2, "temperature": 0}
        check(http.post("/v1/completions", json={**ok, "model": "nope"}), 404, "model_not_found", "model")
        check(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
              400)
        check(http.post("/v1/completions", json={**ok, "max_tokens": 0}), 400, "invalid_value", "max_tokens")
        check(http.post("/v1/completions", json={**ok, "max_tokens": 33}), 400, "invalid_value", "max_tokens")
        check(http.post("/v1/completions", json={**ok, "prompt": "movie " * 200}), 400, "context_length_exceeded")
        check(http.post("/v1/completions", json={**ok, "prompt": "x" * 200_001}), 400, "input_too_long")
        check(http.post("/v1/completions", json={**ok, "n": 3}), 400, param="n")
        check(http.post("/v1/completions", json={**ok, "temperature": 5}), 400, param="temperature")
        check(http.post("/v1/completions", json={"model": "says-good"}), 400, param="prompt")
        check(http.post("/v1/chat/completions", json={"model": "says-good", "messages": []}), 400, param="messages")
        check(http.post("/v1/chat/completions", json={"model": "says-good", "messages": [
            {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}), 400, param="messages")
        check(http.post("/v1/classify", json={"model": "says-good", "input": "x"}), 400, "wrong_endpoint")
        check(http.post("/v1/classify", json={"model": "sentiment", "input": ["x"] * 257}), 400, "too_many_inputs")
        check(http.post("/v1/classify", json={"model": "sentiment", "input": 3}), 400, param="input")
        check(http.get("/v1/nothing-here"), 404)
        assert http.post("/v1/completions", json=ok).status_code == 200  # still serving


def test_api_key_is_required_on_v1_routes(runs, monkeypatch):
    monkeypatch.setenv("TUNELAB_API_KEY", "s3cret")
    app = create_app([runs["sentiment"]])
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"model": "sentiment", "input": "great film"}
        r = http.post("/v1/classify", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.post("/v1/classify", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.post("/v1/classify", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200  # liveness checks need no key


def test_a_full_queue_answers_503_with_retry_after_and_nothing_else_fails(runs):
    app = create_app([runs["says-good"]], Limits(max_batch=1, batch_wait_ms=0, max_queue=2))
    with Serving(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        def ask(_):
            return http.post("/v1/completions", json={"model": "says-good", "prompt": "say good", "max_tokens": 48,
                                                      "temperature": 0})
        with ThreadPoolExecutor(24) as pool:
            replies = list(pool.map(ask, range(24)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 3, codes
    busy = next(r for r in replies if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["code"] == "queue_full"


def test_serving_refuses_runs_it_cannot_serve(runs, tmp_path):
    from tunelab.errors import RunError, TunelabError

    with pytest.raises(RunError, match="not a tunelab run directory"):
        Registry([tmp_path], Limits())
    with pytest.raises(TunelabError, match="at least one"):
        Registry([], Limits())


def test_empty_prompt_and_empty_classify_input(runs):
    """OpenAI completes an empty prompt from the start of text; an empty text has nothing to classify (400)."""
    app = _app(runs)
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.post("/v1/completions", json={"model": "says-good", "prompt": "", "max_tokens": 3,
                                               "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 1 and r.json()["choices"][0]["finish_reason"] in ("stop",
                                                                                                       "length")
        for bad in ("", "   ", ["fine", " "]):
            r = http.post("/v1/classify", json={"model": "sentiment", "input": bad})
            assert r.status_code == 400 and r.json()["error"]["code"] == "empty_input", r.text


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(runs):
    app = _app(runs, max_body_bytes=2**20)
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        big = json.dumps({"model": "sentiment", "input": "x" * (50 * 2**20)}).encode()
        r = http.post("/v1/classify", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "sentiment", "input": "'
            for _ in range(40):
                yield b"y" * 65536
            yield b'"}'
        r = http.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert http.post("/v1/classify", json={"model": "sentiment", "input": "fine"}).status_code == 200


def test_internal_errors_reach_the_client_as_an_id_never_their_text(runs, caplog):
    app = _app(runs)
    engine = app.state.registry.models["sentiment"].engine

    def broken(texts, pairs=None):
        raise RuntimeError("secret detail of /home/someone/model")

    engine.predict_proba = broken
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http, caplog.at_level("ERROR"):
        r = http.post("/v1/classify", json={"model": "sentiment", "input": "great"})
        assert r.status_code == 500
        message = r.json()["error"]["message"]
        assert "secret" not in r.text and "RuntimeError" not in r.text and "internal error (id " in message
        eid = message.split("(id ")[1].split(")")[0]
        assert any(eid in rec.getMessage() and "secret detail" in rec.getMessage() for rec in caplog.records)


def test_a_small_request_is_not_starved_by_large_ones(runs):
    """Units are taken round-robin across requests: a one-text request behind three that hold 256 texts each is
    answered within one batch's compute, not after all of theirs (FIFO would take ~4 s here)."""
    import threading
    import time

    app = create_app([runs["sentiment"]], Limits(max_batch=4, batch_wait_ms=5))
    engine = app.state.registry.models["sentiment"].engine
    real = engine.predict_proba

    def slow(texts, pairs=None):  # 5 ms per text: the compute of a bigger model
        time.sleep(0.005 * len(texts))
        return real(texts, pairs)

    engine.predict_proba = slow
    with Serving(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        big = {"model": "sentiment", "input": ["a long review of a film " * 50] * 256}
        threads = [threading.Thread(target=http.post, args=("/v1/classify",), kwargs={"json": big})
                   for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the three are queued and running
        t0 = time.perf_counter()
        r = http.post("/v1/classify", json={"model": "sentiment", "input": "short"})
        small = time.perf_counter() - t0
        for t in threads:
            t.join()
    assert r.status_code == 200
    # one batch is at most 16 texts (80 ms); FIFO would wait for the remaining ~600 texts (3 s)
    assert small < 1.0, f"small request took {small:.2f} s behind the large ones"


def test_with_a_key_docs_need_it_too_and_a_public_host_needs_a_key(runs, monkeypatch, tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.serve import read_api_key, serve

    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("k3y-from-file\n")
    assert read_api_key("on-the-command-line", str(key_file)) == "k3y-from-file"
    app = create_app([runs["sentiment"]], api_key="k3y-from-file")
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/docs").status_code == 401 and http.get("/openapi.json").status_code == 401
        ok = {"Authorization": "Bearer k3y-from-file"}
        assert http.get("/openapi.json", headers=ok).status_code == 200
    with pytest.raises(TunelabError, match="--allow-public"):
        serve([runs["sentiment"]], host="0.0.0.0")  # refused before anything is loaded


def test_a_foreign_host_is_refused_and_allow_host_admits_it(runs, monkeypatch):
    """DNS rebinding: a page whose domain resolves to 127.0.0.1 sends its own name as Host; the server refuses it
    in OpenAI's error shape, /health included; `tunelab serve --allow-host NAME` admits NAME. A wrong key of the
    right length is refused too (compared in constant time)."""
    from fastapi.testclient import TestClient

    from tunelab.cli import main

    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    with Serving(create_app([runs["sentiment"]])) as url, httpx.Client(base_url=url, timeout=60) as http:
        for path in ("/v1/models", "/health"):
            r = http.get(path, headers={"Host": "evil.example:8000"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", path
            assert "--allow-host evil.example" in r.json()["error"]["message"]
        body = {"model": "sentiment", "input": "fine"}
        assert http.post("/v1/classify", json=body, headers={"Host": "evil.example"}).status_code == 400
        assert http.post("/v1/classify", json=body).status_code == 200  # loopback

    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve", str(runs["sentiment"]), "--allow-host", "api.team.example", "--api-key", "k3y"]) == 0
    key = {"Authorization": "Bearer k3y"}
    assert TestClient(served["app"], base_url="http://api.team.example:8000").get(
        "/v1/models", headers=key).status_code == 200
    assert TestClient(served["app"], base_url="http://127.0.0.1:8000").get("/v1/models", headers=key).status_code \
        == 200
    assert TestClient(served["app"], base_url="http://evil.example:8000").get("/v1/models", headers=key).status_code \
        == 400
    wrong = TestClient(served["app"], base_url="http://127.0.0.1:8000").get("/v1/models",
                                                                             headers={"Authorization": "Bearer k3Y"})
    assert wrong.status_code == 401


def _slow(monkeypatch, model, seconds: float = 0.01) -> None:
    """Each forward pass takes `seconds` more: the compute of a bigger model (the tiny one writes 400 tokens in
    well under a second)."""
    import time

    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **kw: time.sleep(seconds) or forward(*a, **kw))


def _wait_for(condition, seconds: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_short_request_joins_the_running_batch_and_answers_as_alone(runs, monkeypatch):
    """Continuous batching: with four 100-token completions running, a 3-token one joins them at the next step,
    finishes while they still run, and writes what it writes alone (its cache padded to theirs changes nothing)."""
    import threading

    app = create_app([runs["says-good"], runs["says-bad"]], Limits())
    loop = app.state.registry.models["says-good"].worker
    assert type(loop).__name__ == "Loop"
    _slow(monkeypatch, app.state.registry.models["says-good"].engine.model)
    assert any("continuous batching" in line for line in app.state.registry.lines)
    rendered = app.state.registry.models["says-bad"].engine.render("say something about the plot")
    with Serving(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        alone = http.post("/v1/completions", json={"model": "says-bad", "prompt": rendered, "max_tokens": 3,
                                                   "temperature": 0}).json()["choices"][0]["text"]
        long = {"prompt": "say something about the story", "max_tokens": 100, "temperature": 0, "ignore_eos": True}
        replies = []
        threads = [threading.Thread(target=lambda n=n: replies.append(http.post("/v1/completions", json={
            "model": n, **long}).json())) for n in ("says-good", "says-bad", "says-good", "says-bad")]
        for t in threads:
            t.start()
        _wait_for(lambda: len(loop.running) == 4 and loop.steps > 5)
        assert loop.steps < 50
        r = http.post("/v1/completions", json={"model": "says-bad", "prompt": rendered, "max_tokens": 3,
                                               "temperature": 0})
        still_running = sum(j.max_tokens == 100 and j.finish_reason is None for j in list(loop.running))
        for t in threads:
            t.join()
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone
    assert still_running == 4  # the long ones had not finished: it did not wait for them
    assert [x["usage"]["completion_tokens"] for x in replies] == [100] * 4  # ignore_eos: every token asked for


def test_a_client_gone_mid_stream_is_cancelled_and_frees_its_slot(runs, monkeypatch):
    """A streamed 100-token completion whose client leaves after three chunks stops being generated: the loop
    cancels it at the next step (well before 100 tokens) and answers the next request at once."""
    import time

    app = create_app([runs["says-good"]], Limits())
    loop = app.state.registry.models["says-good"].worker
    _slow(monkeypatch, app.state.registry.models["says-good"].engine.model, 0.03)
    body = {"model": "says-good", "prompt": "say something about the actor", "max_tokens": 100,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with Serving(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line)
                if len(chunks) == 3:
                    break
        gone = time.monotonic()
        _wait_for(lambda: loop.cancelled == 1 and not loop.running, seconds=5)
        freed = time.monotonic() - gone
        steps = loop.steps
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={"model": "says-good", "prompt": "say good", "max_tokens": 1,
                                               "temperature": 0})
        next_s = time.monotonic() - t0
    assert r.status_code == 200
    assert steps < 50, f"{steps} steps: the cancelled request kept generating"
    assert freed < 1.0 and next_s < 5.0, (freed, next_s)
