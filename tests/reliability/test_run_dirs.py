"""Run directories a user can trust: nothing deleted that tunelab did not write, one process per run, and a run
killed at any point resumes to exactly what an uninterrupted run gives — checked by killing real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import untimed
from tunelab.cli import main
from tunelab.runs import read_status, run_status

# Runs `tunelab` in a child process with two test hooks: every training step sleeps SLEEP seconds (so the training
# time is long enough to check how it adds up), and the process kills itself with SIGKILL at the chosen moment.
DRIVER = '''
import os, signal, sys, time
from transformers import TrainerCallback
import tunelab.runs as R
import tunelab.trainer as T

mode, at, sleep = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

class Hooks(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(sleep)

    def on_step_begin(self, args, state, control, **kwargs):
        if mode == "after-checkpoint" and state.global_step == at:  # checkpoint `at` is complete on disk
            os.kill(os.getpid(), signal.SIGKILL)

callbacks = T.callbacks
T.callbacks = lambda *a, **k: callbacks(*a, **k) + [Hooks()]
publish = R.publish_dir

def publish_or_die(tmp, target):
    if mode == "final-save" and target.name == "model":  # the final model is written, not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return publish(tmp, target)

R.publish_dir = publish_or_die
from tunelab.cli import main
sys.exit(main(sys.argv[4:]))
'''

SLEEP = 0.25
STEPS = 8
TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
          "eval_samples_per_second", "eval_steps_per_second", "train_loss", "train_tokens_per_second"}


def _drive(tmp_path: Path, mode: str, at: int, *args: str, wait: bool = True):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), mode, str(at), str(SLEEP), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def resumable(make_config):
    """A classifier run with a checkpoint every 2 of its 8 steps, fp32, logging every step."""
    def make(name):
        return make_config("full", name=name, train={"max_steps": STEPS, "eval_every": 2, "logging_steps": 1,
                                                     "batch_size": 8})
    return make


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _jsonl(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


@pytest.mark.parametrize("mode,at", [("after-checkpoint", 4), ("final-save", 0)])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, resumable, mode, at):
    import torch

    ref_cfg, cfg = resumable("reference"), resumable("killed")
    done = _drive(tmp_path, "none", 0, "train", str(ref_cfg))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ref = tmp_path / "runs" / "reference"

    killed = _drive(tmp_path, mode, at, "train", str(cfg))
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    run = tmp_path / "runs" / "killed"
    assert read_status(run)["state"] == "running"  # as the dead process left it...
    assert run_status(run)["state"] == "interrupted"  # ...and known for what it is: nobody holds its lock
    if mode == "final-save":
        assert any(p.name.startswith(".model.partial-") for p in run.iterdir())  # the half-published model

    resumed = _drive(tmp_path, "none", 0, "train", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    status = read_status(run)
    assert status["state"] == "completed" and len(status["resumed_at"]) == 1
    assert status["started_at"] < status["resumed_at"][0]
    # no orphan: the same files as the uninterrupted run
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in ref.iterdir())
    metrics, ref_metrics = (json.loads((r / "metrics.json").read_text()) for r in (run, ref))
    assert metrics["train"]["steps"] == ref_metrics["train"]["steps"] == STEPS
    assert untimed(metrics) == untimed(ref_metrics)
    assert _jsonl(run) == _jsonl(ref)  # no line twice, none missing
    w, ref_w = _weights(run), _weights(ref)
    assert w.keys() == ref_w.keys() and all(torch.equal(w[k], ref_w[k]) for k in w)
    # the training time adds up the parts: 8 steps of at least SLEEP s each, though the resumed part ran fewer;
    # the speed is the whole run's examples over that time
    t, ref_t = metrics["train"], ref_metrics["train"]
    assert t["runtime_s"] >= STEPS * SLEEP and json.loads((run / "manifest.json").read_text())["train_time_s"] == \
        t["runtime_s"]
    # of which the validation passes every 2 steps took validation_s, each part's counted once; speeds leave it out
    for r, m in ((run, t), (ref, ref_t)):
        passes = [x["eval_runtime"] for x in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
                  if "eval_runtime" in x]
        assert len(passes) == STEPS // 2 and m["validation_s"] == pytest.approx(sum(passes), abs=0.006)
    assert t["examples_per_s"] == pytest.approx(STEPS * 8 / (t["runtime_s"] - t["validation_s"]), rel=0.02)
    assert t["examples_per_s"] == pytest.approx(ref_t["examples_per_s"], rel=0.35)
    assert len(t["epoch_s"]) == len(ref_t["epoch_s"]) and sum(t["epoch_s"]) >= STEPS * SLEEP


def test_a_second_train_on_a_live_run_is_refused(tmp_path, resumable, capsys):
    cfg = resumable("busy")
    run = tmp_path / "runs" / "busy"
    first = _drive(tmp_path, "none", 0, "train", str(cfg), wait=False)
    try:
        deadline = time.monotonic() + 120
        while (read_status(run) or {}).get("state") != "running":
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.1)
        for flag in ("--overwrite", "--resume"):
            assert main(["train", str(cfg), flag]) == 2
            err = capsys.readouterr().err
            assert f"is in use by another tunelab process (pid {first.pid}" in err, err
        assert main(["predict", str(run), "good film"]) == 2
        assert "is still training" in capsys.readouterr().err
        assert first.wait(timeout=300) == 0, first.stdout.read()
    finally:
        first.kill()
    assert read_status(run)["state"] == "completed"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # one writer: no
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # interleaved lines


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_keeps_user_files_in_one(make_config, tmp_path, capsys):
    target = tmp_path / "runs" / "mine"
    target.mkdir(parents=True)
    (target / "thesis.tex").write_text("two years of work")
    cfg = make_config("features", name="mine")
    for flags in ([], ["--overwrite"], ["--resume"]):
        assert main(["train", str(cfg), *flags]) == 2
        err = capsys.readouterr().err
        assert "is not a tunelab run" in err and "does not write into or delete" in err, err
    assert [p.name for p in target.iterdir()] == ["thesis.tex"]

    # a real run, with a user's file added to it: --overwrite replaces the run and keeps the file
    other = make_config("features", name="run")
    assert main(["train", str(other)]) == 0
    (tmp_path / "runs" / "run" / "notes.md").write_text("mine")
    assert main(["train", str(other), "--overwrite"]) == 0
    assert (tmp_path / "runs" / "run" / "notes.md").read_text() == "mine"
    assert "kept 1 entry tunelab did not write: notes.md" in capsys.readouterr().out


def test_a_dead_running_run_is_reported_interrupted(make_config, tmp_path, capsys):
    cfg = make_config("features", name="ghost")
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "ghost"
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "state": "running", "pid": 999_999_999}))
    assert main(["predict", str(run), "fine"]) == 2
    err = capsys.readouterr().err
    assert "state: interrupted" in err and "pid 999999999" in err and "--resume" in err
    assert main(["train", str(cfg)]) == 2
    assert "unfinished run (interrupted)" in capsys.readouterr().err
    assert main(["train", str(cfg), "--resume"]) == 0 and read_status(run)["state"] == "completed"


def test_export_and_merge_never_replace_a_folder_they_did_not_write(make_config, tmp_path, capsys):
    cfg = make_config({"name": "lora", "r": 4}, name="lora", train={"max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "lora"
    mine = tmp_path / "deploy"
    mine.mkdir()
    (mine / "keep.txt").write_text("user data")
    assert main(["export", str(run), "--out", str(mine)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert main(["merge", str(run), "--out", str(mine)]) == 2
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    # its own earlier output is replaced, in one step
    for _ in range(2):
        assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
        assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert (tmp_path / "merged" / "export.json").exists() and (tmp_path / "hf" / "export.json").exists()


def test_compare_and_search_only_overwrite_runs_they_made(make_config, tmp_path, capsys):
    from tunelab.errors import RunError
    from tunelab.runs import replaceable

    mine = tmp_path / "c" / "runs" / "features"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("x")
    cfg = make_config("features", name="cmp", compare={"methods": ["features"], "dir": str(tmp_path / "c")})
    assert main(["compare", str(cfg)]) == 1
    assert "is not a tunelab run" in capsys.readouterr().out
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    # a run trained there by hand (another output.dir in its config) is not compare's to replace
    hand = make_config("features", name="hand")
    assert main(["train", str(hand)]) == 0
    replaceable(tmp_path / "runs" / "hand", "tunelab search")  # its config names this folder: a re-run may replace it
    (tmp_path / "moved").mkdir()
    os.replace(tmp_path / "runs" / "hand", tmp_path / "moved" / "hand")
    with pytest.raises(RunError, match="did not make"):
        replaceable(tmp_path / "moved" / "hand", "tunelab search")
