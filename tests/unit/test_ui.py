"""`tunelab ui` without a browser (FastAPI's TestClient): clear pages for no runs, a failed run and a damaged
metrics.jsonl; the form ↔ config round trip; and the safety rules (loopback by default, the key, paths and
uploads)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tunelab.errors import TunelabError
from tunelab.ui.app import create_app


def _client(app, **kw) -> TestClient:
    """A client that asks as the UI's own pages do: a loopback Host, and the process's form token (the header form
    of the hidden field every form of the UI sends)."""
    return TestClient(app, base_url="http://127.0.0.1:7860", headers={"X-CSRF-Token": app.state.csrf_token}, **kw)


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return _client(create_app(tmp_path / "runs"), raise_server_exceptions=False)


def _run(folder, state="completed", metrics=None, jsonl=None, **status):
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": state, "started_at": "2026-11-30T10:00:00", **status}))
    (folder / "config.yaml").write_text("task: classify\nmodel: {name: minilm}\nmethod: {name: lora}\n")
    if metrics is not None:
        (folder / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    if jsonl is not None:
        (folder / "metrics.jsonl").write_text(jsonl)


def test_pages_for_no_runs_a_failed_run_and_damaged_files(client, tmp_path):
    page = client.get("/")
    assert page.status_code == 200 and 'id="empty"' in page.text
    runs = tmp_path / "runs"
    _run(runs / "broken", state="failed", error="DataError: reviews.jsonl, row 7: `text` is empty")
    _run(runs / "damaged", jsonl='{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6\nnot json\n',
         metrics="{not json", )
    _run(runs / "good", metrics={"test": {"accuracy": 0.875, "confusion_matrix": {"labels": ["a", "b"],
                                                                                  "matrix": [[3, 1], [0, 4]]}}},
         jsonl='{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.5, "eval_loss": 0.6}\n')
    page = client.get("/")
    assert page.status_code == 200
    assert "row 7: `text` is empty" in page.text and "accuracy 0.8750" in page.text
    assert "metrics.json cannot be read" in page.text  # said beside the run, not raised
    failed = client.get("/runs/broken")
    assert failed.status_code == 200 and 'id="run-error"' in failed.text and "row 7" in failed.text
    damaged = client.get("/runs/damaged")
    assert damaged.status_code == 200
    assert "metrics.jsonl, line 2: not valid JSON (skipped)" in damaged.text
    assert "metrics.jsonl, line 3: not valid JSON (skipped)" in damaged.text
    chart = client.get("/chart", params={"run": "damaged"})  # the readable lines are still drawn
    assert chart.status_code == 200 and chart.content[:4] == b"\x89PNG"
    good = client.get("/runs/good")
    assert 'id="confusion"' in good.text and "Try it" in good.text
    side = client.get("/compare", params=[("run", "good"), ("run", "damaged")])
    assert side.status_code == 200 and "0.8750" in side.text
    missing = client.get("/runs/nothing-here")
    assert missing.status_code == 404 and "there is no run here" in missing.text


def test_runs_are_found_where_runs_live_and_nowhere_else(tmp_path):
    """The runs list: top-level runs, compare entries (DIR/runs/NAME) and search trials (DIR/trials/NNN); not a
    status.json inside a run's own folders (a run is not entered), in a hidden folder, or deeper than four levels."""
    from tunelab.ui import jobs

    runs = tmp_path / "runs"
    _run(runs / "plain")
    _run(runs / "cmp" / "runs" / "lora")
    _run(runs / "study" / "trials" / "003")
    _run(runs / "plain" / "model" / "copied-run")  # e.g. a run folder a user copied into a model folder
    _run(runs / ".ui" / "jobs" / "x")
    _run(runs / "a" / "b" / "c" / "d" / "too-deep")
    assert sorted(r.name for r in jobs.list_runs(runs)) == ["cmp/runs/lora", "plain", "study/trials/003"]
    assert jobs.list_runs(tmp_path / "nothing") == []


