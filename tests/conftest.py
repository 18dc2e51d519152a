"""Shared fixtures: a tiny random BERT (2 layers, hidden 32) with a real WordPiece tokenizer, and small data."""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "tunelab" / "data" / "samples" / "sentiment_uci.jsonl"


def sample_rows(n: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").split("\n") if line.strip()]
    if n is None:
        return rows
    neg = [r for r in rows if r["label"] == "negative"][: n // 2]
    pos = [r for r in rows if r["label"] == "positive"][: n - n // 2]
    return neg + pos


def untimed(metrics: dict) -> dict:
    """metrics.json without what is measured rather than computed (times, speeds, which checkpoint was kept)."""
    out = json.loads(json.dumps(metrics))
    out.pop("evaluate_s", None)
    for key in ("runtime_s", "validation_s", "examples_per_s", "tokens_per_s", "epoch_s", "best_checkpoint"):
        out.get("train", {}).pop(key, None)
    for split in out.values():
        if isinstance(split, dict):
            split.pop("inference", None)  # seconds per 1000 requests
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A BertModel checkpoint without a head (like minilm), random weights, vocabulary from the sample data."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    words = Counter(w for r in sample_rows() for w in re.findall(r"[a-z]+|[^\sa-z]", r["text"].lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(1500)]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    assert "[UNK]" not in tokenizer.tokenize("a great movie!")
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A LlamaModel checkpoint (decoder-only, like smollm2) whose tokenizer has an EOS but no pad token."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    words = Counter(w for r in sample_rows() for w in re.findall(r"[a-z]+|[^\sa-z]", r["text"].lower()))
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + [w for w, _ in words.most_common(1500)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         eos_token_id=1, bos_token_id=None, pad_token_id=None, tie_word_embeddings=True)
    LlamaModel(config).save_pretrained(out)
    return out


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", sample_rows(240))


@pytest.fixture
def make_config(tmp_path, tiny_bert, data_file):
    """Write a config for the tiny model; `make_config(method=..., **sections)` returns its path."""
    import yaml

    def make(method="full", name="cfg", **sections) -> Path:
        cfg = {
            "model": {"name": str(tiny_bert), "max_length": 64},
            "data": {"train": str(data_file), "split": {"validation": 0.15, "test": 0.2, "seed": 1}},
            "method": method,
            "train": {"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "logging_steps": 2, "precision": "fp32"},
            "output": {"dir": str(tmp_path / "runs" / name)},
            # the forgetting check reloads the base model after every generative run; its own test turns it on
            "eval": {"forgetting": None},
        }
        for key, value in sections.items():
            cfg.setdefault(key, {})
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def train_translate_run(folder: Path, max_generate: int = 8, **train) -> Path:
    """A short LoRA SFT run of the packaged SmolLM2 on the shipped EN→FR strings (the integration tests' run for
    the GGUF and vLLM engines); `train` overrides train settings (precision...)."""
    import yaml

    import tunelab

    cfg = {"model": {"name": "smollm2-135m", "max_length": 128}, "task": "sft",
           "data": {"train": "sample:translate_en_fr", "prompt": "en", "response": "fr",
                    "instruction": "Translate this English user-interface text into French.",
                    "split": {"validation": 0, "test": 0.012, "seed": 42}},
           "method": {"name": "lora", "r": 8, "alpha": 16},
           "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-4, **train},
           "eval": {"max_new_tokens": 12, "max_generate": max_generate, "forgetting": None},
           "output": {"dir": str(folder / "run")}}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return tunelab.train(path).path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serving:
    """A uvicorn server for an ASGI app on a free loopback port, in a thread; `with Serving(app) as url:`."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
