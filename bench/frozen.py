"""Frozen-backbone methods on minilm and the shipped sentiment data: time per epoch of `features`, `head` and
`last_layers: 2`, with tunelab's frozen-prefix cache (default) and without it (train.cache_frozen: false — what
the articles' recipe does: every epoch runs the whole network, frozen part included).

The first epoch of a cached run includes the caching pass. Reported: first epoch, mean of the later epochs, their
ratio, and test accuracy. `features` has no epochs: one pass of the frozen encoder, then a logistic regression.

    python bench/frozen.py [--epochs 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, emit, ratio, run_child, table, write  # noqa: E402

RUNS = {"features": ("features", True), "head": ("head", True), "head-uncached": ("head", False),
        "last_layers": ("last_layers", True), "last_layers-uncached": ("last_layers", False)}


def run_one(name: str, epochs: int) -> dict:
    import yaml

    from tunelab.train import train

    method, cached = RUNS[name]
    config = {"model": {"name": "minilm"},
              "data": {"train": "sample:sentiment_uci", "split": {"validation": 0.1, "test": 0.2, "seed": 42}},
              "method": {"name": "last_layers", "layers": 2} if method == "last_layers" else method,
              "train": {"epochs": epochs, "cache_frozen": cached, "logging_steps": 1000},
              "eval": {"earlier_task": None},
              "output": {"dir": str(WORK / f"frozen-{name}")}}
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"frozen-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    m = train(path, overwrite=True).metrics
    t = m["train"]
    out = {"method": method, "cached": cached, "accuracy": round(m["test"]["accuracy"], 4),
           "train_s": t["runtime_s"]}
    if method == "features":
        out.update(first_epoch_s=t["runtime_s"], later_epoch_s=None)
        return out
    epochs_s = list(t["epoch_s"])
    cache = t.get("frozen_cache") or {}
    first = epochs_s[0] + (cache.get("build_s") or 0)
    later = sum(epochs_s[1:]) / max(len(epochs_s) - 1, 1)
    out.update(epoch_s=epochs_s, cache_build_s=cache.get("build_s"), cache_mb=cache.get("mb"),
               first_epoch_s=round(first, 2), later_epoch_s=round(later, 2), first_over_later=ratio(first, later))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only", choices=list(RUNS))
    args = ap.parse_args()
    if args.only:
        emit(run_one(args.only, args.epochs))
        return
    res = {name: run_child("frozen.py", name, "--epochs", str(args.epochs)) for name in RUNS}
    rows = [[name, r.get("first_epoch_s"), r.get("later_epoch_s"), r.get("first_over_later"), r.get("accuracy"),
             r.get("peak_rss_mb"), r.get("error")] for name, r in res.items()]
    print("\n" + table(rows, ["minilm, frozen backbone", "epoch 1 s", "later epochs s", "epoch 1 / later",
                              "test accuracy", "peak RSS MB", "error"]))
    for method in ("head", "last_layers"):
        c, u = res[method], res[f"{method}-uncached"]
        print(f"{method}: a later epoch takes {c.get('later_epoch_s')} s cached vs {u.get('later_epoch_s')} s "
              f"uncached ({ratio(u.get('later_epoch_s'), c.get('later_epoch_s'))}× faster)")
    print(f"wrote {write('frozen', {'settings': vars(args), 'results': res})}")


if __name__ == "__main__":
    main()