def test_the_form_is_the_config(client, tmp_path):
    """Every field of the config sections a run reads is on the form, with its help; the chosen method's own
    options appear; a bad value comes back beside its field in the CLI's words; a good form is the YAML run."""
    from tunelab.config import Config, TrainConfig

    page = client.get("/new", params={"task": "classify", "method": "lora"})
    for key in TrainConfig.model_fields:
        assert f'id="train.{key}"' in page.text
    assert 'id="method.r"' in page.text and 'id="method.rslora"' in page.text
    assert Config.model_fields["data"].annotation.model_fields["leakage"].description.split(":")[0][:30] in page.text
    head = client.get("/new", params={"task": "classify", "method": "head"})
    assert 'id="method.r"' not in head.text
    sft = client.get("/new", params={"task": "sft"})
    assert 'id="data.prompt_format"' in sft.text and 'id="data.label"' not in sft.text
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    form = {"name": "r1", "task": "classify", "method": "lora", "f:model.name": "minilm", "f:data.train": str(data),
            "f:train.lr": "-1", "f:train.epochs": "two", "action": "validate"}
    bad = client.post("/new", data=form)
    assert bad.status_code == 400
    assert 'id="error-train.lr"' in bad.text and "greater than 0" in bad.text
    assert 'id="error-train.epochs"' in bad.text
    good = client.post("/new", data={**form, "f:train.lr": "1e-4", "f:train.epochs": "2"})
    assert good.status_code == 200 and 'id="valid"' in good.text
    saved = (tmp_path / "runs" / ".ui" / "configs" / "r1.yaml").read_text()
    assert "lr: 0.0001" in saved.replace("'", "") or "lr: 1e-4" in saved.replace("'", "")
    assert client.get("/configs/r1.yaml").text == saved


def test_paths_uploads_and_names_stay_inside(client, tmp_path):
    form = {"name": "r2", "task": "classify", "method": "lora", "f:model.name": "minilm",
            "f:data.train": "/etc/passwd", "action": "validate"}
    outside = client.post("/new", data=form)
    assert outside.status_code == 400 and "outside the folders the UI may read" in outside.text
    assert client.post("/new", data={**form, "name": "../up"}).status_code == 400
    assert client.get("/runs/../../etc").status_code in (403, 404)
    assert client.get("/file", params={"run": "x", "name": "../../etc/passwd"}).status_code == 403
    up = client.post("/new", data={**form, "f:data.train": ""},
                     files={"upload": ("reviews.jsonl", b'{"text": "a", "label": "x"}\n' * 3)})
    stored = list((tmp_path / "runs" / ".ui" / "uploads").glob("*reviews.jsonl"))
    assert len(stored) == 1 and str(stored[0]) in up.text  # the uploaded file became data.train
    small = _client(create_app(tmp_path / "runs", max_upload_mb=0.001), raise_server_exceptions=False)
    big = small.post("/new", data={**form, "f:data.train": ""}, files={"upload": ("big.jsonl", b"x" * 5000)})
    assert big.status_code == 400 and "larger than the upload limit" in big.text
    exe = small.post("/new", data={**form, "f:data.train": ""}, files={"upload": ("run.sh", b"echo")})
    assert "upload a .jsonl" in exe.text


def test_key_and_host(tmp_path, monkeypatch):
    from tunelab.ui import ui

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelabError, match="--host 0.0.0.0 would open the UI"):
        ui(host="0.0.0.0", runs_dir=str(tmp_path / "runs"))
    locked = _client(create_app(tmp_path / "runs", api_key="s3cret"))
    assert locked.get("/").status_code == 401
    assert locked.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    for wrong in ("s3creT", "s3cre", ""):  # the right length, a prefix, nothing: compared in constant time
        assert locked.get("/", params={"key": wrong}).status_code == 401
        assert locked.get("/", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
    first = locked.get("/runs/x", params={"key": "s3cret", "tab": "log"}, follow_redirects=False)
    # the key moves from the URL into a cookie scripts cannot read and other sites' requests do not carry
    assert first.status_code == 303 and first.headers["location"] == "/runs/x?tab=log"
    cookie = first.headers["set-cookie"]
    assert "tunelab_ui_key=s3cret" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    opened = locked.get("/")
    assert opened.status_code == 200 and "s3cret" not in opened.text  # the cookie it set; no link carries the key


def test_data_check_and_compare_job_from_the_form(client, tmp_path, tiny_bert, monkeypatch):
    """Check data prints `tunelab data check`; Start compare launches `tunelab compare` as its own process (the
    command is recorded; the process is stopped at once) and its page shows the job."""
    import time

    from conftest import sample_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(60))
    form = {"name": "cmp", "task": "classify", "method": "head", "f:model.name": str(tiny_bert),
            "f:data.train": str(data), "f:train.max_steps": "2", "action": "check"}
    checked = client.post("/new", data=form)
    assert checked.status_code == 200 and 'id="data-report"' in checked.text
    report = checked.text[checked.text.index('id="data-report"'):]
    assert "labels: negative" in report and "leakage: none" in report
    started = client.post("/new", data={**form, "action": "compare", "f:compare.methods": "[head]"},
                          follow_redirects=False)
    assert started.status_code == 303 and started.headers["location"] == "/groups/compare-cmp"
    job = client.app.state.jobs.job("cmp")
    assert job["kind"] == "compare" and job["cmd"][2:5] == ["tunelab", "compare", job["config"]]
    assert job["cmd"][-2:] == ["--out", str(tmp_path / "runs" / "compare-cmp")]
    page = client.get("/groups/compare-cmp")
    assert page.status_code == 200 and "compare job started from this UI" in page.text
    client.post("/stop", params={"run": "cmp", "back": "/groups/compare-cmp"})
    end = time.time() + 30
    while time.time() < end and client.app.state.jobs.job("cmp")["alive"]:
        time.sleep(0.3)
    assert not client.app.state.jobs.job("cmp")["alive"]


