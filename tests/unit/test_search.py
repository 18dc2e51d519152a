"""`tunelab search`: Optuna trials over the config's space, median pruning, a resumable SQLite study, and a best
config that reruns to the same validation metric."""
from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.errors import ConfigError


def test_search_prunes_writes_best_and_best_reruns_the_same(make_config, tmp_path):
    import optuna

    from tunelab.search import search
    from tunelab.train import train

    out = tmp_path / "search"
    # a deliberately bad range: learning rates down to 1e-7 cannot move the model, so such trials sit below the
    # median at each evaluation and are pruned
    # (validation loss as the metric: on a tiny random model it moves with the learning rate while F1 stays flat)
    path = make_config(method="full", name="srch", train={"max_steps": 12, "eval_every": 3, "logging_steps": 3},
                       eval={"metric": "loss", "forgetting": None},
                       search={"space": {"train.lr": {"low": 1e-7, "high": 3e-3, "log": True},
                                         "train.batch_size": {"choices": [8, 16]}},
                               "trials": 6, "startup_trials": 2, "dir": str(out)})
    result = search(path)
    assert result["trials"] == 6 and result["pruned"] >= 1 and result["complete"] >= 2
    assert (out / "trials.csv").read_text().count("\n") == 7  # header + 6 trials
    assert (out / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pruned_run = next(p for p in (out / "trials").iterdir() if '"pruned"' in (p / "status.json").read_text())
    assert pruned_run.is_dir()
    study = optuna.load_study(study_name="srch", storage=f"sqlite:///{out / 'study.db'}")  # Optuna's own tools
    assert len(study.trials) == 6 and study.best_value == result["best_value"]

    rerun = train(result["best_yaml"], [f"output.dir={tmp_path / 'best-run'}"])
    assert rerun.metrics["validation"]["loss"] == pytest.approx(result["best_value"], abs=1e-9)
    assert rerun.config.train.lr == pytest.approx(result["best_params"]["train.lr"])

    # resuming with a larger total runs only the missing trials
    more = search(path, trials=7)
    assert more["trials"] == 7


def test_search_space_problems_are_reported_before_any_trial(make_config, tmp_path):
    from tunelab.search import search

    path = make_config(method="full", name="bad", search={"space": {"train.lr": {"low": 1e-5, "high": 2.0},
                                                                    "method.rank": {"choices": [4, 8]}}})
    with pytest.raises(ConfigError) as err:
        search(path)
    text = str(err.value)
    assert "train.lr" in text and "method.rank" in text
    assert not Path("runs/search-bad").exists()
    path = make_config(method="full", name="bad2", search={"space": {"train.lr": {"low": 1e-3, "high": 1e-5}}})
    with pytest.raises(ConfigError, match="low"):
        search(path)
