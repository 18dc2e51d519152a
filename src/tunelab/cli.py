"""The `tunelab` command: a thin skin over the Python API (tunelab.train/load/validate/evaluate)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _train(args) -> int:
    from .train import train

    result = train(args.config, args.set, resume=args.resume, overwrite=args.overwrite)
    _print_result(result)
    return 0


def _print_result(result) -> None:
    m = result.metrics
    params = m["params"]
    print(f"\nrun: {result.path}")
    print(f"trainable parameters: {params['trainable']:,} / {params['total']:,} ({params['percent']:.3g}%)")
    print(f"training: {m['train']['runtime_s']} s, {m['train']['examples_per_s']} examples/s")
    for split in ("validation", "test"):
        if split in m:
            s = m[split]
            print(f"{split:>10}: accuracy {s['accuracy']:.4f} · macro F1 {s['f1_macro']:.4f} "
                  f"({s['examples']} examples)")


def _validate(args) -> int:
    from .config import load_config

    config = load_config(args.config, args.set)
    print(f"{args.config}: OK ({config.task}, method {config.method.name}, model {config.model.name}, "
          f"lr {config.lr})")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_run

    metrics = evaluate_run(args.run, args.data)
    print(f"{args.data}: accuracy {metrics['accuracy']:.4f} · macro F1 {metrics['f1_macro']:.4f} "
          f"· precision {metrics['precision_macro']:.4f} · recall {metrics['recall_macro']:.4f} "
          f"({metrics['examples']} examples)")
    if metrics.get("overlap_with_train"):
        print(f"warning: {metrics['overlap_with_train']} of these {metrics['examples']} examples were in this run's "
              f"training split; the numbers above overstate how the model does on new data", file=sys.stderr)
    cm = metrics["confusion_matrix"]
    width = max(len(lbl) for lbl in cm["labels"]) + 2
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{lbl:>{width}}" for lbl in cm["labels"]))
    for lbl, row in zip(cm["labels"], cm["matrix"]):
        print(f"{lbl:>{width}}" + "".join(f"{v:>{width}}" for v in row))
    return 0


def _predict(args) -> int:
    from . import load

    texts = list(args.text)
    if args.input:
        texts += [line.rstrip("\n") for line in Path(args.input).read_text().splitlines() if line.strip()]
    if not texts:
        raise SystemExit("tunelab predict: give TEXT arguments or --input FILE (one text per line)")
    clf = load(args.run)
    for text, probs in zip(texts, clf.predict_proba(texts)):
        label = max(probs, key=probs.get)
        if args.json:
            print(json.dumps({"text": text, "label": label, "probabilities": probs}, ensure_ascii=False))
        else:
            print(f"{label}\t{probs[label]:.3f}\t{text}")
    return 0


def _merge(args) -> int:
    from .merge import merge

    result = merge(args.run, args.out)
    print(f"merged model written to {result['path']} (max |logit difference| vs the adapter: "
          f"{result['max_abs_diff']:.2e} on {result['examples']} texts)")
    return 0


def _models(args) -> int:
    from .models import PACKAGED

    for m in PACKAGED.values():
        print(f"{m.alias:<14} {m.description}  [{m.install_command}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune pretrained language models from one YAML file.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def with_set(sp):
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")

    t = sub.add_parser("train", help="train a run from a config file")
    t.add_argument("config")
    with_set(t)
    t.add_argument("--resume", action="store_true", help="continue an unfinished run from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.set_defaults(fn=_train)

    v = sub.add_parser("validate", help="check a config file without running it")
    v.add_argument("config")
    with_set(v)
    v.set_defaults(fn=_validate)

    e = sub.add_parser("eval", help="evaluate a finished run on a data file")
    e.add_argument("run")
    e.add_argument("--data", required=True, help="file with the same text/label columns as the training data")
    e.set_defaults(fn=_eval)

    pr = sub.add_parser("predict", help="predict labels with a finished run")
    pr.add_argument("run")
    pr.add_argument("text", nargs="*")
    pr.add_argument("--input", help="file with one text per line")
    pr.add_argument("--json", action="store_true", help="one JSON object per line, with probabilities")
    pr.set_defaults(fn=_predict)

    mg = sub.add_parser("merge", help="fold a LoRA run's adapter into a plain Hugging Face model folder")
    mg.add_argument("run")
    mg.add_argument("--out", help="output folder (default RUN/merged)")
    mg.set_defaults(fn=_merge)

    m = sub.add_parser("models", help="list the packaged model aliases")
    m.set_defaults(fn=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import TunelabError

    try:
        return args.fn(args)
    except TunelabError as exc:
        if args.debug:
            raise
        print(f"tunelab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