def test_a_job_that_died_before_its_run_existed_says_so(client, tmp_path):
    jobs = tmp_path / "runs" / ".ui" / "jobs"
    jobs.mkdir(parents=True)
    gone = 2 ** 22 + 7  # above the kernel's pid_max: no such process
    (jobs / "early.json").write_text(json.dumps({"name": "early", "kind": "train", "pid": gone, "config": "x.yaml",
                                                 "cmd": [], "started": 0}))
    (jobs / "early.log").write_text("tunelab: error: model folder /nowhere does not exist\n")
    page = client.get("/runs/early")
    assert page.status_code == 200
    assert "did not start" in page.text and "model folder /nowhere does not exist" in page.text


def test_cross_site_requests_start_stop_and_write_nothing(client, tmp_path, tiny_bert, monkeypatch):
    """A page on another site posting to each state-changing route (a form, so no CORS preflight) is refused with
    403 before the route runs: no job started or stopped, no config or run folder written. So is a request without
    the process's form token; the same form from the UI's own page (same origin, token) goes through."""
    from conftest import sample_rows, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(40))
    _run(tmp_path / "runs" / "done")
    jobs, calls = client.app.state.jobs, []
    monkeypatch.setattr(jobs, "start", lambda *a, **k: calls.append(("start", a)))
    monkeypatch.setattr(jobs, "stop", lambda *a, **k: calls.append(("stop", a)))
    monkeypatch.setattr("tunelab.ui.app.try_run", lambda *a: calls.append(("try", a)) or {"text": "tried"})
    monkeypatch.setattr("tunelab.ui.app.stream_run", lambda *a: calls.append(("stream", a)) or iter([]))
    train = {"name": "evil", "task": "classify", "method": "head", "f:model.name": str(tiny_bert),
             "f:data.train": str(data), "f:train.max_steps": "1", "action": "train"}
    posts = [("/new", train), ("/new", {**train, "action": "validate"}), ("/new", {**train, "action": "redraw"}),
             ("/stop?run=done", {}), ("/resume?run=done", {}), ("/runs/done", {"text": "hello"}),
             ("/try/done", {"text": "hello"})]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    foreign = [{"Origin": "http://evil.example", "Referer": "http://evil.example/page"},
               {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
               {"Sec-Fetch-Site": "same-site"},  # e.g. another server on localhost:8888
               {"Referer": "http://127.0.0.1:9999/elsewhere"},  # an old browser sends no Origin
               {"Origin": "null"}]  # a sandboxed frame or a redirect
    for path, form in posts:
        for headers in foreign:
            r = client.post(path, data=form, headers=headers, follow_redirects=False)
            assert r.status_code == 403 and "from another site" in r.text, (path, headers, r.status_code)
        bare = _client(client.app)
        bare.headers.pop("X-CSRF-Token")  # a script or an old browser: no Origin, and no token either
        r = bare.post(path, data={**form, "csrftoken": "guessed"}, follow_redirects=False)
        assert r.status_code == 403 and "form token is missing" in r.text, path
    assert calls == [] and jobs.jobs() == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written

    own = {"Origin": "http://127.0.0.1:7860", "Sec-Fetch-Site": "same-origin"}
    started = client.post("/new", data=train, headers=own, follow_redirects=False)
    assert started.status_code == 303 and calls == [("start", ("train", "evil", jobs.configs / "evil.yaml"))]
    page = _client(client.app)
    page.headers.pop("X-CSRF-Token")  # the hidden field the page's own form carries
    form = page.get("/runs/done").text
    assert f'name="csrftoken" value="{client.app.state.csrf_token}"' in form
    tried = page.post("/runs/done", data={"text": "hello", "csrftoken": client.app.state.csrf_token}, headers=own)
    assert tried.status_code == 200 and calls[-1][0] == "try"
    redraw = client.post("/new", data={**train, "action": "redraw", "method": "lora"}, follow_redirects=False)
    assert redraw.status_code == 303 and "csrftoken" not in redraw.headers["location"]
    assert "method=lora" in redraw.headers["location"]


def test_a_foreign_host_is_refused_and_allow_host_admits_it(tmp_path, monkeypatch):
    """DNS rebinding: a page whose domain now resolves to 127.0.0.1 sends its own name as Host — refused with one
    sentence, GET included (it would read runs, configs and predictions); loopback names and addresses answer;
    --allow-host adds names (and `*.domain`); a wildcard bind admits address literals (they cannot be rebound)."""
    from tunelab.serve.guard import HostPolicy

    monkeypatch.chdir(tmp_path)
    app = create_app(tmp_path / "runs")
    plain = TestClient(app)
    for host in ("evil.example:7860", "evil.example", "127.0.0.1.evil.example", "localhost.evil.example", ""):
        r = plain.get("/", headers={"Host": host})
        assert r.status_code == 400 and "--allow-host" in r.text, host
        assert plain.get("/file", params={"run": "x", "name": "config.yaml"}, headers={"Host": host}).status_code \
            == 400
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "127.0.0.2", "LocalHost"):
        assert plain.get("/", headers={"Host": host}).status_code == 200, host
    team = TestClient(create_app(tmp_path / "runs", hosts=HostPolicy("0.0.0.0", ["ui.team.example",
                                                                                  "*.lab.example"])))
    for host, status in (("ui.team.example:7860", 200), ("gpu1.lab.example", 200), ("lab.example", 400),
                         ("10.1.2.3:7860", 200), ("evil.example", 400)):
        assert team.get("/", headers={"Host": host}).status_code == status, host


