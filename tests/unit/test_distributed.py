"""`tunelab train --nproc 2`: two CPU processes (gloo) with batch 4 each train the same model as one process with
batch 8 — same losses, same weights — and only rank 0 writes the run directory."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tunelab import train

# Rank 1 records every Python-level write under the run directory (open for writing, mkdir, rename, remove).
AUDIT = textwrap.dedent("""
    import os, sys
    if os.environ.get("RANK", "0") != "0":
        _root, _log = os.environ["AUDIT_ROOT"], os.environ["AUDIT_LOG"]
        def _hook(event, args):
            if event in ("open", "os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.rmtree") and args:
                path = str(args[0])
                writing = event != "open" or (len(args) > 1 and any(c in str(args[1] or "") for c in "wax+"))
                if writing and path.startswith(_root):
                    with open(_log, "a") as f:
                        f.write(f"{event} {path}\\n")
        sys.addaudithook(_hook)
""")


@pytest.fixture
def no_dropout_bert(tiny_bert, tmp_path):
    """The tiny BERT without dropout, so two runs can agree to rounding."""
    out = tmp_path / "bert-nodrop"
    shutil.copytree(tiny_bert, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().split("\n") if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_match_one_with_the_same_global_batch(make_config, no_dropout_bert, tmp_path):
    common = dict(model={"name": str(no_dropout_bert), "max_length": 64},
                  split={"validation": 0, "test": 0.2, "seed": 1})
    one = make_config(method="full", name="one", model=common["model"], data={"split": common["split"]},
                      train={"max_steps": 6, "batch_size": 8, "logging_steps": 1, "lr": 1e-3, "warmup": 0,
                             "group_by_length": False})
    two = make_config(method="full", name="two", model=common["model"], data={"split": common["split"]},
                      train={"max_steps": 6, "batch_size": 4, "logging_steps": 1, "lr": 1e-3, "warmup": 0,
                             "group_by_length": False})
    single = train(one).path
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    log = tmp_path / "rank1-writes.txt"
    run_dir = tmp_path / "runs" / "two"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "AUDIT_ROOT": str(run_dir), "AUDIT_LOG": str(log), "CUDA_VISIBLE_DEVICES": ""}  # the CPU path (gloo)
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(two), "--nproc", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((run_dir / "metrics.json").read_text())
    assert manifest["train"]["processes"] == 2 and manifest["train"]["steps"] == 6
    # same global batch, same data order: the same losses step by step and the same weights at the end
    a, b = _losses(single), _losses(run_dir)
    assert sorted(a) == sorted(b) and len(a) == 6
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=2e-3, abs=2e-3), (step, a, b)
    wa, wb = load_file(single / "model" / "model.safetensors"), load_file(run_dir / "model" / "model.safetensors")
    base = load_file(no_dropout_bert / "model.safetensors")
    moved = max((wa[k] - base[k.removeprefix("bert.")]).abs().max() for k in wa if k.removeprefix("bert.") in base)
    assert moved > 1e-3  # training changed the weights, so agreeing below is not trivial
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)
    # rank 1 trained (the losses are averaged over both) but wrote nothing of the run: the only trace is the
    # Trainer's mkdir of the transient checkpoint folder, where each rank keeps its RNG state for --resume
    writes = log.read_text().splitlines() if log.exists() else []
    assert all(w.startswith("os.mkdir ") and "/checkpoints/checkpoint-" in w for w in writes), writes
    assert not (run_dir / "checkpoints").exists()  # removed once the run completed
    assert proc.stdout.count("run: ") == 1  # one summary, from rank 0


def test_more_processes_than_gpus_is_refused_before_anything_starts(monkeypatch):
    from tunelab import distributed
    from tunelab.errors import TunelabError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(TunelabError, match="--nproc 2 starts one process per GPU, but 1 GPU"):
        distributed.launch(["train", "x.yaml"], 2)
