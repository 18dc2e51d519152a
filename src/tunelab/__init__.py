"""tunelab: fine-tune pretrained language models on your own data, by every approach the tutorials teach.

    run = tunelab.train("examples/sentiment-lora.yaml")
    clf = tunelab.load(run.path)
    clf.predict(["The plot was thin but the acting saved it."])
"""
__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft) tries to fetch a faster CPU 4-bit kernel from the Hugging Face hub at import
# and logs a warning when it cannot; tunelab works offline and bitsandbytes falls back to its own kernel.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# Import the `train` submodule before defining the function of the same name: importing a submodule sets
# the package attribute, and doing it first means the function below is what `tunelab.train` stays bound to.
from . import train as _train_module  # noqa: E402


def train(config, overrides=(), *, resume=False, overwrite=False):
    """Train from a YAML path (or a Config); returns a RunResult with `.path` and `.metrics`."""
    return _train_module.train(config, overrides, resume=resume, overwrite=overwrite)


def load(run_path):
    """Load a finished run: a classifier (`.predict`, `.predict_proba`, `.evaluate`), a reward model (`.score`), or
    a generative / dpo / rl policy (`.generate`, `.render`)."""
    from .runs import open_finished

    path, config = open_finished(run_path)
    if config.task == "classify":
        from .tasks.classify import Classifier

        return Classifier.from_saved(path, config)
    if config.task == "reward":
        from .tasks.reward import RewardModel

        return RewardModel.from_saved(path, config)
    from .tasks.generate import Generator

    return Generator.from_saved(path, config)


def validate(config_path, overrides=()):
    """Load and check a config without running it; raises ConfigError listing every problem."""
    from .config import load_config

    return load_config(config_path, overrides)


def evaluate(run_path, data):
    """Metrics of a finished run on a data file (same columns as its training data)."""
    from .evaluate import evaluate_run

    return evaluate_run(run_path, data)


def merge(run_path, out=None):
    """Fold a LoRA run's adapter into a plain HF model folder (default RUN/merged), checking outputs agree."""
    from .merge import merge as _merge

    return _merge(run_path, out)


__all__ = ["train", "load", "validate", "evaluate", "merge", "__version__"]
