"""The Try-it panel of `tunelab ui`: a finished run's answer to typed text — a classifier's probability per label, a
generative run's answer next to its base model's. Runs load with `tunelab.load` (the loader `tunelab serve` uses)
and prompts render with the run's `render` (what the server renders for one user message)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import TunelabError


class Playground:
    """Finished runs loaded for the Try-it panel (the two most recent), and the base models for before/after."""

    def __init__(self, keep: int = 2):
        self.keep, self.loaded, self.lock = keep, OrderedDict(), threading.Lock()

    def get(self, key: str, load):
        with self.lock:
            if key not in self.loaded:
                self.loaded[key] = load()
                while len(self.loaded) > self.keep:
                    self.loaded.popitem(last=False)
            self.loaded.move_to_end(key)
            return self.loaded[key]


def try_run(playground: Playground, path: Path, form: dict) -> dict:
    """The playground: the run's answer (and the base model's, for generative runs) to the typed text."""
    import tunelab

    text = form.get("text", "").strip()
    out = {"text": text}
    if not text:
        out["error"] = "type some text first"
        return out
    if len(text) > 20_000:
        out["error"] = "at most 20,000 characters"
        return out
    try:
        stamp = (path / "status.json").stat().st_mtime  # a run trained again is loaded again
        engine = playground.get(f"{path}@{stamp}", lambda: tunelab.load(path))
        if hasattr(engine, "predict_proba"):
            probs = engine.predict_proba([text])[0]
            out["probabilities"] = sorted(probs.items(), key=lambda kv: -kv[1])
            return out
        max_new = min(int(form.get("max_new_tokens") or 64), 512)
        sample = form.get("do_sample") == "on"
        temperature = float(form.get("temperature") or 0.7)
        top_p = float(form.get("top_p") or 0.95)
        prompt = engine.render(text)  # what `tunelab serve` renders for one user message
        kw = dict(max_new_tokens=max_new, do_sample=sample, temperature=temperature, top_p=top_p)
        out["prompt"] = prompt
        out["tuned"] = engine.generate([prompt], **kw)[0]
        with engine.adapter_disabled() as switched_off:
            if switched_off is not None:
                out["base"] = switched_off.generate([prompt], **kw)[0]
        if "base" not in out:
            from ..tasks.generate import Generator

            base = playground.get(f"base:{engine.config.model.name}", lambda: Generator.base(engine.config))
            out["base"] = base.generate([prompt], **kw)[0]
    except (TunelabError, ValueError) as exc:
        out["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 — the page says what failed
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out
