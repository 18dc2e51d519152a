"""`tunelab export RUN --format hf|onnx [--merge] --out DIR`: a finished run in a deployable format.

`hf`   a Hugging Face folder: the run's model (a full model, or the PEFT adapter with its tokenizer) — or with
       `--merge` the adapter folded into the base weights (see `merge`), loadable without peft or tunelab.
`onnx` `model.onnx` for classifiers (logits) and decoder-only LMs (next-token logits of every position), made
       by torch's exporter (`torch.onnx.export(dynamo=True)`), dynamic in batch and sequence length. LoRA-type
       adapters are merged first. The ONNX graph is run with onnxruntime next to PyTorch on sample inputs (the
       run's test texts, padded into a batch): the largest absolute logit difference is printed and the export
       fails, writing nothing, beyond the tolerance. Both are also timed on those inputs (ratio printed).
`gguf` `model-QUANT.gguf` for llama.cpp / Ollama with the training prompt format inside, a Modelfile and a
       parity check against the merged model (see `tunelab.gguf`).

Nothing is left half-written: the folder is built under DIR.tmp and renamed when complete.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .errors import RunError, TunelabError
from .folders import MARKER, check_target, write_output_dir
from .merge import merge as merge_run
from .merge import sample_texts
from .methods import trait, with_trait
from .runs import open_finished
from .tasks import TASKS
from .tasks import with_trait as tasks_with_trait

FORMATS = ("hf", "onnx", "gguf")
TOLERANCE = {"classify": 1e-4, "causal": 1e-3}  # logits of an LM are larger (|z| ~ 10-30): same relative error


def export(run_path, format: str = "hf", merge: bool = False, out=None, tolerance: float | None = None,
           quant: str = "f16") -> dict:
    """Write the export to `out` (default RUN/export-FORMAT) and return what was written and measured.
    `quant`: the GGUF type (f16, bf16, q8_0, q4_k_m; see tunelab.gguf)."""
    if format not in FORMATS:
        raise TunelabError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    path, config = open_finished(run_path)
    method = config.method.name
    if trait(method, "GRADIENT_FREE"):
        raise RunError(f"{path} is a `{method}` run and cannot be exported: {trait(method, 'NOT_EXPORTABLE')}")
    target = Path(out) if out else path / f"export-{format}"
    check_target(target, MARKER, "export")  # before any model is loaded
    if format == "hf":
        if merge:
            if not trait(method, "MERGEABLE"):
                full = " whose model/ folder is already a full model: export without --merge"
                raise RunError(f"--merge folds {', '.join(with_trait('MERGEABLE'))} adapters into the base model; "
                               f"{path} is a `{method}` run" + (full if trait(method, "FULL_MODEL") else ""))
            return {"format": "hf", "merged": True, **merge_run(path, target)}
        return {"format": "hf", "merged": False, "path": str(_copy_folder(path, target))}
    if format == "gguf":
        from .gguf import export_gguf

        return export_gguf(path, config, target, quant)
    return _onnx(path, config, target, tolerance)


def _copy_folder(path: Path, target: Path) -> Path:
    def fill(folder: Path) -> None:
        shutil.copytree(path / "model", folder, dirs_exist_ok=True)
        shutil.copy2(path / "config.yaml", folder / "tunelab_config.yaml")  # how it was trained (base, prompts)
        (folder / MARKER).write_text(json.dumps({"format": "hf", "merged": False, "run": str(path)}, indent=2))

    return write_output_dir(target, fill, "export", run=path)


class _Logits(torch.nn.Module):
    """The graph that is exported: token ids + attention mask (+ token types) → logits."""

    def __init__(self, model, token_types: bool, causal: bool):
        super().__init__()
        self.model, self.token_types, self.causal = model, token_types, causal

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"use_cache": False} if self.causal else {}
        if self.token_types:
            kwargs["token_type_ids"] = token_type_ids
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def _load(path: Path, config):
    """(model in fp32 with any adapter merged, tokenizer, labels or None, kind)."""
    task, method = TASKS[config.task], config.method.name
    if trait(method, "NOT_EXPORTABLE"):
        raise RunError(f"{path} is a `{method}` run: {trait(method, 'NOT_EXPORTABLE')}")
    if task.CAUSAL_LM:
        kind = "causal"
    elif task.SERVES == "classify":
        kind = "classify"
    else:
        raise RunError(f"{path} is a `{config.task}` run; ONNX export handles classifiers and decoder-only "
                       f"generative runs ({', '.join(tasks_with_trait('CAUSAL_LM'))})")
    loaded = task.load(path, config, full_precision=True)
    model = loaded.model
    if trait(method, "MERGEABLE"):
        model = model.merge_and_unload()
    # ONNX is exported and checked against PyTorch on the CPU (onnxruntime's CPU provider)
    return model.float().cpu().eval(), loaded.tokenizer, getattr(loaded, "labels", None), kind


def _onnx(path: Path, config, target: Path, tolerance: float | None) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise TunelabError("ONNX export needs onnx, onnxscript and onnxruntime: "
                           "pip install 'tunelab[onnx]'") from e
    model, tokenizer, labels, kind = _load(path, config)
    tolerance = TOLERANCE[kind] if tolerance is None else tolerance
    texts = sample_texts(path, "text" if kind == "classify" else "prompt")
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                    max_length=config.model.max_length)
    token_types = kind == "classify" and "token_type_ids" in enc
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    inputs = tuple(enc[n] for n in names)
    wrapper = _Logits(model, token_types, causal=kind == "causal").eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    info = {}

    def fill(tmp: Path) -> None:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(wrapper, inputs, str(tmp / "model.onnx"), input_names=names, output_names=["logits"],
                              dynamic_shapes={n: {0: batch, 1: seq} for n in names}, dynamo=True,
                              verbose=False)
        session = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        feed = {n: enc[n].numpy() for n in names}
        with torch.no_grad():
            reference = wrapper(*inputs).float().numpy()
        got = session.run(None, feed)[0]
        mask = enc["attention_mask"].numpy().astype(bool)
        if kind == "causal":  # padded positions' logits are meaningless: compare real tokens only
            diff = float(np.abs(reference - got)[mask].max())
        else:
            diff = float(np.abs(reference - got).max())
        if not np.isfinite(diff) or diff > tolerance:
            raise TunelabError(f"ONNX model disagrees with PyTorch: max |logit difference| {diff:.2e} > "
                               f"{tolerance:.0e} on {len(texts)} inputs; nothing was written")
        torch_s, ort_s = _time(lambda: wrapper(*inputs)), _time(lambda: session.run(None, feed))
        tokenizer.save_pretrained(tmp)
        if labels is not None:
            (tmp / "labels.json").write_text(json.dumps(labels))
        info.update({"format": "onnx", "kind": kind, "inputs": names, "output": "logits",
                     "max_abs_diff": diff, "tolerance": tolerance, "examples": len(texts),
                     "batch_shape": list(enc["input_ids"].shape), "torch_eager_s": torch_s, "onnxruntime_s": ort_s,
                     "speedup": torch_s / ort_s, "labels": labels, "run": str(path)})
        (tmp / MARKER).write_text(json.dumps(info, indent=2))

    written = write_output_dir(target, fill, "export", run=path)  # fills `info`
    return {**info, "path": str(written)}


def _time(fn, repeats: int = 10) -> float:
    """Median seconds per call, after a warm-up call."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def push_to_hub(folder, repo_id: str, private: bool = False, run=None) -> str:
    """Upload an export folder to a Hugging Face Hub model repository (created if missing) with huggingface_hub;
    returns the commit's URL. The token is huggingface_hub's own (HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   commit_message=f"tunelab export of {run or folder}",
                                   ignore_patterns=[".lock", ".*.partial-*"])
    except OfflineModeIsEnabled:
        raise TunelabError(f"--push-to-hub {repo_id}: the Hugging Face Hub is switched off on this machine "
                           f"(HF_HUB_OFFLINE); the export is in {folder}") from None
    except (HfHubHTTPError, OSError) as exc:  # no token, no access, no network
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunelabError(f"--push-to-hub {repo_id} failed ({first}); the export is in {folder}") from None
    return commit.commit_url
