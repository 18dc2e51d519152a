"""Standard benchmarks through EleutherAI's lm-evaluation-harness: `tunelab eval RUN --benchmark TASKS`.

The harness does the work — its tasks, prompts, metrics and its `hf` model (`lm_eval --model hf --model_args
pretrained=BASE,peft=ADAPTER`, loaded the way its own command line loads it, so the numbers are the harness's). tunelab
adds what the field's wrappers leave out: the same tasks on the base model, and for every metric the harness averages
over documents, a paired comparison from the per-document results — the difference with its 95% bootstrap interval
and a paired permutation test (`tunelab.stats`, as the compare verdict), *tied* when within noise.

- TASKS: harness task names (`hellaswag`, `arc_easy`: their data come from the Hugging Face Hub, so they need it
  cached or online), paths to task YAML files or folders (the harness's `--include_path`), and the tasks tunelab ships
  (data/benchmarks: `tunelab_sentiment`, `tunelab_translate_de`, built from its sample data, offline).
- Model: a PEFT adapter as `peft=` on its base, a full fine-tune as `pretrained=`, in the precision tunelab evaluates
  the run in (`inference_dtype`); bottleneck adapters, which the harness cannot load, as the model tunelab loads
  wrapped in the harness's HFLM (fp32, the base too). The chat template is applied (to both models) when the run
  learnt from conversations rendered with it.
- Cached: each (model, task, settings) result is kept — the run's in RUN/benchmarks/, the base's in tunelab's cache —
  so a second call computes nothing. RUN/metrics.json gets a `benchmarks` entry with the numbers `--json` prints.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path

from .errors import TunelabError

SHIPPED = Path(__file__).parent / "data" / "benchmarks"
BATCH_SIZE = 16
SKIP = ("alias", "samples", "name", "sample_len", "sample_count")


def _harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TunelabError("--benchmark needs EleutherAI's lm-evaluation-harness: pip install 'tunelab[benchmarks]' "
                           "(lm-eval)") from None
    return lm_eval


def check_limit(limit):
    """--limit: documents per task, a whole number ≥ 1 or a share in (0, 1) (the harness's two meanings)."""
    if limit is None:
        return None
    if isinstance(limit, str):
        try:
            limit = float(limit)
        except ValueError:
            raise TunelabError(f"--limit {limit!r} is not a number: give documents per task (≥ 1) or a share "
                               f"between 0 and 1") from None
    if limit <= 0:
        raise TunelabError(f"--limit {limit:g} scores no document: give documents per task (a whole number ≥ 1) "
                           f"or a share between 0 and 1")
    if limit > 1 and not float(limit).is_integer():
        raise TunelabError(f"--limit {limit:g} is neither a whole number of documents nor a share between 0 and 1")
    return int(limit) if limit >= 1 else float(limit)


# ------------------------------------------------------------------------------------------------- tasks

def resolve_tasks(specs: list[str]):
    """(task manager, task names, {name: text that defines it}) for TASKS; one clear sentence for a name the
    harness does not know or a YAML it cannot read."""
    _harness()
    from lm_eval.tasks import TaskManager

    include, names, paths = [str(SHIPPED)], [], {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise TunelabError(f"benchmark {spec}: no such task file or folder")
            files = sorted(path.rglob("*.yaml")) + sorted(path.rglob("*.yml")) if path.is_dir() else [path]
            found = [(n, f) for f in files if (n := _task_name(f))]
            if not found:
                raise TunelabError(f"benchmark {spec}: no task YAML in it (a file with a `task:` key)")
            include.append(str(path if path.is_dir() else path.parent))
            for name, f in found:
                names.append(name)
                paths[name] = f
        else:
            names.append(spec)
    try:
        manager = TaskManager(include_path=include)
    except Exception as exc:  # a YAML the harness's index cannot parse
        raise TunelabError(f"benchmark task files: the harness could not read them: {_one_line(exc)}") from None
    for name in names:
        if name not in manager.all_tasks:
            close = [t for t in manager.all_subtasks if name.lower() in t.lower()][:3]
            hint = f" (close: {', '.join(close)})" if close else " (`lm_eval ls tasks` lists them)"
            raise TunelabError(f"benchmark {name!r} is neither a task of lm-eval-harness {_version()} nor a task "
                               f"YAML file or folder{hint}")
        entry = manager.task_index[name]
        source = paths.get(name) or getattr(entry, "yaml_path", None)
        paths[name] = source
    names = list(dict.fromkeys(names))
    texts = {n: _definition(Path(p)) if p else n for n, p in paths.items()}
    return manager, names, texts


def _task_name(path: Path) -> str | None:
    """The task a YAML file defines, read as the harness reads it (`!function` tags and `include:` resolved); None
    for a file of shared settings without `task:`; its error in one sentence."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path)
    except Exception as exc:
        raise TunelabError(f"task YAML {path}: the harness cannot read it: {_one_line(exc)}") from None
    if not isinstance(config, dict):
        raise TunelabError(f"task YAML {path}: expected a mapping of task settings, found {type(config).__name__}")
    return config["task"] if isinstance(config.get("task"), str) else None


def _definition(path: Path) -> str:
    """What a task is: its YAML and the Python files beside it (a changed prompt or dataset is a new result)."""
    files = [path, *sorted(path.parent.glob("*.py"))]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files if f.is_file())


def _version() -> str:
    import lm_eval

    return lm_eval.__version__


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) < 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------------- models

def _models(path: Path, config) -> tuple[dict, dict]:
    """How the harness loads the run and its base: {"args": model_args or None (then "load": a function that gives
    tunelab's loaded model), "tokenizer", "key"} each."""
    import torch

    from .methods import trait
    from .models import resolve
    from .tasks import TASKS
    from .tasks.generative import inference_dtype

    task = TASKS[config.task]
    if not task.CAUSAL_LM:
        raise TunelabError(f"{path} is a `{config.task}` run: harness benchmarks score a causal language model "
                           f"(sft, chat, causal_lm, dpo or rl runs)")
    model_dir = path / "model"
    harness_loads = (model_dir / "adapter_config.json").exists() or (
        (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")))
    if not harness_loads and trait(config.method.name, "GRADIENT_FREE"):
        raise TunelabError(f"{path} is an in-context-learning run: it trained nothing, so on a benchmark it is its "
                           f"base model; benchmark the runs that trained")
    # a model the harness does not load itself is handed to it in fp32, its base too (no bf16 autocast there)
    dtype = inference_dtype(task, config) if harness_loads else torch.float32
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(dtype, str(dtype).split(".")[-1])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_dir = resolve(config.model.name)
    common = {"dtype": dtype_name, "device": device}
    base = {"args": {"pretrained": base_dir, **common}, "tokenizer": base_dir,
            "key": {"model": config.model.name, **common}}
    if (model_dir / "adapter_config.json").exists():
        run = {"args": {"pretrained": base_dir, "peft": str(model_dir), "tokenizer": str(model_dir), **common}}
    elif (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")):
        run = {"args": {"pretrained": str(model_dir), "tokenizer": str(model_dir), **common}}
    else:  # bottleneck adapters: the model tunelab loads
        run = {"args": None, "load": lambda: task.load(path, config, full_precision=True)}
    run.update(tokenizer=str(model_dir) if (model_dir / "tokenizer_config.json").exists() else base_dir,
               key={"run": str(path.resolve()), **common})
    return run, base


def _lm(model: dict):
    from lm_eval.models.huggingface import HFLM

    if model["args"] is not None:
        return "hf", {**model["args"], "batch_size": BATCH_SIZE}
    generator = model["load"]()
    return HFLM(pretrained=generator.model, tokenizer=generator.tokenizer, batch_size=BATCH_SIZE,
                device=str(generator.model.device)), None


def chat_template(config, tokenizer_dir: str) -> bool:
    """Whether the harness renders its prompts with the chat template: when the run learnt from conversations
    rendered with one (sft/dpo/rl in the chat prompt format), not for alpaca/plain prompts or raw text."""
    from transformers import AutoTokenizer

    from .data.conversations import resolve_prompt_format
    from .tasks import TASKS

    if not TASKS[config.task].CHAT_PROMPTS:
        return False
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return bool(getattr(tokenizer, "chat_template", None)) and resolve_prompt_format(config.data, tokenizer) == "chat"


# ------------------------------------------------------------------------------------------------- running

def _evaluate(model: dict, manager, names: list[str], limit, chat: bool, fewshot) -> dict:
    """{task: {"metrics": {name: value}, "docs": [doc_id...], "hashes": [...], "per_doc": {metric: [...]}}} from
    one harness call on `names`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import get_task_dict

    try:  # built before the model loads: a task whose data cannot be read fails in a second, not a minute
        get_task_dict(names, manager)
    except Exception as exc:
        raise TunelabError(_explain(exc, names)) from exc
    lm, args = _lm(model)
    try:
        out = simple_evaluate(model=lm, model_args=args, tasks=names, task_manager=manager, limit=limit,
                              num_fewshot=fewshot, log_samples=True, apply_chat_template=chat,
                              bootstrap_iters=1000, confirm_run_unsafe_code=False)
    except TunelabError:
        raise
    except Exception as exc:
        raise TunelabError(_explain(exc, names)) from exc
    results = {}
    for name in names:
        if name not in out.get("samples", {}):
            raise TunelabError(f"benchmark {name!r} is a group of tasks; name its tasks instead "
                               f"({', '.join(out.get('group_subtasks', {}).get(name, [])) or 'see lm_eval ls tasks'})")
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        metrics = {}
        for key, value in out["results"][name].items():
            metric, _, filt = key.partition(",")
            if metric in SKIP or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[metric if filt in ("none", "") else f"{metric},{filt}"] = float(value)
        per_doc = {m: [float(s[m.partition(",")[0]]) for s in samples] for m in metrics
                   if all(isinstance(s.get(m.partition(",")[0]), (int, float, bool)) for s in samples)}
        results[name] = {"metrics": metrics, "docs": [s["doc_id"] for s in samples],
                         "hashes": [s.get("doc_hash") for s in samples], "per_doc": per_doc,
                         "higher_is_better": out.get("higher_is_better", {}).get(name, {})}
    return results


def _explain(exc: BaseException, names: list[str]) -> str:
    """The harness's failure as one sentence: data it could not fetch offline, a task definition it rejects."""
    text = _one_line(exc)
    chain, seen = [], exc
    while seen is not None and len(chain) < 8:
        chain.append(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    offline = any(n in ("ConnectionError", "OfflineModeIsEnabled", "DatasetNotFoundError", "LocalEntryNotFoundError",
                        "HfHubHTTPError") for n in chain) \
        or "offline" in text.lower() or "couldn't reach" in text.lower()
    if offline:
        return (f"benchmark {', '.join(names)}: its data is on the Hugging Face Hub and not in the cache here, and "
                f"cannot be downloaded ({text}); run it once online, or use a task YAML over local files")
    return f"benchmark {', '.join(names)}: lm-eval-harness failed: {text}"


def _cache_file(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key["task"])[:60]
    return folder / f"{safe}-{digest}.json"


def _cached(model: dict, folder: Path, manager, names, texts, limit, chat, fewshot, progress) -> dict:
    """The results of `model` on `names`, computed only for the tasks not cached in `folder`."""
    from .folders import write_json

    files = {n: _cache_file(folder, {**model["key"], "task": n, "definition": texts[n], "limit": limit,
                                     "chat": chat, "fewshot": fewshot, "harness": _version()}) for n in names}
    results, todo = {}, []
    for name, file in files.items():
        try:
            results[name] = json.loads(file.read_text())
        except (OSError, ValueError):
            todo.append(name)
    if todo:
        progress(f"running {', '.join(todo)} on {model.get('label', 'the model')}")
        folder.mkdir(parents=True, exist_ok=True)
        for name, result in _evaluate(model, manager, todo, limit, chat, fewshot).items():
            write_json(files[name], result)
            results[name] = result
    return results


def compare_runs(run: dict, base: dict | None) -> dict:
    """Per metric: the run's value, the base's, and for a document average the paired difference with its 95%
    interval, a permutation p and `tied` (stats.py). A metric the harness aggregates otherwise (corpus BLEU) has
    values only, with the reason."""
    import numpy as np

    from . import stats

    def mean(_, values):
        return float(np.mean(np.asarray(values, dtype=float)))

    rows = {}
    for metric, value in run["metrics"].items():
        row = {"run": value}
        if base is None or metric not in base["metrics"]:
            rows[metric] = row
            continue
        row["base"] = base["metrics"][metric]
        row["difference"] = value - row["base"]
        a, b = run["per_doc"].get(metric), base["per_doc"].get(metric)
        if a is None or b is None or not math.isclose(float(np.mean(a)), value, abs_tol=1e-9) \
                or not math.isclose(float(np.mean(b)), row["base"], abs_tol=1e-9):
            row["paired"] = "no paired test: the harness does not average this metric over documents"
        elif run["docs"] != base["docs"] or run["hashes"] != base["hashes"]:
            row["paired"] = "no paired test: the two models were scored on different documents"
        else:
            refs = [0] * len(a)
            low, high = stats.difference_interval(mean, refs, a, b) if len(a) > 1 else (row["difference"],) * 2
            test = stats.permutation_p(mean, refs, a, b) if len(a) > 1 else {"test": "paired permutation", "p": 1.0}
            row.update(interval=[low, high], p=test["p"], test=test["test"], documents=len(a),
                       tied=test["p"] >= stats.ALPHA)
        higher = run.get("higher_is_better", {}).get(metric.partition(",")[0])
        if higher is not None:
            row["higher_is_better"] = bool(higher)
        rows[metric] = row
    return rows


def benchmark(path: Path, config, specs: list[str], *, limit=None, base: bool = True, fewshot: int | None = None,
              progress=None) -> dict:
    """Benchmark the model saved in run folder `path` (and its base) on harness tasks: {task: {"metrics": {metric:
    row (see `compare_runs`)}, "documents", "limit", ...}}. The caller holds the run (training, or
    `run_benchmarks`)."""
    from .models.registry import cache_dir

    progress = progress or (lambda text: print(f"tunelab: {text}", file=sys.stderr, flush=True))
    if not specs:
        raise TunelabError("--benchmark: name at least one task")
    limit = check_limit(limit)
    if fewshot is not None and fewshot < 0:
        raise TunelabError(f"--fewshot {fewshot} is under 0")
    run_model, base_model = _models(path, config)
    manager, names, texts = resolve_tasks(specs)
    chat = chat_template(config, run_model["tokenizer"])
    run_model["label"], base_model["label"] = f"the run ({path.name})", f"the base model ({config.model.name})"
    ran = _cached(run_model, path / "benchmarks", manager, names, texts, limit, chat, fewshot, progress)
    before = _cached(base_model, cache_dir() / "benchmarks", manager, names, texts, limit, chat, fewshot,
                     progress) if base else {}
    return {n: {"metrics": compare_runs(ran[n], before.get(n)), "documents": len(ran[n]["docs"]), "limit": limit,
                "fewshot": fewshot, "chat_template": chat, "harness": f"lm-eval {_version()}"} for n in names}


def run_benchmarks(run_path, specs: list[str], **options) -> dict:
    """`tunelab eval RUN --benchmark`: `benchmark` on a finished run, recorded in RUN/metrics.json["benchmarks"]
    (other tasks' entries kept)."""
    from .folders import RunLock, write_json
    from .runs import open_finished

    path, config = open_finished(run_path)
    with RunLock(path, "benchmark"):
        results = benchmark(path, config, specs, **options)
        metrics_file = path / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        metrics.setdefault("benchmarks", {}).update(results)
        write_json(metrics_file, metrics)
    return results


def table(results: dict) -> str:
    """The results as the command prints them: a line per task and metric."""
    from .stats import p_text

    lines = []
    for name, task in results.items():
        for metric, row in task["metrics"].items():
            line = f"{name} {metric}: run {row['run']:.4f}"
            if "base" in row:
                line += f" · base {row['base']:.4f} · difference {row['difference']:+.4f}"
            if "interval" in row:
                low, high = row["interval"]
                verdict = "tied with the base (within noise)" if row["tied"] else (
                    "better than the base" if (row["difference"] > 0) == row.get("higher_is_better", True)
                    else "worse than the base")
                line += f" [95% {low:+.4f} to {high:+.4f}, {p_text(row['p'])}, {row['documents']} documents]: {verdict}"
            elif "paired" in row:
                line += f" ({row['paired']})"
            lines.append(line)
    return "\n".join(lines)
