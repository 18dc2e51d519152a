"""The `tunelab` command: a thin skin over the Python API (tunelab.train/load/validate/evaluate)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _train(args) -> int:
    from . import distributed
    from .train import train

    if args.nproc > 1 and distributed.world_size() == 1:
        argv = ["train", args.config, *[a for kv in args.set for a in ("--set", kv)]]
        argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite + ["--debug"] * args.debug
        argv += ["--allow-code"] * args.allow_code
        return distributed.launch(argv, args.nproc)
    distributed.quiet_other_ranks()
    result = train(args.config, args.set, resume=args.resume, overwrite=args.overwrite, allow_code=args.allow_code)
    if distributed.is_main():
        _print_result(result)
    return 0


def _print_result(result) -> None:
    m = result.metrics
    params = m["params"]
    print(f"\nrun: {result.path}")
    print(f"trainable parameters: {params['trainable']:,} / {params['total']:,} ({params['percent']:.3g}%)")
    speed = m["train"].get("examples_per_s")
    print(f"training: {m['train']['runtime_s']} s" + (f", {speed} examples/s" if speed is not None else ""))
    if m["train"].get("tokens_per_s"):
        print(f"throughput: {m['train']['tokens_per_s']} real tokens/s")
    if result.config.task in ("reward", "dpo", "rl"):
        _print_preference(result.config, m)
        return
    names = {"accuracy": "accuracy", "f1_macro": "macro F1", "loss": "loss", "perplexity": "perplexity",
             "chrf": "chrF", "bleu": "BLEU", "rouge_l": "ROUGE-L", "exact_match": "exact match"}
    for split in ("validation", "test"):
        if split in m:
            shown = " · ".join(f"{label} {m[split][key]:.4f}" for key, label in names.items() if key in m[split])
            count = f" ({m[split]['examples']} examples)" if "examples" in m[split] else ""
            print(f"{split:>10}: {shown}{count}")
    f = m.get("forgetting")
    if f and "drop" in f:
        print(f"forgetting: earlier task ({f['data']}, label {f['label']}) linear-probe accuracy "
              f"{f['base_accuracy']:.4f} with the base encoder → {f['accuracy']:.4f} after fine-tuning")
    elif f and "ratio" in f:
        print(f"forgetting: perplexity on general text ({f['data']}, {f['documents']} documents) "
              f"{f['base_perplexity']:.2f} before → {f['perplexity']:.2f} after (×{f['ratio']:.3f})")
    elif f:
        print(f"forgetting: not measured on {f['data']}: {f['skipped']}")


def _print_preference(config, m: dict) -> None:
    for split in ("validation", "test"):
        s = m.get(split)
        if s and config.task == "reward":
            print(f"{split:>10}: pairwise accuracy {s['accuracy']:.4f} · mean margin {s['margin']:.3f} · "
                  f"loss {s['loss']:.4f} ({s['pairs']} pairs)")
        elif s:
            print(f"{split:>10}: log-likelihood margin log π(chosen) - log π(rejected) {s['base_logp_margin']:.3f} "
                  f"(base) → {s['logp_margin']:.3f}; chosen preferred {s['base_preference_accuracy']:.1%} → "
                  f"{s['preference_accuracy']:.1%}; DPO reward margin {s['reward_margin']:.3f} "
                  f"(accuracy {s['reward_accuracy']:.1%}) ({s['pairs']} pairs)")
    h = m.get("held_out")
    if h:
        print(f"held-out prompts ({h['prompts']} {h['split']} prompts × {h['samples_per_prompt']} samples), reward "
              f"= {h['reward']}:\n  mean reward {h['base_reward']:.4f} (base) → {h['tuned_reward']:.4f} (tuned); "
              f"KL(tuned ‖ base) {h['kl']:.2f} nats per completion; mean length {h['base_length']:.1f} → "
              f"{h['tuned_length']:.1f} tokens")
    f = m.get("forgetting")
    if f and "ratio" in f:
        print(f"forgetting: perplexity on general text ({f['data']}, {f['documents']} documents) "
              f"{f['base_perplexity']:.2f} before → {f['perplexity']:.2f} after (×{f['ratio']:.3f})")


def _validate(args) -> int:
    from .config import load_config

    config = load_config(args.config, args.set)
    lr = f", lr {config.lr}" if config.lr is not None else ""
    print(f"{args.config}: OK ({config.task}, method {config.method.name}, model {config.model.name}{lr})")
    return 0


def _eval(args) -> int:
    from .errors import TunelabError
    from .evaluate import evaluate_base, evaluate_run

    if args.base:
        metrics = evaluate_base(args.run, args.set)
        print(f"{args.run} (untrained {metrics.pop('model')}), test split: " +
              " · ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return 0
    if not args.data:
        raise TunelabError("tunelab eval: --data FILE is required (or --base CONFIG)")
    metrics = evaluate_run(args.run, args.data)
    if "accuracy" not in metrics:  # a generative run: loss/perplexity (+ generation metrics)
        print(f"{args.data}: " + " · ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return 0
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
    from .errors import TunelabError
    from .tasks.classify import Classifier

    texts = list(args.text)
    if args.input:
        texts += [line for line in _read_lines(args.input) if line.strip()]
    if not texts:
        raise TunelabError("tunelab predict: give TEXT arguments or --input FILE (one text per line)")
    clf = Classifier.load(args.run)
    for text, probs in zip(texts, clf.predict_proba(texts)):
        label = max(probs, key=probs.get)
        if args.json:
            print(json.dumps({"text": text, "label": label, "probabilities": probs}, ensure_ascii=False))
        else:
            print(f"{label}\t{probs[label]:.3f}\t{text}")
    return 0


def _score(args) -> int:
    from .tasks.reward import RewardModel

    model = RewardModel.load(args.run)
    scores = model.score([args.prompt] * len(args.response), list(args.response))
    for response, score in sorted(zip(args.response, scores), key=lambda x: -x[1]):
        print(f"{score:8.3f}\t{response}")
    return 0


def _preview(args) -> int:
    from transformers import AutoTokenizer

    from .config import load_config
    from .data import load_splits
    from .errors import TunelabError
    from .models import resolve
    from .tasks import sft

    config = load_config(args.config, args.set)
    if config.task != "sft":
        raise TunelabError(f"data preview renders sft examples; {args.config} is task {config.task}")
    frame = getattr(load_splits(config), args.split)
    if not 0 <= args.index < len(frame):
        raise TunelabError(f"--index {args.index}: the {args.split} split has {len(frame)} rows")
    tokenizer = AutoTokenizer.from_pretrained(resolve(config.model.name))
    conv = frame["_conv"].iloc[args.index]
    print(f"{args.split} example {args.index} (row {frame['_row'].iloc[args.index]}); trained tokens "
          f"{'in green' if sys.stdout.isatty() else 'between ⟦ ⟧'}")
    print(sft.preview(conv, tokenizer, config.data, config.model.max_length, color=sys.stdout.isatty()))
    return 0


def _data_check(args) -> int:
    from .config import load_config
    from .data.check import check, format_report

    report = check(load_config(args.config, args.set))
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.config))
    return 1 if any(v["examples"] for v in report["leakage"].values()) else 0


def _generate(args) -> int:
    from .config import load_config
    from .errors import TunelabError
    from .tasks.generate import Generator

    texts = list(args.prompt) + (_read_prompts(args.input, args.field) if args.input else [])
    if not texts:
        raise TunelabError("tunelab generate: give --prompt TEXT (repeatable) or --input FILE")
    if args.base:
        generator = Generator.base(load_config(args.run, args.set))
    else:
        generator = Generator.load(args.run)
    prompts = [generator.render(p) for p in texts]
    outputs = generator.generate(prompts, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                 temperature=args.temperature or 1.0, top_p=args.top_p, batch_size=args.batch_size,
                                 progress=len(prompts) > args.batch_size)
    as_json = args.json or bool(args.input)
    for prompt, text in zip(texts, outputs):
        print(json.dumps({"prompt": prompt, "generated": text}, ensure_ascii=False) if as_json else text)
    return 0


def _read_lines(spec: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark dropped); clear errors for a missing or non-UTF-8 file."""
    from .data.readers import _text
    from .errors import DataError

    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: no such file" if not path.exists() else f"{spec} is not a file")
    return _text(path).splitlines()


