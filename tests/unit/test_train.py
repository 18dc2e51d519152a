"""End to end on the tiny model: each method trains, saves a complete run, and predicts as it evaluated."""
import json
import os

import numpy as np
import pandas as pd
import pytest

import tunelab
from conftest import sample_rows, untimed, write_jsonl
from tunelab.cli import main
from tunelab.errors import RunError
from tunelab.runs import read_status

METHOD_SPECS = {
    "features": {"name": "features"},
    "head": {"name": "head"},
    "last_layers": {"name": "last_layers", "layers": 1},
    "full": {"name": "full"},
    "lora": {"name": "lora", "r": 4},
}


@pytest.mark.parametrize("method", list(METHOD_SPECS))
def test_method_runs_end_to_end(make_config, method):
    # bf16: the Trainer leaves the in-memory model wrapped in autocast; the recorded metrics must still be the
    # saved model's, in fp32, exactly as `predict` computes them
    path = make_config(method=METHOD_SPECS[method], name=method, train={"precision": "bf16"})
    result = tunelab.train(path)
    run = result.path
    assert read_status(run)["state"] == "completed"
    for name in ("config.yaml", "metrics.json", "manifest.json", "predictions_test.jsonl", "model/labels.json"):
        assert (run / name).exists(), name
    assert not (run / "checkpoints").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["parameters"]["trainable"] > 0 and manifest["peak_rss_mb"] > 0
    phases = manifest["peak_rss_mb_by_phase"]  # each phase's own peak (reset between phases on Linux)
    # load: model, data and trainer up to the first step (split off when the Trainer starts; `features` has none)
    expected = ["startup", "data", "train", "evaluate"] if method == "features" else \
        ["startup", "data", "load", "train", "evaluate"]
    assert list(phases) == expected and all(v > 0 for v in phases.values())
    assert max(phases.values()) <= manifest["peak_rss_mb"] + 1 and result.metrics["evaluate_s"] > 0
    assert manifest["data_files"] and manifest["config_hash"] == tunelab.validate(run / "config.yaml").hash()
    metrics = result.metrics
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["test"]["examples"] == len(
        pd.read_json(run / "predictions_test.jsonl", lines=True))
    if method != "features":
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().split("\n") if x]
        assert any("loss" in r for r in records) and any("eval_loss" in r for r in records)
        assert (run / "loss.png").stat().st_size > 1000
    # a reloaded run predicts exactly what the end-of-training evaluation recorded
    saved = pd.read_json(run / "predictions_test.jsonl", lines=True)
    clf = tunelab.load(run)
    assert clf.predict(saved["text"].tolist()) == saved["predicted"].tolist()
    probs = clf.predict_proba(saved["text"].tolist())
    assert np.allclose([p[x] for p, x in zip(probs, saved["predicted"])], saved["probability"], atol=1e-6)


