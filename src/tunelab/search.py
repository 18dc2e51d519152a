"""`tunelab search`: hyperparameter search with Optuna over the `search.space` of a config.

TPE sampler (seeded by train.seed), median pruning on the validation metric at each evaluation, study stored in
DIR/study.db (SQLite: resumable, and readable by Optuna's own tools such as optuna-dashboard). Each trial is an
ordinary run in DIR/trials/NNN. Trials are chosen on validation only; the best config is written as a
ready-to-run DIR/best.yaml, with DIR/trials.csv and DIR/history.png.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

from .config import Config, load_config, set_key
from .errors import ConfigError, TunelabError
from .runs import RunDir, replaceable


def _sample(trial, key: str, spec):
    if spec.choices is not None:
        return trial.suggest_categorical(key, spec.choices)
    integer = float(spec.low).is_integer() and float(spec.high).is_integer() and not spec.log and (
        spec.step is None or float(spec.step).is_integer())
    if integer:
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1))
    return trial.suggest_float(key, spec.low, spec.high, log=spec.log, step=spec.step)


def trial_config(base: dict, params: dict, out_dir: Path) -> Config:
    raw = copy.deepcopy(base)
    for key, value in params.items():
        problem = set_key(raw, key, value)
        if problem:
            raise ConfigError("search.space", [f"{key}: {problem}"])
    raw.setdefault("output", {})["dir"] = str(out_dir)
    return Config.model_validate(raw)


def _reporter(trial, metric: str):
    """A Trainer callback: each validation metric goes to Optuna, numbered by evaluation (so trials with other
    batch sizes are compared at the same point); a trial the pruner rejects stops there."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        evaluations = 0

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            import optuna

            value = (metrics or {}).get(f"eval_{metric}")
            if value is None:
                return
            trial.report(value, step=self.evaluations)
            self.evaluations += 1
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation {metric} {value:.4f} at evaluation {self.evaluations} is "
                                         f"worse than the median of earlier trials there")

    return Report()


def search(config_path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, trials: int | None = None,
           out: str | Path | None = None, allow_code: bool = False) -> dict:
    import optuna
    from pydantic import ValidationError

    from .config import describe_error
    from .train import train

    config = load_config(config_path, overrides)
    if config.search is None:
        raise ConfigError(str(config_path), ["`search`: tunelab search needs a search section with a `space`, e.g. "
                                             "search: {space: {train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}}}"])
    spec = config.search
    out = Path(out or spec.dir or Path("runs") / f"search-{Path(config_path).stem}")
    base = config.to_dict()
    base.pop("search", None)
    base.pop("compare", None)
    # every point of the space must make a valid config: check the corners now, not after hours of trials
    problems = []
    for corner in ("low", "high"):
        params = {k: (r.choices[0] if corner == "low" else r.choices[-1]) if r.choices is not None else
                  getattr(r, corner) for k, r in spec.space.items()}
        try:
            trial_config(base, params, out / "trials" / "check")
        except ValidationError as exc:
            problems += [f"`search.space` ({corner} end): {describe_error(err)}" for err in exc.errors()]
    if problems:
        raise ConfigError(str(config_path), sorted(set(problems)))
    metric = config.metric
    direction = "minimize" if metric == "loss" else "maximize"
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=Path(config_path).stem, storage=storage, load_if_exists=True, direction=direction,
        sampler=optuna.samplers.TPESampler(seed=config.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials,
                                           n_warmup_steps=spec.warmup_evaluations))
    total = trials or spec.trials
    done = [t for t in study.trials if t.state.is_finished()]
    todo = max(0, total - len(done))
    if done:
        print(f"tunelab search: resuming {out / 'study.db'}: {len(done)} trial(s) done, {todo} to go")

    def objective(trial):
        params = {key: _sample(trial, key, r) for key, r in spec.space.items()}
        run_dir = out / "trials" / f"{trial.number:03d}"
        print(f"\n── search trial {trial.number} ({len(study.trials)}/{total}): "
              + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()),
              flush=True)
        cfg = trial_config(base, params, run_dir)
        replaceable(run_dir, "tunelab search")  # a trial folder left by an earlier study of this search only
        try:
            result = train(cfg, overwrite=True, callbacks=(_reporter(trial, metric),), allow_code=allow_code)
        except optuna.TrialPruned:
            RunDir(run_dir).set_state("pruned", error="pruned by tunelab search (below the median)")
            print(f"── search trial {trial.number}: pruned", flush=True)
            raise
        value = (result.metrics.get("validation") or {}).get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise TunelabError(f"trial {trial.number} has no validation {metric}: the search needs validation data "
                               f"(data.validation or data.split.validation > 0)")
        trial.set_user_attr("run", str(run_dir))
        print(f"── search trial {trial.number}: validation {metric} {value:.4f}", flush=True)
        return value

    if todo:
        study.optimize(objective, n_trials=todo, catch=(TunelabError,))
    return _write_results(study, base, out, metric, direction, config_path)


def _write_results(study, base: dict, out: Path, metric: str, direction: str, config_path) -> dict:
    import optuna

    from .plots import plot_search_history

    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    frame.to_csv(out / "trials.csv", index=False)
    plot_search_history(study, out / "history.png", metric, direction)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    result = {"dir": out, "trials": len(study.trials), "complete": len(complete),
              "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
              "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
              "trials_csv": out / "trials.csv", "history": out / "history.png", "metric": metric}
    if complete:
        best = study.best_trial
        cfg = trial_config(base, best.params, Path("runs") / f"{Path(config_path).stem}-best")
        path = out / "best.yaml"
        cfg.save(path)
        text = path.read_text()
        path.write_text(f"# best of {len(study.trials)} trials of tunelab search on {config_path}: trial "
                        f"{best.number}, validation {metric} {best.value:.4f}\n# params: {best.params}\n{text}")
        result.update(best_yaml=path, best_value=best.value, best_params=best.params, best_trial=best.number,
                      best_run=best.user_attrs.get("run"))
    return result
