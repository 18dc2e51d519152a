"""Train a run from a config: check everything a user can get wrong first, then let the task train and evaluate,
and write the run's record.

Order matters for "nothing is lost": the output folder, config, model and data are checked before the run
directory exists, so a user mistake never leaves a directory behind; anything that fails later marks the run
`failed` (or `interrupted`). What is trained and how it is evaluated is the task's (`tunelab.tasks`); a method
that replaces training altogether (features, icl) brings its own `train_run`.
"""
from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .allocator import loaded
from .config import Config, load_config
from .errors import TunelabError
from .generation import choose
from .memory import PhasePeaks, release
from .methods import METHODS, trait
from .models import check_model, hub_id, resolve
from .plots import plot_loss, read_jsonl
from .precision import use_bf16
from .runs import RunDir, check_output, default_dir, now, open_finished
from .tasks import TASKS, FitContext
from .trainer import check_method
from .version import __version__


@dataclass
class RunResult:
    path: Path
    config: Config
    metrics: dict
    manifest: dict


def train(config: str | Path | Config, overrides: list[str] | tuple[str, ...] = (), *, resume: bool = False,
          overwrite: bool = False, config_path: str | Path | None = None, callbacks: tuple = (),
          allow_code: bool = False) -> RunResult:
    """Run the config end to end; return the run path and its final metrics. `callbacks`: extra Trainer callbacks
    (tunelab search reports evaluations to Optuna through one). `allow_code`: let rl.reward.function import and
    run the Python code the config names."""
    if not isinstance(config, Config):
        config_path = config
        config = load_config(config, overrides)
    task = TASKS[config.task]
    out = Path(config.output.dir) if config.output.dir else default_dir(config_path)
    main = distributed.is_main()
    if main:  # an output folder that cannot be used is found before any model or data is read
        check_output(out, config, resume=resume, overwrite=overwrite)
    model_dir = resolve(config.model.name)
    check_model(model_dir, None if trait(config.method.name, "GRADIENT_FREE") else task.AUTO_HEAD, config.task)
    check_method(config, model_dir)
    peaks = PhasePeaks()  # peak memory per phase, for the manifest
    peaks.mark("startup")
    with peaks.phase("data"):
        splits = task.load_splits(config)
        setup = getattr(task, "setup", None)
        prepared = setup(config, allow_code=allow_code, load_run=open_finished) if setup else None
    if distributed.world_size() > 1 and trait(config.method.name, "GRADIENT_FREE"):
        raise TunelabError(f"method {config.method.name} takes no gradient steps; train it without --nproc")
    # data parallel: rank 0 owns the run directory; the other ranks train and leave
    run = RunDir.start(out, config, resume=resume, overwrite=overwrite) if main else RunDir(out)
    ctx = FitContext(config, splits, model_dir, run, resume, tuple(callbacks), prepared, choose)
    started = time.time()
    try:
        fit = getattr(METHODS[config.method.name], "train_run", None) or task.fit
        # the model loaded, the data tokenized (split off as `load` when the Trainer starts), training, the saved
        # model written
        with peaks.phase("train"):
            params, stats = fit(ctx)
        if not main:
            return RunResult(out, config, {}, {})
        result = _finish(task, ctx, started, params, stats, peaks)
    except KeyboardInterrupt:
        if main:
            run.set_state("interrupted", error="stopped by the user; continue with --resume")
        raise
    except BaseException as exc:
        if main:
            run.set_state("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        run.release()
    return result


def _finish(task, ctx: FitContext, started: float, params: dict, stats: dict, peaks: PhasePeaks) -> RunResult:
    """Evaluate the saved model with the code `tunelab predict` uses, write every artefact, mark completed."""
    config, run = ctx.config, ctx.run
    metrics = {"train": stats, "params": params}
    release()  # the training model and its Trainer are gone: their memory goes back before the reload
    evaluated = time.time()
    with peaks.phase("evaluate"):
        metrics.update(task.evaluate(ctx, stats))
        if config.eval.benchmarks and trait(config.method.name, "GRADIENT_FREE"):
            metrics["benchmarks_skipped"] = "nothing was trained: on a benchmark this run is its base model"
        elif config.eval.benchmarks:  # lm-eval-harness on the saved model and its base (docs/benchmarks.md)
            from .benchmarks import benchmark

            metrics["benchmarks"] = benchmark(run.path, config, config.eval.benchmarks,
                                              limit=config.eval.benchmark_limit)
    metrics["evaluate_s"] = round(time.time() - evaluated, 2)
    stats.pop("validation_loss", None)
    run.write_json("metrics.json", metrics)
    plot_loss(read_jsonl(run.path / "metrics.jsonl"), run.path / "loss.png",
              title=f"{config.method.name} · {config.model.name}")
    manifest = {**_manifest(config, ctx.splits, params, stats, time.time() - started), **peaks.record()}
    run.write_json("manifest.json", manifest)
    if not config.output.keep_checkpoints:
        shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    run.set_state("completed", finished_at=now())
    return RunResult(run.path, config, metrics, manifest)


def _manifest(config: Config, splits, params: dict, train_stats: dict, wall: float) -> dict:
    import datasets
    import peft
    import sklearn
    import torch
    import transformers

    manifest = {
        "tunelab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "datasets": datasets.__version__,
        "scikit_learn": sklearn.__version__, "config_hash": config.hash(), "data_files": splits.files,
        "examples": splits.sizes(), "labels": splits.labels, "leakage": splits.leaks, "parameters": params,
        "wall_time_s": round(wall, 2), "train_time_s": train_stats.get("runtime_s"),
        "examples_per_s": train_stats.get("examples_per_s"), "tokens_per_s": train_stats.get("tokens_per_s"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "bf16": use_bf16(config), "allocator": loaded(),
        # the base by name, Hub id (what the adapter names: portable) and the folder it was loaded from here
        "base_model": {"name": config.model.name, "hub_id": hub_id(config.model.name),
                       "path": resolve(config.model.name)},
    }
    if torch.cuda.is_available():
        manifest["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return manifest
