"""`make demo`: the cheapest approach (frozen features) against a real fine-tune, on the shipped sentiment data.

    python -m tunelab.demo [CONFIG ...]     (default: examples/sentiment-features.yaml examples/sentiment-full.yaml)
"""
from __future__ import annotations

import sys
import time

DEFAULT = ["examples/sentiment-features.yaml", "examples/sentiment-full.yaml"]


def main(argv: list[str] | None = None) -> int:
    from . import load, train
    from .errors import TunelabError

    configs = (argv if argv is not None else sys.argv[1:]) or DEFAULT
    rows = []
    try:
        for path in configs:
            print(f"\n=== tunelab train {path}", flush=True)
            t0 = time.time()
            result = train(path, overwrite=True)
            rows.append((path, result, time.time() - t0))
    except TunelabError as exc:
        print(f"tunelab: error: {exc}", file=sys.stderr)
        return 2
    print("\nheld-out test split of the shipped sentiment data (sample:sentiment_uci)")
    print(f"{'config':<40} {'method':<12} {'trainable':>10} {'train s':>8} {'accuracy':>9} {'macro F1':>9}")
    for path, result, _ in rows:
        m = result.metrics
        method = result.config.method.name
        print(f"{path:<40} {method:<12} {m['params']['percent']:>9.3g}% {m['train']['runtime_s']:>8.0f} "
              f"{m['test']['accuracy']:>9.4f} {m['test']['f1_macro']:>9.4f}")
    last = rows[-1][1].path
    examples = ["An absolute delight from start to finish.", "I would not buy this phone again."]
    print(f"\ntunelab predict {last}:")
    for text, label in zip(examples, load(last).predict(examples)):
        print(f"  {label:<9} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
