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


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().split("\n")[:-1]) if "loss" in r]


def test_full_fine_tuning_learns_in_bf16_on_the_gpu(make_config, tiny_llama, tmp_path):
    # the random tiny model starts at the uniform loss, ln(vocabulary) ≈ 6.9; knowing the answer is one of the
    # six words is ln 6 ≈ 1.8 (the same config on the CPU in fp32 ends at about 1.5)
    result = tunelab.train(_sft(make_config, tiny_llama, tmp_path, "full", "gpu-full"))
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["bf16"] is True and torch.cuda.get_device_name() in manifest["device"]
    assert _losses(result.path)[0] > 6 and result.metrics["train"]["final_loss"] < 2.5
    gen = tunelab.load(result.path)
    assert gen.model.device.type == "cuda"
    assert result.metrics["test"]["loss"] < 3.0  # test loss, computed on the GPU, learned the answer set too
    # greedy decoding of this word-level toy tokenizer yields a special token first (on the CPU too): the GPU
    # generation path runs; what it says is checked on the packaged models in tests/integration
    assert isinstance(gen.generate([gen.render("say good 0")], max_new_tokens=2)[0], str)


def test_lora_trains_in_bf16_on_the_gpu_and_evaluates_there(make_config, tiny_llama, tmp_path):
    result = tunelab.train(_sft(make_config, tiny_llama, tmp_path, {"name": "lora", "r": 4}, "gpu-lora"))
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["bf16"] is True and manifest["peak_gpu_mb"] > 0
    assert torch.cuda.get_device_name() in manifest["device"]
    losses = _losses(result.path)  # LoRA on a random tiny model moves slowly (CPU fp32: 7.37 -> 6.93)
    assert losses[-1] < losses[0] - 0.2
    gen = tunelab.load(result.path)
    assert gen.model.device.type == "cuda"
    assert result.metrics["test"]["loss"] < 7.2  # evaluated, on the GPU, by the trained adapter
    # it barely learned (it may well answer with a special token, decoded as ""): the GPU generation path runs
    assert isinstance(gen.generate([gen.render("say good 0")], max_new_tokens=2)[0], str)


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
    losses = _losses(result.path)
    assert losses[-1] < losses[0] - 0.2 and (result.path / "model" / "adapter_config.json").exists()
