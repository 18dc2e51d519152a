"""tunelab: fine-tune pretrained language models on your own data, by every approach the tutorials teach.

    run = tunelab.train("examples/sentiment-lora.yaml")
    clf = tunelab.load(run.path)
    clf.predict(["The plot was thin but the acting saved it."])
"""
import logging as _logging
import sys as _sys
import types as _types

from .version import __version__

# bitsandbytes (imported by peft) tries to fetch a faster CPU 4-bit kernel from the Hugging Face hub at import
# and logs a warning when it cannot; tunelab works offline and bitsandbytes falls back to its own kernel.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

_API = ("train", "load", "validate", "evaluate", "merge", "compare", "search", "check_data", "export", "serve",
        "serve_app")


class _Package(_types.ModuleType):
    """Importing a submodule binds its name on the package (`tunelab.train`...). The API functions below share
    those names and import their submodule only when called (so `import tunelab` and the command line stay
    quick), so the package keeps the functions: the modules are in sys.modules (`from tunelab.train import x`)."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, _types.ModuleType) and name in self.__dict__:
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def train(config, overrides=(), *, resume=False, overwrite=False, allow_code=False):
    """Train from a YAML path (or a Config); returns a RunResult with `.path` and `.metrics`. `allow_code`: let a
    config's rl.reward.function import and run Python code."""
    from .train import train as _train

    return _train(config, overrides, resume=resume, overwrite=overwrite, allow_code=allow_code)


def load(run_path):
    """Load a finished run: a classifier (`.predict`, `.predict_proba`, `.evaluate`), a reward model (`.score`), or
    a generative / dpo / rl policy (`.generate`, `.render`)."""
    from .runs import load_run

    return load_run(run_path)


def validate(config_path, overrides=()):
    """Load and check a config without running it; raises ConfigError listing every problem."""
    from .config import load_config

    return load_config(config_path, overrides)


def evaluate(run_path, data, *, allow_code=False):
    """Metrics of a finished run on a data file (same columns as its training data); an rl run is scored by its
    reward (`allow_code` for a function reward)."""
    from .evaluate import evaluate_run

    return evaluate_run(run_path, data, allow_code=allow_code)


def merge(run_path, out=None):
    """Fold a LoRA run's adapter into a plain HF model folder (default RUN/merged), checking outputs agree."""
    from .merge import merge as _merge

    return _merge(run_path, out)


def compare(config, overrides=(), *, methods=None, out=None, rerun=False, allow_code=False):
    """Run several methods on the same data and split; returns rows and the paths of report.md / report.html."""
    from .compare import compare as _compare

    return _compare(config, overrides, methods=methods, out=out, rerun=rerun, allow_code=allow_code)


def search(config, overrides=(), *, trials=None, out=None, allow_code=False):
    """Optuna hyperparameter search over the config's search.space; returns the best params and output paths."""
    from .search import search as _search

    return _search(config, overrides, trials=trials, out=out, allow_code=allow_code)


def check_data(config, overrides=()):
    """`tunelab data check`: sizes, label balance, token lengths, duplicates and leakage, as a dict."""
    from .config import Config, load_config
    from .data.check import check

    return check(config if isinstance(config, Config) else load_config(config, overrides))


def export(run_path, format="hf", *, merge=False, out=None, tolerance=None, quant="f16"):
    """Export a finished run as a Hugging Face folder (`merge=True` folds the adapter in), ONNX (parity-checked
    against PyTorch with onnxruntime) or GGUF (`quant`; parity-checked with llama.cpp); returns what was written
    and measured."""
    from .export import export as _export

    return _export(run_path, format, merge=merge, out=out, tolerance=tolerance, quant=quant)


def serve(runs, host="127.0.0.1", port=8000, *, api_key=None, limits=None, allow_hosts=()):
    """Serve finished runs over the OpenAI-compatible HTTP API (blocking); `tunelab.serve_app(runs)` gives the
    FastAPI app to embed instead. It answers loopback names, `host` and `allow_hosts` (Host header names)."""
    from .serve import serve as _serve

    return _serve(list(runs), host=host, port=port, api_key=api_key, limits=limits, allow_hosts=list(allow_hosts))


def serve_app(runs, *, api_key=None, limits=None, allow_hosts=()):
    """The FastAPI app serving `runs`, for an ASGI server of your choice. It answers requests whose Host is a
    loopback name or address or one of `allow_hosts` (`*.domain` for subdomains, `*` for any)."""
    from .serve import create_app
    from .serve.guard import HostPolicy

    return create_app(list(runs), limits, api_key, hosts=HostPolicy("127.0.0.1", allow_hosts))


__all__ = [*_API, "__version__"]
