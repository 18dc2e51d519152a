"""`tunelab ui` without a browser (FastAPI's TestClient): clear pages for no runs, a failed run and a damaged
metrics.jsonl; the form ↔ config round trip; and the safety rules (loopback by default, the key, paths and
uploads)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tunelab.errors import TunelabError
from tunelab.ui.app import create_app


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return TestClient(create_app(tmp_path / "runs"), raise_server_exceptions=False)


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
    small = TestClient(create_app(tmp_path / "runs", max_upload_mb=0.001), raise_server_exceptions=False)
    big = small.post("/new", data={**form, "f:data.train": ""}, files={"upload": ("big.jsonl", b"x" * 5000)})
    assert big.status_code == 400 and "larger than the upload limit" in big.text
    exe = small.post("/new", data={**form, "f:data.train": ""}, files={"upload": ("run.sh", b"echo")})
    assert "upload a .jsonl" in exe.text


def test_key_and_host(tmp_path, monkeypatch):
    from tunelab.ui import ui

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelabError, match="--host 0.0.0.0 would open the UI"):
        ui(host="0.0.0.0", runs_dir=str(tmp_path / "runs"))
    locked = TestClient(create_app(tmp_path / "runs", api_key="s3cret"))
    assert locked.get("/").status_code == 401
    assert locked.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    opened = locked.get("/", params={"key": "s3cret"})
    assert opened.status_code == 200 and locked.get("/").status_code == 200  # the cookie it set


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
