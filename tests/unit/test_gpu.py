"""The GPU path: bf16 training on CUDA, evaluation and generation on the GPU, QLoRA with real 4-bit kernels.
Skipped where no CUDA device is present (CI has none); `scripts/gpu_check.sh` runs them on a GPU machine."""
from __future__ import annotations

import json

import pytest
import torch

import tunelab
from conftest import write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WORDS = ["good", "bad", "great", "dull", "fine", "slow"]


def _sft(make_config, tiny_llama, tmp_path, method, name):
    rows = [{"prompt": f"say {w} {i}", "response": w} for i, w in enumerate(WORDS * 20)]
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return make_config(method, name=name, task="sft", model={"name": str(tiny_llama)},
                       data={"train": str(data), "leakage": "ignore"},
                       train={"max_steps": 30, "batch_size": 8, "lr": 1e-2, "precision": "auto"},
                       eval={"max_new_tokens": 2, "max_generate": 8})


def test_lora_trains_in_bf16_on_the_gpu_and_evaluates_there(make_config, tiny_llama, tmp_path):

    result = tunelab.train(_sft(make_config, tiny_llama, tmp_path, {"name": "lora", "r": 4}, "gpu-lora"))
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["bf16"] is True and manifest["peak_gpu_mb"] > 0
    assert torch.cuda.get_device_name() in manifest["device"]
    gen = tunelab.load(result.path)
    assert gen.model.device.type == "cuda"
    assert result.metrics["test"]["exact_match"] > 0.5  # it learned the words on the GPU
    assert gen.generate([gen.render("say good 0")], max_new_tokens=2)[0].strip()


def test_qlora_4bit_nf4_trains_with_the_gpu_kernels(make_config, tiny_llama, tmp_path):
    import bitsandbytes as bnb

    from tunelab.tasks import TASKS

    cfg = _sft(make_config, tiny_llama, tmp_path, {"name": "qlora", "bits": 4, "r": 4}, "gpu-qlora")
    from tunelab.config import load_config
    from tunelab.runs import RunDir
    from tunelab.tasks import load_splits

    config = load_config(cfg)
    trainer, *_ = TASKS[config.task].build_trainer(config, load_splits(config), str(tiny_llama), RunDir(tmp_path / "x"))
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    result = tunelab.train(cfg)
    assert result.metrics["train"]["final_loss"] < 2.0 and (result.path / "model" / "adapter_config.json").exists()
