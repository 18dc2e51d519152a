"""tunelab export on tiny models: ONNX graphs that onnxruntime runs with PyTorch's logits, HF folders with and
without the adapter merged, refusals that name the reason, nothing half-written."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tunelab
from conftest import sample_rows, write_jsonl
from tunelab.cli import main


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])


def test_classifier_to_onnx_matches_pytorch_on_new_inputs(make_config, capsys):

    run = tunelab.train(make_config(method={"name": "lora", "r": 4}, name="onnxclf", train={"max_steps": 6})).path
    assert main(["export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference|" in out and "onnxruntime" in out and "× PyTorch" in out
    folder = run / "export-onnx"
    info = json.loads((folder / "export.json").read_text())
    assert info["max_abs_diff"] < 1e-4 and info["labels"] == json.loads((folder / "labels.json").read_text())
    # shapes the export never saw: another batch size and length
    clf = tunelab.load(run)
    texts = [r["text"] for r in sample_rows(40)[-7:]]
    enc = clf.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    got = _ort(folder).run(None, {k: enc[k] for k in info["inputs"]})[0]
    assert np.abs(got - clf.logits(texts)).max() < 1e-4


def test_causal_lm_to_onnx_and_hf_with_and_without_merge(make_config, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM


    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 12]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    run = tunelab.train(make_config(method={"name": "lora", "r": 4}, name="onnxlm", model={"name": str(tiny_llama)},
                                    task="sft", data={"train": str(data), "leakage": "ignore"},
                                    train={"max_steps": 5}, eval={"max_new_tokens": 4})).path
    info = tunelab.export(run, "onnx", out=tmp_path / "lm-onnx")
    assert info["kind"] == "causal" and info["max_abs_diff"] < 1e-3
    gen = tunelab.load(run)
    prompts = [gen.render("say great"), gen.render("say something longer than the others")]
    enc = gen.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = gen.model(**enc.to(gen.model.device)).logits[:, -1].float().cpu().numpy()  # on the GPU where present
    got = _ort(tmp_path / "lm-onnx").run(None, {k: enc[k].cpu().numpy() for k in info["inputs"]})[0][:, -1]
    assert np.abs(got - ref).max() < 1e-3  # left-padded batch: the last position is real in every row

    kept = tunelab.export(run, "hf", out=tmp_path / "hf-adapter")
    assert (tmp_path / "hf-adapter" / "adapter_config.json").exists() and not kept["merged"]
    assert (tmp_path / "hf-adapter" / "tunelab_config.yaml").exists()
    merged = tunelab.export(run, "hf", merge=True, out=tmp_path / "hf-merged")
    assert merged["merged"] and merged["max_abs_diff"] < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in plain.named_parameters())


def test_exports_that_cannot_work_are_refused_and_leave_nothing(make_config, capsys, tmp_path):
    from tunelab.errors import TunelabError

    features = tunelab.train(make_config(method="features", name="feat")).path
    assert main(["export", str(features), "--format", "onnx"]) == 2
    assert "scikit-learn head" in capsys.readouterr().err
    head = tunelab.train(make_config(method="head", name="head", train={"max_steps": 2})).path
    assert main(["export", str(head), "--merge"]) == 2
    assert "already a full model: export without --merge" in capsys.readouterr().err
    assert main(["export", str(head), "--format", "hf"]) == 0 and (head / "export-hf" / "labels.json").exists()
    # a parity failure (impossible tolerance) writes nothing, not even the temporary folder
    with pytest.raises(TunelabError, match="disagrees with PyTorch"):
        tunelab.export(head, "onnx", out=tmp_path / "never", tolerance=-1.0)
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.tmp").exists()


def test_push_to_hub_uploads_the_export_folder_and_says_so_when_offline(make_config, monkeypatch, capsys):
    """No network here: the upload is checked at huggingface_hub's API (the calls tunelab makes), and the offline
    refusal is the library's own (HF_HUB_OFFLINE)."""
    import huggingface_hub

    run = tunelab.train(make_config(method="head", name="push", train={"max_steps": 1})).path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["export", str(run), "--push-to-hub", "acme/sentiment-head"]) == 2
    err = capsys.readouterr().err
    assert "--push-to-hub acme/sentiment-head" in err and "the export is in" in err and "Traceback" not in err
    assert (run / "export-hf" / "export.json").exists()  # the export itself was written before the upload

    calls = []

    class Commit:
        commit_url = "https://huggingface.co/acme/sentiment-head/commit/abc"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append((repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(kw) or Commit())
    assert main(["export", str(run), "--push-to-hub", "acme/sentiment-head", "--private"]) == 0
    assert "uploaded to the Hugging Face Hub: https://huggingface.co/acme/sentiment-head/commit/abc" in \
        capsys.readouterr().out
    (repo, create), upload = calls
    assert repo == "acme/sentiment-head" and create["private"] is True and create["exist_ok"] is True
    assert upload["repo_id"] == "acme/sentiment-head" and upload["folder_path"] == str(run / "export-hf")