def test_allow_host_reaches_the_ui_process(tmp_path):
    """`tunelab ui --allow-host NAME`: the flag reaches the running server."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--port", str(port), "--allow-host",
                             "ui.team.example"], cwd=tmp_path, env={**os.environ, "TUNELAB_API_KEY": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(120):
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, "tunelab ui exited"
                time.sleep(0.25)
        assert httpx.get(url, headers={"Host": f"ui.team.example:{port}"}).status_code == 200
        refused = httpx.get(url, headers={"Host": f"evil.example:{port}"})
        assert refused.status_code == 400 and "--allow-host evil.example" in refused.text
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_playground_streams_the_answers_as_they_are_written(tmp_path, monkeypatch, tiny_llama):
    """/try/RUN (what the run page's script reads) sends the run's answer, then the base model's, as server-sent
    events while they are written: the first piece arrives steps before the answer ends, and the pieces join into
    what `generate` writes for the same prompt."""
    import time

    import httpx
    import yaml

    import tunelab
    from conftest import Serving, write_jsonl

    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in ["good", "bad", "great", "awful"] * 10]
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_llama), "max_length": 32}, "task": "sft",
        "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "leakage": "ignore",
                 "split": {"validation": 0.1, "test": 0.1}},
        "method": {"name": "lora", "r": 4}, "train": {"max_steps": 1, "lr": 1e-6, "precision": "fp32"},
        "eval": {"forgetting": None, "max_generate": 2, "max_new_tokens": 4},
        "output": {"dir": str(tmp_path / "runs" / "gen")}}))
    path = tunelab.train(cfg).path
    reference = tunelab.load(path)
    prompt = reference.render("say good")
    expected = reference.generate([prompt], max_new_tokens=12)[0]
    with reference.adapter_disabled() as base:
        expected_base = base.generate([prompt], max_new_tokens=12)[0]
    assert len(expected.split()) >= 4  # enough words to stream in several pieces

    load, step = tunelab.load, 0.05

    def slow_load(p):  # each forward pass takes 50 ms more: a model big enough for streaming to matter
        gen = load(p)
        model = gen.model.get_base_model()  # what peft's generate calls each step
        forward = model.forward
        model.forward = lambda *a, **kw: time.sleep(step) or forward(*a, **kw)
        return gen
    monkeypatch.setattr(tunelab, "load", slow_load)
    app = create_app(tmp_path / "runs")
    events = []
    with Serving(app) as url, httpx.Client(base_url=url, timeout=60,
                                           headers={"X-CSRF-Token": app.state.csrf_token}) as http:
        with http.stream("POST", "/try/gen", data={"text": "say good", "max_new_tokens": "12"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), json.loads(line[6:])))
        page = http.get("/runs/gen").text  # which engine wrote the test answers, and each engine's parity
    assert 'id="test-engine"' in page and "written by torch (fp32, adapter merged into the base)" in page
    assert 'id="engines"' in page and "<td>torch (fp32, adapter merged)</td><td>100.0%</td>" in page
    kinds = [e for _, e in events]
    assert kinds[0] == {"prompt": prompt} and not any("error" in e for e in kinds)
    tuned = [(t, e["text"]) for t, e in events if e.get("side") == "tuned"]
    ended = next(t for t, e in events if e.get("end") == "tuned")
    assert "".join(x for _, x in tuned).strip() == expected
    assert "".join(e["text"] for e in kinds if e.get("side") == "base").strip() == expected_base
    assert len(tuned) >= 3 and ended - tuned[0][0] > 4 * step  # the first words came while the rest were written