def _read_prompts(spec: str, field: str) -> list[str]:
    """Prompts from a JSONL file (`field` of each row) or a text file (one per line), with clear errors."""
    from .errors import DataError

    path = Path(spec)
    lines = [x for x in _read_lines(spec) if x.strip()]
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{spec}, row {i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not str(row.get(field) or "").strip():
            raise DataError(f"{spec}, row {i}: no `{field}` text (use --field to name the prompt column)")
        out.append(str(row[field]))
    return out


def _merge(args) -> int:
    from .merge import merge

    result = merge(args.run, args.out)
    print(f"merged model written to {result['path']} (max |logit difference| vs the adapter: "
          f"{result['max_abs_diff']:.2e} on {result['examples']} texts)")
    return 0


def _compare(args) -> int:
    from .compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    result = compare(args.config, args.set, methods=methods, out=args.out, rerun=args.rerun,
                     allow_code=args.allow_code)
    print()
    for row in result["rows"]:
        if row["status"] == "failed":
            print(f"{row['name']:>14}: FAILED — {row['error']}")
            continue
        shown = " · ".join(f"{k} {v:.4f}" for k, v in row["test"].items() if k in ("accuracy", "f1_macro", "loss",
                                                                                     "perplexity", "chrf")
                           and isinstance(v, float))
        print(f"{row['name']:>14}: test {shown} ({'cached' if row['status'] == 'cached' else 'ran now'})")
    print(f"\nreport: {result['report_html']} (and {result['report_md'].name} beside it)")
    return 0 if all(r["status"] != "failed" for r in result["rows"]) else 1


def _search(args) -> int:
    from .search import search

    r = search(args.config, args.set, trials=args.trials, out=args.out, allow_code=args.allow_code)
    print(f"\nsearch: {r['trials']} trial(s): {r['complete']} complete, {r['pruned']} pruned, {r['failed']} failed")
    print(f"trials: {r['trials_csv']} · history plot: {r['history']} · study: {r['dir'] / 'study.db'}")
    if "best_yaml" in r:
        print(f"best: trial {r['best_trial']}, validation {r['metric']} {r['best_value']:.4f}, {r['best_params']}")
        print(f"ready to run: tunelab train {r['best_yaml']}")
        return 0
    print("no trial completed; nothing to recommend")
    return 1


def _export(args) -> int:
    from .export import export

    r = export(args.run, args.format, merge=args.merge, out=args.out, tolerance=args.tolerance)
    if r["format"] == "onnx":
        print(f"ONNX {r['kind']} model written to {r['path']}/model.onnx")
        print(f"parity with PyTorch on {r['examples']} inputs (batch {r['batch_shape']}): max |logit difference| "
              f"{r['max_abs_diff']:.2e} (tolerance {r['tolerance']:.0e})")
        print(f"speed on that batch: PyTorch eager {r['torch_eager_s'] * 1000:.1f} ms, onnxruntime "
              f"{r['onnxruntime_s'] * 1000:.1f} ms — onnxruntime {r['speedup']:.2f}× PyTorch")
    elif r["merged"]:
        print(f"merged Hugging Face model written to {r['path']} (max |logit difference| vs the adapter: "
              f"{r['max_abs_diff']:.2e} on {r['examples']} inputs)")
    else:
        print(f"Hugging Face folder written to {r['path']}")
    return 0


def _serve(args) -> int:
    from .serve import Limits, serve

    limits = Limits(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
                    max_tokens=args.max_tokens, max_body_bytes=int(args.max_body_mb * 2**20))
    from .serve import read_api_key

    key = read_api_key(args.api_key, args.api_key_file)
    serve(args.runs, host=args.host, port=args.port, api_key=key, limits=limits, log_level=args.log_level,
          allow_public=args.allow_public)
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

    def with_code(sp):
        sp.add_argument("--allow-code", action="store_true",
                        help="let the config's rl.reward.function import and run the Python code it names")

    t = sub.add_parser("train", help="train a run from a config file")
    t.add_argument("config")
    with_set(t)
    t.add_argument("--resume", action="store_true", help="continue an unfinished run from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    with_code(t)
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel training in N processes (torch.distributed.run; gloo on CPU, NCCL on GPU); "
                        "train.batch_size is per process")
    t.set_defaults(fn=_train)

    v = sub.add_parser("validate", help="check a config file without running it")
    v.add_argument("config")
    with_set(v)
    v.set_defaults(fn=_validate)

    e = sub.add_parser("eval", help="evaluate a finished run on a data file")
    e.add_argument("run", help="run directory (or a config file with --base)")
    e.add_argument("--data", help="file with the same text/label columns as the training data")
    e.add_argument("--base", action="store_true", help="generative tasks: test metrics of the config's untrained model "
                                                       "on its test split, for before/after comparisons")
    with_set(e)
    e.set_defaults(fn=_eval)

    pr = sub.add_parser("predict", help="predict labels with a finished run")
    pr.add_argument("run")
    pr.add_argument("text", nargs="*")
    pr.add_argument("--input", help="file with one text per line")
    pr.add_argument("--json", action="store_true", help="one JSON object per line, with probabilities")
    pr.set_defaults(fn=_predict)

    sc = sub.add_parser("score", help="score responses to a prompt with a finished reward run (best first)")
    sc.add_argument("run")
    sc.add_argument("--prompt", required=True, help="the prompt the responses answer")
    sc.add_argument("response", nargs="+", help="responses to score")
    sc.set_defaults(fn=_score)

    d = sub.add_parser("data", help="look at a config's data as the model will see it")
    dsub = d.add_subparsers(dest="data_command", required=True)
    pv = dsub.add_parser("preview", help="render one sft example with its trained tokens marked")
    pv.add_argument("config")
    pv.add_argument("--index", type=int, default=0)
    pv.add_argument("--split", choices=["train", "validation", "test"], default="train")
    with_set(pv)
    pv.set_defaults(fn=_preview)
    dc = dsub.add_parser("check", help="sizes, label balance, token lengths, duplicates and train/eval leakage "
                                       "(exit status 1 when there is leakage)")
    dc.add_argument("config")
    dc.add_argument("--json", action="store_true")
    with_set(dc)
    dc.set_defaults(fn=_data_check)

    g = sub.add_parser("generate", help="generate text with a finished sft/dpo/rl run (or a config's base model)")
    g.add_argument("run", help="run directory, or a config file with --base")
    g.add_argument("--prompt", action="append", default=[], help="repeatable")
    g.add_argument("--input", help="batch: a .jsonl file with a `prompt` field per row (see --field), or a text "
                                   "file with one prompt per line; writes JSON lines")
    g.add_argument("--field", default="prompt", help="--input JSONL field holding the prompt (default: prompt)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--base", action="store_true", help="RUN is a config: use its untrained model")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--json", action="store_true")
    with_set(g)
    g.set_defaults(fn=_generate)

    mg = sub.add_parser("merge", help="fold a LoRA run's adapter into a plain Hugging Face model folder")
    mg.add_argument("run")
    mg.add_argument("--out", help="output folder (default RUN/merged)")
    mg.set_defaults(fn=_merge)

    ex = sub.add_parser("export", help="export a finished run as a Hugging Face folder or ONNX (parity-checked)")
    ex.add_argument("run")
    ex.add_argument("--format", choices=["hf", "onnx"], default="hf")
    ex.add_argument("--merge", action="store_true", help="hf: fold a LoRA-type adapter into the base weights")
    ex.add_argument("--out", help="output folder (default RUN/export-FORMAT)")
    ex.add_argument("--tolerance", type=float, help="largest allowed |logit difference| (default 1e-4 classifiers, "
                                                      "1e-3 language models)")
    ex.set_defaults(fn=_export)

    sv = sub.add_parser("serve", help="serve finished runs over an OpenAI-compatible HTTP API")
    sv.add_argument("runs", nargs="+", help="run directories; each is served as model <directory name>")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key-file", metavar="FILE",
                    help="require `Authorization: Bearer KEY`, KEY being the first line of FILE (or set "
                         "TUNELAB_API_KEY); with a key, every route but /health needs it")
    sv.add_argument("--api-key", help="the key itself (visible to other users in the process list: prefer "
                                      "--api-key-file or TUNELAB_API_KEY)")
    sv.add_argument("--allow-public", action="store_true",
                    help="allow a non-loopback --host without an API key")
    sv.add_argument("--max-body-mb", type=float, default=16, help="largest request body (413 beyond it)")
    sv.add_argument("--max-batch", type=int, default=16, help="requests run together in one pass (1: no batching)")
    sv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long to collect a batch")
    sv.add_argument("--max-queue", type=int, default=256, help="waiting requests per model before 503")
    sv.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (info logs every request)")
    sv.set_defaults(fn=_serve)

    c = sub.add_parser("compare", help="run several methods on the same data and split; write report.md/.html")
    c.add_argument("config")
    c.add_argument("--methods", help="comma-separated, e.g. features,head,last_layers,full,lora,prompt,icl_0,icl_k,"
                                     "icl_retrieved (default: the config's compare.methods)")
    c.add_argument("--out", help="folder for the runs and the report (default: compare.dir or runs/compare-NAME)")
    c.add_argument("--rerun", action="store_true", help="train every method again, even those already run")
    with_set(c)
    with_code(c)
    c.set_defaults(fn=_compare)

    se = sub.add_parser("search", help="hyperparameter search (Optuna TPE + median pruning) over search.space")
    se.add_argument("config")
    se.add_argument("--trials", type=int, help="trials in total (default: search.trials)")
    se.add_argument("--out", help="folder (default: search.dir or runs/search-NAME)")
    with_set(se)
    with_code(se)
    se.set_defaults(fn=_search)

    m = sub.add_parser("models", help="list the packaged model aliases")
    m.set_defaults(fn=_models)
    return p


def _plain_warnings() -> None:
    """Library warnings reach the user as one plain line each (once), not as source paths and code lines."""
    import warnings

    seen = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().split("\n")[0]
        # a library's deprecation notes are for its callers (tunelab), not for the user: --debug shows them
        if text in seen or issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            return
        seen.add(text)
        print(f"tunelab: warning: {text}", file=sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import TunelabError

    if not args.debug:
        _plain_warnings()
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
