"""Load test of `tunelab serve`: N requests from C concurrent clients on loopback, with dynamic batching on and
off (max_batch 1), against a server process started here. Reports p50/p95 latency, requests/s and any 5xx,
and the throughput ratio batching / one-at-a-time. Writes bench/results/serve_load.json.

    python bench/serve_load.py                      # trains two small smollm2 LoRA runs + a minilm classifier
    python bench/serve_load.py --runs RUN_A RUN_B   # your generative runs (ids: their directory names)

The generative requests alternate between the runs (several adapters on one base) and ask for
--max-tokens greedy tokens of a review opening from the shipped data; --classify adds as many /v1/classify
requests of one review each to the classifier run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml
from _common import machine  # bench/ is on the path when this script runs

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src" / "tunelab" / "data" / "samples"
WORK = ROOT / "bench" / ".runs"


def _train_if_missing(name: str, cfg: dict) -> Path:
    import tunelab

    out = WORK / name
    if (out / "status.json").exists() and json.loads((out / "status.json").read_text()).get("state") == "completed":
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output": {"dir": str(out)}}))
    return tunelab.train(path, overwrite=True).path


def default_runs() -> tuple[list[Path], Path]:
    smol = {"model": {"name": "smollm2-135m", "max_length": 96}, "task": "sft", "method": {"name": "lora", "r": 8},
            "train": {"max_steps": 4, "batch_size": 8}, "eval": {"max_new_tokens": 4, "max_generate": 2,
                                                                  "forgetting": None}}
    french = _train_if_missing("french", {**smol, "data": {
        "train": "sample:translate_en_fr", "prompt": "en", "response": "fr", "instruction": "Translate into French.",
        "max_train_examples": 64, "split": {"validation": 0.01, "test": 0.01}}})
    chat = _train_if_missing("chat", {**smol, "data": {
        "train": "sample:chitchat", "bad_rows": "drop", "max_train_examples": 64,
        "split": {"validation": 0.01, "test": 0.01}}})
    sentiment = _train_if_missing("sentiment", {
        "model": {"name": "minilm", "max_length": 128}, "method": {"name": "lora", "r": 8},
        "data": {"train": "sample:sentiment_uci", "max_train_examples": 400}, "train": {"max_steps": 10}})
    return [french, chat], sentiment


def start_server(runs: list[Path], port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunelab.cli", "serve", *map(str, runs), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "1024"]
    log = WORK / f"server-{port}-batch{max_batch}.log"  # a file, not a pipe: nobody reads a pipe during the load
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd + ["--log-level", "warning"], stdout=sink, stderr=subprocess.STDOUT, text=True)
    from tunelab.serve import wait_until_healthy

    state = wait_until_healthy(proc, port, 300)
    if state != "ready":
        raise SystemExit(f"server {state} before it was ready:\n{log.read_text()}")
    return proc


def load(url: str, requests: list[tuple[str, dict]], concurrency: int) -> dict:
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as http:
        def one(req):
            path, body = req
            t = time.perf_counter()
            r = http.post(path, json=body)
            return time.perf_counter() - t, r.status_code
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, requests))
        wall = time.perf_counter() - start
    lat = sorted(x for x, _ in results)
    codes = [c for _, c in results]
    return {"requests": len(results), "wall_s": round(wall, 2), "requests_per_s": round(len(results) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p95_ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))], 1),
            "status_counts": {str(c): codes.count(c) for c in sorted(set(codes))},
            "errors_5xx": sum(c >= 500 for c in codes)}


def fairness(url: str, model: str, texts: list[str], big_requests: int = 3) -> dict:
    """A one-text classify request sent while `big_requests` of the largest allowed size are running: its latency
    next to its latency on an idle server; and how fast a 50 MB body is refused."""
    import threading

    chars = 100_000  # the longest text a request may hold (Limits.max_input_chars)
    per_request = (16 * 2**20 - 1024) // (chars + 4)  # as many as fit in the default 16 MiB body limit
    long_text = (" ".join(texts) * (chars // 1000 + 2))[:chars]
    big = {"model": model, "input": [long_text] * per_request}
    small = {"model": model, "input": texts[0]}
    with httpx.Client(base_url=url, timeout=600) as http:
        alone = []
        for _ in range(5):
            t = time.perf_counter()
            http.post("/v1/classify", json=small).raise_for_status()
            alone.append(time.perf_counter() - t)
        big_s = []

        def send_big():
            t = time.perf_counter()
            with httpx.Client(base_url=url, timeout=600) as own:
                own.post("/v1/classify", json=big).raise_for_status()
            big_s.append(time.perf_counter() - t)

        threads = [threading.Thread(target=send_big) for _ in range(big_requests)]
        for th in threads:
            th.start()
        time.sleep(2.0)  # the three bodies (16 MB each) are uploaded and their texts queued
        t = time.perf_counter()
        http.post("/v1/classify", json=small).raise_for_status()
        behind = time.perf_counter() - t
        for th in threads:
            th.join()
        body = b'{"model": "' + model.encode() + b'", "input": "' + b"x" * (50 * 2**20) + b'"}'
        t = time.perf_counter()
        status = http.post("/v1/classify", content=body, headers={"content-type": "application/json"}).status_code
        refused_s = time.perf_counter() - t
    own = statistics.median(alone)
    return {"texts_per_big_request": per_request, "chars_per_text": chars, "big_requests": big_requests,
            "big_request_s": [round(x, 2) for x in sorted(big_s)], "small_alone_s": round(own, 3),
            "small_behind_big_s": round(behind, 3), "small_wait_beyond_own_s": round(behind - own, 3),
            "body_50mb_status": status, "body_50mb_s": round(refused_s, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="*", help="generative run directories (default: train two small ones)")
    p.add_argument("--classifier", help="a classify run for /v1/classify requests (default: train one)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.runs:
        runs, classifier = [Path(r) for r in args.runs], Path(args.classifier) if args.classifier else None
    else:
        runs, classifier = default_runs()
    prompts = [json.loads(x)["prompt"] for x in (SAMPLES / "review_prompts.jsonl").read_text().split("\n")
               if x.strip()]
    reviews = [json.loads(x)["text"] for x in (SAMPLES / "sentiment_uci.jsonl").read_text().split("\n") if x.strip()]
    generate = [("/v1/completions", {"model": runs[i % len(runs)].name, "prompt": prompts[i % len(prompts)],
                                     "max_tokens": args.max_tokens, "temperature": 0})
                for i in range(args.requests)]
    classify = [("/v1/classify", {"model": classifier.name, "input": reviews[i % len(reviews)]})
                for i in range(args.requests)] if classifier else []
    served = runs + ([classifier] if classifier else [])
    results = {}
    for mode, max_batch in (("batched", args.max_batch), ("one_at_a_time", 1)):
        proc = start_server(served, args.port, max_batch)
        try:
            url = f"http://127.0.0.1:{args.port}"
            load(url, generate[:args.concurrency], args.concurrency)  # warm-up
            results[mode] = {"completions": load(url, generate, args.concurrency)}
            if classify:
                results[mode]["classify"] = load(url, classify, args.concurrency)
                if mode == "batched":
                    fair = fairness(url, classifier.name, reviews)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    ratio = {kind: round(results["batched"][kind]["requests_per_s"] / results["one_at_a_time"][kind]["requests_per_s"],
                         2) for kind in results["batched"]}
    print(f"\n{args.requests} requests per kind, {args.concurrency} concurrent clients, loopback; completions: "
          f"{args.max_tokens} greedy tokens, adapters {', '.join(r.name for r in runs)} on one base")
    print(f"{'kind':<12} {'mode':<14} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'5xx':>4}")
    for mode, kinds in results.items():
        for kind, r in kinds.items():
            print(f"{kind:<12} {mode:<14} {r['requests_per_s']:>7.2f} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} "
                  f"{r['errors_5xx']:>4}")
    for kind, x in ratio.items():
        print(f"batching / one-at-a-time throughput, {kind}: {x:.2f}×")
    if classify:
        print(f"a one-text classify request behind {fair['big_requests']} of {fair['texts_per_big_request']} texts × "
              f"{fair['chars_per_text']:,} characters: {fair['small_behind_big_s']:.2f} s (alone "
              f"{fair['small_alone_s']:.2f} s; the large ones took {fair['big_request_s']} s); a 50 MB body: "
              f"{fair['body_50mb_status']} in {fair['body_50mb_s']:.2f} s")
    out = ROOT / "bench" / "results" / "serve_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args) | {"runs": [str(r) for r in runs],
                                                         "classifier": str(classifier) if classifier else None},
                               "machine": machine(),
                               "results": results, "throughput_ratio": ratio,
                               "fairness": fair if classify else None}, indent=2))
    print(f"written: {out.relative_to(ROOT)}")
    return 1 if any(r["errors_5xx"] for kinds in results.values() for r in kinds.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
