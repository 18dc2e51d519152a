"""The `tunelab` command: a thin skin over the Python API (tunelab.train/load/validate/evaluate)."""
from __future__ import annotations

import argparse
import os
import sys

from . import commands

ALLOW_HOST_HELP = ("also answer requests whose Host header is NAME (repeatable; *.DOMAIN for its subdomains, * for "
                   "any, e.g. behind a proxy that checks it): by default only loopback names and the --host address "
                   "are answered, so a web page cannot reach the server through a domain it points at this machine")



def _whole(low: int, high: int | None = None, what: str = "a whole number"):
    """An argparse type: a whole number in [low, high], else argparse's one-line error (exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not {what} ({low}–{high})" if high is not None else
                                             f"{value} is under {low}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


PORT = _whole(1, 65535, "a TCP port")
COUNT = _whole(1)

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
    t.add_argument("--nproc", type=COUNT, default=1, metavar="N",
                   help="data-parallel training in N processes (torch.distributed.run; gloo on CPU, NCCL on GPU); "
                        "train.batch_size is per process")
    t.set_defaults(fn=commands.train)

    v = sub.add_parser("validate", help="check a config file without running it")
    v.add_argument("config")
    with_set(v)
    v.set_defaults(fn=commands.validate)

    e = sub.add_parser("eval", help="evaluate a finished run on a data file")
    e.add_argument("run", help="run directory (or a config file with --base)")
    e.add_argument("--data", help="file with the same text/label columns as the training data")
    e.add_argument("--base", action="store_true", help="generative tasks: test metrics of the config's untrained model "
                                                       "on its test split, for before/after comparisons")
    e.add_argument("--benchmark", action="append", default=[], metavar="TASKS",
                   help="lm-eval-harness tasks (comma-separated, repeatable): harness task names, task YAML files or "
                        "folders, or tunelab's own (tunelab_sentiment, tunelab_translate_de); the run and its base "
                        "model, compared per document")
    e.add_argument("--limit", help="--benchmark: documents per task (a whole number), or a share between 0 and 1")
    e.add_argument("--fewshot", type=_whole(0), help="--benchmark: solved examples before each question "
                                                     "(default: each task's own)")
    e.add_argument("--no-base", action="store_true", help="--benchmark: score the run only")
    e.add_argument("--json", action="store_true", help="--benchmark: print the results as JSON")
    with_set(e)
    with_code(e)
    e.set_defaults(fn=commands.eval)

    pr = sub.add_parser("predict", help="predict labels with a finished run")
    pr.add_argument("run")
    pr.add_argument("text", nargs="*")
    pr.add_argument("--input", help="file with one text per line")
    pr.add_argument("--json", action="store_true", help="one JSON object per line, with probabilities")
    pr.set_defaults(fn=commands.predict)

    sc = sub.add_parser("score", help="score responses to a prompt with a finished reward run (best first)")
    sc.add_argument("run")
    sc.add_argument("--prompt", required=True, help="the prompt the responses answer")
    sc.add_argument("response", nargs="+", help="responses to score")
    sc.set_defaults(fn=commands.score)

    d = sub.add_parser("data", help="look at a config's data as the model will see it")
    dsub = d.add_subparsers(dest="data_command", required=True)
    pv = dsub.add_parser("preview", help="render one sft example with its trained tokens marked")
    pv.add_argument("config")
    pv.add_argument("--index", type=_whole(0), default=0)
    pv.add_argument("--split", choices=["train", "validation", "test"], default="train")
    with_set(pv)
    pv.set_defaults(fn=commands.preview)
    dc = dsub.add_parser("check", help="sizes, label balance, token lengths, duplicates and train/eval leakage "
                                       "(exit status 1 when there is leakage)")
    dc.add_argument("config")
    dc.add_argument("--json", action="store_true")
    with_set(dc)
    dc.set_defaults(fn=commands.data_check)

    g = sub.add_parser("generate", help="generate text with a finished sft/dpo/rl run (or a config's base model)")
    g.add_argument("run", help="run directory, or a config file with --base")
    g.add_argument("--prompt", action="append", default=[], help="repeatable")
    g.add_argument("--input", help="batch: a .jsonl file with a `prompt` field per row (see --field), or a text "
                                   "file with one prompt per line; writes JSON lines")
    g.add_argument("--field", default="prompt", help="--input JSONL field holding the prompt (default: prompt)")
    g.add_argument("--batch-size", type=COUNT, default=16)
    g.add_argument("--base", action="store_true", help="RUN is a config: use its untrained model")
    g.add_argument("--max-new-tokens", type=COUNT, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--json", action="store_true")
    g.add_argument("--engine", default=None, choices=["auto", "torch", "llamacpp", "vllm"],
                   help="what generates (default: the run's generate.engine, auto): torch (HF generate; a single "
                        "adapter merged), llamacpp (the run's GGUF "
                        "export, made on first use), vllm (vLLM's engine in its own environment, "
                        "$TUNELAB_VLLM_PYTHON; the run merged on first use); auto picks the fastest for the job "
                        "among those whose parity with the trained model is on record, and says why (stderr)")
    with_set(g)
    g.set_defaults(fn=commands.generate)

    mg = sub.add_parser("merge", help="fold a LoRA run's adapter into a plain Hugging Face model folder")
    mg.add_argument("run")
    mg.add_argument("--out", help="output folder (default RUN/merged)")
    mg.set_defaults(fn=commands.merge)

    ex = sub.add_parser("export", help="export a finished run as a Hugging Face folder, ONNX or GGUF "
                                       "(parity-checked)")
    ex.add_argument("run")
    ex.add_argument("--format", choices=["hf", "onnx", "gguf"], default="hf")
    ex.add_argument("--quant", choices=["f16", "bf16", "q8_0", "q4_k_m"], default="f16",
                    help="gguf: the weight type (q4_k_m needs the [gguf] extra's quantizer)")
    ex.add_argument("--merge", action="store_true", help="hf: fold a LoRA-type adapter into the base weights")
    ex.add_argument("--out", help="output folder (default RUN/export-FORMAT)")
    ex.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the export folder to this Hugging Face "
                                                               "Hub model repository (huggingface_hub's token)")
    ex.add_argument("--private", action="store_true", help="--push-to-hub: create the repository private")
    ex.add_argument("--tolerance", type=float, help="largest allowed |logit difference| (default 1e-4 classifiers, "
                                                      "1e-3 language models)")
    ex.set_defaults(fn=commands.export)

    sv = sub.add_parser("serve", help="serve finished runs over an OpenAI-compatible HTTP API")
    sv.add_argument("runs", nargs="+", help="run directories; each is served as model <directory name>")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=PORT, default=8000)
    sv.add_argument("--api-key-file", metavar="FILE",
                    help="require `Authorization: Bearer KEY`, KEY being the first line of FILE (or set "
                         "TUNELAB_API_KEY); with a key, every route but /health needs it")
    sv.add_argument("--api-key", help="the key itself (visible to other users in the process list: prefer "
                                      "--api-key-file or TUNELAB_API_KEY)")
    sv.add_argument("--allow-public", action="store_true",
                    help="allow a non-loopback --host without an API key")
    sv.add_argument("--allow-host", action="append", default=[], metavar="NAME", help=ALLOW_HOST_HELP)
    sv.add_argument("--max-body-mb", type=float, default=16, help="largest request body (413 beyond it)")
    sv.add_argument("--max-batch", type=COUNT, default=16, help="requests run together in one pass (1: no batching)")
    sv.add_argument("--engine", default="torch", choices=["torch", "vllm"],
                    help="what generates: torch (continuous batching in this process; several adapters share one "
                         "base) or vllm (vLLM's engine in its own environment, $TUNELAB_VLLM_PYTHON; each run "
                         "merged and parity-checked on first use)")
    sv.add_argument("--static-batches", action="store_true",
                    help="generate in static batches (one `generate` call each) instead of continuous batching; "
                         "for comparison (bench/serving.py)")
    sv.add_argument("--batch-wait-ms", type=float, default=10.0, help="how long to collect a batch")
    sv.add_argument("--max-queue", type=COUNT, default=256, help="waiting requests per model before 503")
    sv.add_argument("--max-tokens", type=COUNT, default=512, help="largest max_tokens a request may ask for")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (info logs every request)")
    sv.set_defaults(fn=commands.serve)

    u = sub.add_parser("ui", help="a local web app: set up, start, watch, compare and try runs in the browser")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=PORT, default=7860)
    u.add_argument("--runs-dir", default="runs", help="the folder of runs it lists and starts jobs in")
    u.add_argument("--api-key-file", metavar="FILE", help="require the key on the first line of FILE (or set "
                                                          "TUNELAB_API_KEY); needed for a non-loopback --host")
    u.add_argument("--api-key", help="the key itself (visible in the process list: prefer --api-key-file)")
    u.add_argument("--max-upload-mb", type=float, default=50, help="largest data file sent from the browser")
    u.add_argument("--allow-host", action="append", default=[], metavar="NAME", help=ALLOW_HOST_HELP)
    u.set_defaults(fn=commands.ui)

    c = sub.add_parser("compare", help="run several methods on the same data and split; write report.md/.html")
    c.add_argument("config")
    c.add_argument("--methods", help="comma-separated, e.g. features,head,last_layers,full,lora,prompt,icl_0,icl_k,"
                                     "icl_retrieved (default: the config's compare.methods)")
    c.add_argument("--out", help="folder for the runs and the report (default: compare.dir or runs/compare-NAME)")
    c.add_argument("--rerun", action="store_true", help="train every method again, even those already run")
    with_set(c)
    with_code(c)
    c.set_defaults(fn=commands.compare)

    se = sub.add_parser("search", help="hyperparameter search (Optuna TPE + median pruning) over search.space")
    se.add_argument("config")
    se.add_argument("--trials", type=COUNT, help="trials in total (default: search.trials)")
    se.add_argument("--out", help="folder (default: search.dir or runs/search-NAME)")
    with_set(se)
    with_code(se)
    se.set_defaults(fn=commands.search)

    m = sub.add_parser("models", help="list the packaged model aliases")
    m.set_defaults(fn=commands.models)
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
    from .errors import TunelabError

    if argv is None:  # the console command: on jemalloc where the system has it (tunelab/allocator.py)
        from .allocator import use_jemalloc

        try:
            use_jemalloc()
        except TunelabError as exc:
            print(f"tunelab: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
