"""The Try-it panel of `tunelab ui`: a finished run's answer to typed text — a classifier's probability per label, a
generative run's answer next to its base model's, streamed to the page as the models write it (`stream_run`; the
form without scripts gets the whole answers, `try_run`). Runs load with `tunelab.load` (the loader `tunelab serve` uses)
and prompts render with the run's `render` (what the server renders for one user message)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from ..errors import TunelabError


class Playground:
    """Finished runs loaded for the Try-it panel (the two most recent), and the base models for before/after."""

    def __init__(self, keep: int = 2):
        self.keep, self.loaded, self.lock = keep, OrderedDict(), threading.Lock()
        self.busy = threading.Lock()  # one answer at a time: the models' adapters are switched off for the base

    def get(self, key: str, load):
        with self.lock:
            if key not in self.loaded:
                self.loaded[key] = load()
                while len(self.loaded) > self.keep:
                    self.loaded.popitem(last=False)
            self.loaded.move_to_end(key)
            return self.loaded[key]


def _loaded(playground: Playground, path: Path):
    import tunelab

    stamp = (path / "status.json").stat().st_mtime  # a run trained again is loaded again
    return playground.get(f"{path}@{stamp}", lambda: tunelab.load(path))


def _text(form: dict) -> str:
    text = form.get("text", "").strip()
    if not text:
        raise TunelabError("type some text first")
    if len(text) > 20_000:
        raise TunelabError("at most 20,000 characters")
    return text


def _settings(form: dict) -> dict:
    try:
        return {"max_new_tokens": max(1, min(int(form.get("max_new_tokens") or 64), 512)),
                "do_sample": form.get("do_sample") == "on", "temperature": float(form.get("temperature") or 0.7),
                "top_p": float(form.get("top_p") or 0.95)}
    except ValueError:
        raise TunelabError("max new tokens must be a whole number, temperature and top p numbers") from None


@contextmanager
def _sides(playground: Playground, engine):
    """(side, model) for the base model and this run: the run's adapter switched off where it has one, else the
    base model loaded beside it."""
    with engine.adapter_disabled() as switched_off:
        if switched_off is None:
            from ..tasks.generate import Generator

            switched_off = playground.get(f"base:{engine.config.model.name}", lambda: Generator.base(engine.config))
        yield switched_off


def _failure(exc: Exception) -> str:
    return str(exc) if isinstance(exc, (TunelabError, ValueError)) else f"{type(exc).__name__}: {exc}"


def try_run(playground: Playground, path: Path, form: dict) -> dict:
    """The playground without scripts: the run's answer (and the base model's, for generative runs) to the typed
    text, whole."""
    out = {"text": form.get("text", "").strip()}
    try:
        text = _text(form)
        engine = _loaded(playground, path)
        if hasattr(engine, "predict_proba"):
            probs = engine.predict_proba([text])[0]
            out["probabilities"] = sorted(probs.items(), key=lambda kv: -kv[1])
            return out
        kw = _settings(form)
        out["prompt"] = prompt = engine.render(text)  # what `tunelab serve` renders for one user message
        with playground.busy:
            out["tuned"] = engine.generate([prompt], **kw)[0]
            with _sides(playground, engine) as base:
                out["base"] = base.generate([prompt], **kw)[0]
    except Exception as exc:  # noqa: BLE001 — the page says what failed
        out["error"] = _failure(exc)
    return out


def stream_run(playground: Playground, path: Path, form: dict):
    """The playground as the page's script reads it: events (dicts) in order — `{"prompt"}`, then `{"side":
    "tuned" | "base", "text": piece}` as each model writes, `{"end": side}` when one has finished, and `{"error"}`
    where something failed."""
    try:
        text = _text(form)
        engine = _loaded(playground, path)
        if not hasattr(engine, "stream"):
            raise TunelabError("only generative runs stream their answers")
        kw = _settings(form)
        prompt = engine.render(text)
        yield {"prompt": prompt}
        with playground.busy:
            for piece in engine.stream(prompt, **kw):
                yield {"side": "tuned", "text": piece}
            yield {"end": "tuned"}
            with _sides(playground, engine) as base:
                for piece in base.stream(prompt, **kw):
                    yield {"side": "base", "text": piece}
            yield {"end": "base"}
    except Exception as exc:  # noqa: BLE001 — the page says what failed
        yield {"error": _failure(exc)}