def test_lora_adapter_holds_head_and_reload_is_exact(make_config):
    result = tunelab.train(make_config(method={"name": "lora", "r": 4}, name="lora-exact"))
    files = {p.name for p in (result.path / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    from safetensors import safe_open

    with safe_open(str(result.path / "model" / "adapter_model.safetensors"), "pt") as f:
        assert any("classifier" in k for k in f.keys())
    texts = [r["text"] for r in sample_rows()[:50]]
    a, b = tunelab.load(result.path).logits(texts), tunelab.load(result.path).logits(texts)
    assert np.array_equal(a, b)


def test_learning_happens(make_config, tmp_path):
    """Full fine-tuning of the tiny model learns a keyword task: loss falls and test accuracy is high."""
    rng = np.random.default_rng(0)
    fillers = ["the movie was", "this phone is", "our food was", "the service is", "that plot was", "it is"]
    rows = [{"text": f"{rng.choice(fillers)} {word} {rng.choice(['really', 'so', 'very', ''])}".strip() + f" {i}",
             "label": label} for i in range(300) for word, label in [(["good", "great"][i % 2], "positive"),
                                                                   (["bad", "awful"][i % 2], "negative")]]
    data = write_jsonl(tmp_path / "keywords.jsonl", rows)
    path = make_config(method="full", name="learns", data={"train": str(data)}, train={"epochs": 3, "lr": 3e-3})
    result = tunelab.train(path)
    records = [json.loads(x) for x in (result.path / "metrics.jsonl").read_text().split("\n") if x]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2
    assert result.metrics["test"]["accuracy"] > 0.9


def test_cli_train_eval_predict(make_config, tmp_path, capsys):
    path = make_config(method="head", name="cli")
    assert main(["train", str(path)]) == 0
    run = tmp_path / "runs" / "cli"
    test_file = write_jsonl(tmp_path / "more.jsonl", sample_rows()[-30:])
    assert main(["eval", str(run), "--data", str(test_file)]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert (run / "evaluations" / "more.json").exists()
    assert json.loads((run / "evaluations" / "more.json").read_text())["overlap_with_train"] == 0
    train_file = tmp_path / "train.jsonl"  # the run's own training data: eval must say it overlaps
    assert main(["eval", str(run), "--data", str(train_file)]) == 0
    assert "were in this run's training split" in capsys.readouterr().err
    assert main(["predict", "--json", str(run), "great phone", "terrible service"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().split("\n")]
    assert [x["label"] for x in lines] == tunelab.load(run).predict(["great phone", "terrible service"])


# ------------------------------------------------------------------------------------- user mistakes

def assert_clean_failure(argv, capsys, *needles, run_dir=None):
    capsys.readouterr()  # drop what earlier steps of the test printed
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") <= 12 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    if run_dir is not None:
        assert not run_dir.exists() or read_status(run_dir) is None or read_status(run_dir)["state"] != "completed"


def test_typo_in_config(make_config, capsys, tmp_path):
    path = make_config(name="typo", train={"learning_rat": 1e-4})
    assert_clean_failure(["train", str(path)], capsys, "train.learning_rat", "did you mean `lr`", str(path))
    assert not (tmp_path / "runs" / "typo").exists()


def test_missing_label_column(make_config, capsys, tmp_path):
    data = write_jsonl(tmp_path / "nolabel.jsonl", [{"text": r["text"]} for r in sample_rows(50)])
    path = make_config(name="nolabel", data={"train": str(data)})
    assert_clean_failure(["train", str(path)], capsys, "nolabel.jsonl", "column `label`")
    assert not (tmp_path / "runs" / "nolabel").exists()


def test_unknown_label_in_test_file(make_config, capsys, tmp_path):
    rows = sample_rows()[-20:]
    rows[2] = dict(rows[2], label="neutral")
    test = write_jsonl(tmp_path / "badtest.jsonl", rows)
    path = make_config(name="badlabel", data={"test": str(test)})
    assert_clean_failure(["train", str(path)], capsys, "badtest.jsonl, row 3", "'neutral'")
    assert not (tmp_path / "runs" / "badlabel").exists()


def test_empty_file(make_config, capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    path = make_config(name="empty", data={"train": str(tmp_path / "empty.jsonl")})
    assert_clean_failure(["train", str(path)], capsys, "empty.jsonl is empty")
    assert not (tmp_path / "runs" / "empty").exists()


def test_nonexistent_model(make_config, capsys, tmp_path):
    path = make_config(name="nomodel", model={"name": "./no/such/model"})
    assert_clean_failure(["train", str(path)], capsys, "model `./no/such/model`: no such folder")
    path = make_config(name="nohub", model={"name": "some-org/not-a-model"})
    assert_clean_failure(["train", str(path)], capsys, "some-org/not-a-model", "cannot be downloaded")
    assert not (tmp_path / "runs" / "nomodel").exists() and not (tmp_path / "runs" / "nohub").exists()


def test_existing_finished_run_is_not_overwritten(make_config, capsys):
    path = make_config(method="head", name="twice")
    assert main(["train", str(path)]) == 0
    assert_clean_failure(["train", str(path)], capsys, "already holds a finished run", "--overwrite")
    assert main(["train", str(path), "--overwrite"]) == 0


# --------------------------------------------------------------------------------- failure and resume

class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["full", {"name": "lora", "r": 4}], ids=["full", "lora"])
def test_crash_marks_run_failed_and_resume_finishes_it(make_config, monkeypatch, capsys, method):
    from transformers import Trainer

    path = make_config(method=method, name="resume", train={"max_steps": 6, "eval_every": 2, "epochs": 1})
    original = Trainer.training_step
    calls = {"n": 0}

    def exploding(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Boom("simulated crash at step 5")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", exploding)
    with pytest.raises(Boom):
        tunelab.train(path)
    run = path.parent / "runs" / "resume"
    assert read_status(run)["state"] == "failed" and "simulated crash" in read_status(run)["error"]
    assert (run / "checkpoints" / "checkpoint-4").exists()
    with pytest.raises(RunError, match="did not finish"):
        tunelab.load(run)
    assert_clean_failure(["train", str(path)], capsys, "unfinished run (failed)", "--resume")

    monkeypatch.setattr(Trainer, "training_step", original)
    result = tunelab.train(path, resume=True)
    assert read_status(run)["state"] == "completed" and result.metrics["train"]["steps"] == 6
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().split("\n") if x]
    assert steps == sorted(steps) and max(steps) == 6  # no duplicated lines from before the crash
    # the resumed run equals an uninterrupted one with the same seed
    clean = tunelab.train(make_config(method=method, name="clean",
                                      train={"max_steps": 6, "eval_every": 2, "epochs": 1}))
    assert clean.metrics["test"]["accuracy"] == result.metrics["test"]["accuracy"]
    assert clean.metrics["train"]["final_loss"] == result.metrics["train"]["final_loss"]


def test_text_pair_columns(make_config, tmp_path):
    rows = [{"premise": r["text"], "hypothesis": r["source"], "label": r["label"]} for r in sample_rows(120)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    path = make_config(method="full", name="pairs", data={"train": str(data), "text": "premise",
                                                          "text_pair": "hypothesis"})
    result = tunelab.train(path)
    clf = tunelab.load(result.path)
    saved = pd.read_json(result.path / "predictions_test.jsonl", lines=True)
    test_rows = {r["premise"]: r["hypothesis"] for r in rows}
    pairs = [test_rows[t] for t in saved["text"]]
    assert clf.predict(saved["text"].tolist(), pairs) == saved["predicted"].tolist()
    # the pair really reaches the model: the token ids contain two [SEP]s
    enc = clf.tokenizer(["a b"], ["c"])
    assert enc["input_ids"][0].count(clf.tokenizer.sep_token_id) == 2


def test_early_stopping_and_step_evaluation(make_config):
    # lr 0 cannot improve the metric, so patience 1 stops after the second evaluation (steps 2 and 4)
    path = make_config(method="head", name="early", train={"epochs": 5, "lr": 1e-12, "eval_every": 2,
                                                           "early_stopping_patience": 1, "warmup": 0})
    result = tunelab.train(path)
    records = [json.loads(x) for x in (result.path / "metrics.jsonl").read_text().split("\n") if x]
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert eval_steps == [2, 4]
    assert result.metrics["train"]["steps"] == 4


@pytest.mark.parametrize("method", ["head", {"name": "lora", "r": 4}])
def test_same_seed_same_run(make_config, method):
    """The new head and LoRA matrices are initialised before the Trainer seeds; the run must seed first."""
    runs = [tunelab.train(make_config(method=method, name=f"seed{i}", train={"max_steps": 6})) for i in range(2)]
    losses = [[json.loads(x).get("loss") for x in (r.path / "metrics.jsonl").read_text().split("\n") if x]
              for r in runs]
    assert losses[0] == losses[1]
    assert untimed(runs[0].metrics)["test"] == untimed(runs[1].metrics)["test"]  # timings are measured, not seeded


def test_truncation_is_counted(make_config, capsys):
    path = make_config(method="head", name="trunc", model={"max_length": 8}, train={"max_steps": 1})
    result = tunelab.train(path)
    counted = result.metrics["train"]["truncated_examples"]
    assert counted["train"] > 0 and "examples cut at model.max_length=8" in capsys.readouterr().out
    long_ok = tunelab.train(make_config(method="head", name="notrunc", model={"max_length": 128},
                                        train={"max_steps": 1}))
    assert long_ok.metrics["train"]["truncated_examples"] == {"train": 0, "validation": 0}


def test_merge_lora_gives_a_plain_model_that_predicts_the_same(make_config, capsys):
    from transformers import AutoModelForSequenceClassification

    result = tunelab.train(make_config(method={"name": "lora", "r": 4}, name="merge", train={"max_steps": 6}))
    assert main(["merge", str(result.path)]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    merged = result.path / "merged"
    assert (merged / "model.safetensors").exists() and not (merged / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    clf = tunelab.load(result.path)
    texts = [r["text"] for r in sample_rows()[:16]]
    enc = clf.tokenizer(texts, padding=True, return_tensors="pt")
    import torch

    with torch.no_grad():
        plain_logits = plain(**enc).logits.numpy()
    assert np.abs(plain_logits - clf.logits(texts)).max() < 1e-4
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_merge_refuses_a_non_lora_run(make_config, capsys):
    result = tunelab.train(make_config(method="head", name="nomerge", train={"max_steps": 2}))
    assert_clean_failure(["merge", str(result.path)], capsys, "its model/ folder is already a full model")


def test_report_to_tensorboard_writes_events_in_the_run(make_config):
    from tunelab.train import train

    result = train(make_config(method="head", name="tb", train={"report_to": ["tensorboard"], "max_steps": 4}))
    events = list((result.path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (result.path / "metrics.jsonl").exists()  # the local log is always written


def test_report_to_a_tracker_that_is_not_installed_is_refused_before_any_work(make_config, tmp_path, monkeypatch):
    import importlib.util

    from tunelab.errors import TunelabError
    from tunelab.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(TunelabError, match="pip install mlflow"):
        train(make_config(name="mlf", train={"report_to": ["mlflow"]}))
    assert not (tmp_path / "runs" / "mlf").exists()


def test_earlier_task_probe_measures_encoder_forgetting(make_config, tmp_path):
    """Linear probe on an earlier task (the review's source site): unchanged when the encoder is frozen (head),
    changed after full fine-tuning; skipped with a reason for features."""
    from conftest import sample_rows, write_jsonl
    from tunelab.train import train

    rows = sample_rows()
    earlier = write_jsonl(tmp_path / "sources.jsonl", [r for s in ("imdb", "yelp", "amazon")
                                                       for r in [x for x in rows if x["source"] == s][:80]])
    task = {"earlier_task": {"data": str(earlier), "label": "source"}, "forgetting": None}
    frozen = train(make_config(method="head", name="probe-head", eval=task)).metrics["forgetting"]
    assert frozen["examples"] == 120 and 0 < frozen["base_accuracy"] <= 1
    assert frozen["accuracy"] == frozen["base_accuracy"]  # same encoder output → the very same probe
    full = train(make_config(method="full", name="probe-full", eval=task, train={"lr": 1e-3})).metrics["forgetting"]
    assert full["base_accuracy"] == frozen["base_accuracy"] and full["accuracy"] != full["base_accuracy"]
    assert full["drop"] == pytest.approx(full["base_accuracy"] - full["accuracy"])
    skipped = train(make_config(method="features", name="probe-feat", eval=task)).metrics["forgetting"]
    assert "frozen" in skipped["skipped"]


def test_allocator_plan():
    """The console command re-executes itself on jemalloc once, on Linux, where the library exists — not when
    asked for the system allocator, not when jemalloc is already preloaded, never twice."""
    from tunelab.allocator import MARKER, plan

    lib = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    env = plan({"LD_PRELOAD": "/x/other.so", "HOME": "/h"}, lib, "linux")
    assert env["LD_PRELOAD"] == f"{lib} /x/other.so" and env["HOME"] == "/h" and env[MARKER]
    assert plan({}, lib, "linux")["LD_PRELOAD"] == lib
    assert plan(env, lib, "linux") is None  # the re-executed process
    assert plan({"TUNELAB_MALLOC": "system"}, lib, "linux") is None
    assert plan({"LD_PRELOAD": "libjemalloc.so.2"}, lib, "linux") is None
    assert plan({}, None, "linux") is None and plan({}, lib, "darwin") is None
    # a value naming neither allocator is refused, wherever it is read (not silently the C library's)
    from tunelab.errors import TunelabError

    for platform, found in (("linux", lib), ("darwin", None)):
        with pytest.raises(TunelabError, match=r"TUNELAB_MALLOC='jemaloc': expected one of jemalloc, system"):
            plan({"TUNELAB_MALLOC": "jemaloc"}, found, platform)


def test_console_command_runs_on_jemalloc_where_installed():
    """A process that calls use_jemalloc() comes back on jemalloc, with its own arguments (skipped where the
    system has no libjemalloc: CI installs it)."""
    import subprocess
    import sys

    from tunelab.allocator import library

    if library() is None:
        pytest.skip("no libjemalloc on this system (apt-get install libjemalloc2)")
    code = ("import sys; from tunelab import allocator; allocator.use_jemalloc(); "
            "print(allocator.loaded(), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TUNELAB_MALLOC", "_TUNELAB_ALLOCATOR")}
    out = subprocess.run([sys.executable, "-c", code, "a b"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "jemalloc ['a b']"
    out = subprocess.run([sys.executable, "-c", code, "x"], env={**env, "TUNELAB_MALLOC": "system"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "system ['x']"


def test_console_command_refuses_an_unknown_allocator():
    """`TUNELAB_MALLOC=jemaloc tunelab ...`: one sentence naming the variable and the choices, exit code 2, no
    traceback — before anything runs."""
    import subprocess
    import sys

    env = {**os.environ, "TUNELAB_MALLOC": "jemaloc"}
    env.pop("_TUNELAB_ALLOCATOR", None)
    out = subprocess.run([sys.executable, "-m", "tunelab", "validate", "nowhere.yaml"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("tunelab: error: environment variable TUNELAB_MALLOC='jemaloc': expected one of "
                                  "jemalloc, system (unset: jemalloc where libjemalloc is installed)")
