"""Latency of `tunelab serve` under load — continuous batching, static batches, and vLLM's engine
(`--engine vllm`, where $TUNELAB_VLLM_PYTHON names its environment) — side by side in one invocation (a server
process per mode, started here, on loopback):

- a 2-token completion on an idle server, and sent while `--long` completions of `--long-tokens` tokens each
  (ignore_eos: every one writes all its tokens) are running — in static batches it waits for the whole batch;
- a streamed `--stream-tokens`-token completion whose client leaves after three chunks, then a 1-token request:
  how long until it is answered (static batches finish the abandoned request first);
- the long completions' own throughput (tokens/s over the `--long` of them), so the price of joining is visible.

Each measurement is taken `--repeats` times, modes alternating; the median is reported with all values.
The run: bench/serve_load.py's short LoRA SFT of SmolLM2-135M on the shipped EN→FR data (or --run RUN), served
alone (its adapter merged, as `tunelab serve` does for one adapter).

    python bench/serving.py [--long 8] [--long-tokens 200] [--stream-tokens 400] [--repeats 2] [--run RUN]
                                                                    → bench/results/serving.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, WORK, write  # noqa: E402

MODES = {"continuous": [], "static": ["--static-batches"], "vllm": ["--engine", "vllm"]}


def start(run: Path, port: int, mode: str) -> subprocess.Popen:
    from tunelab.serve import wait_until_healthy

    log = WORK / f"serving-{mode}.log"  # a file, not a pipe: nobody reads a pipe during the load
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", str(run), "--port", str(port),
                                 "--log-level", "warning", *MODES[mode]], stdout=sink, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    state = wait_until_healthy(proc, port, 600)
    if state != "ready":
        raise SystemExit(f"server {state} before it was ready:\n{log.read_text()}")
    return proc


def _complete(http: httpx.Client, body: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    r = http.post("/v1/completions", json=body)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()


def measure(url: str, model: str, prompts: list[str], args) -> dict:
    short = {"model": model, "prompt": prompts[0], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=900) as http:
        _complete(http, short)  # warm-up
        idle = statistics.median(_complete(http, short)[0] for _ in range(5))
        long_s, long_tokens = [], []

        def one_long(i: int) -> None:
            with httpx.Client(base_url=url, timeout=900) as own:
                s, body = _complete(own, {"model": model, "prompt": prompts[1 + i % (len(prompts) - 1)],
                                          "max_tokens": args.long_tokens, "temperature": 0, "ignore_eos": True})
            long_s.append(s)
            long_tokens.append(body["usage"]["completion_tokens"])

        started = time.perf_counter()
        threads = [threading.Thread(target=one_long, args=(i,)) for i in range(args.long)]
        for th in threads:
            th.start()
        time.sleep(args.settle)  # the long ones are prefilled and generating
        loaded, _ = _complete(http, short)
        for th in threads:
            th.join()
        long_wall = time.perf_counter() - started

        stream = {"model": model, "prompt": prompts[0], "max_tokens": args.stream_tokens, "temperature": 0,
                  "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=stream) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    break
        t = time.perf_counter()
        after, _ = _complete(http, {**short, "max_tokens": 1})
        after_gone = time.perf_counter() - t
    return {"idle_s": round(idle, 3), "loaded_s": round(loaded, 3), "loaded_over_idle": round(loaded / idle, 2),
            "long_tokens": sum(long_tokens), "long_wall_s": round(long_wall, 2),
            "long_tokens_per_s": round(sum(long_tokens) / long_wall, 1),
            "after_disconnect_s": round(after_gone, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a generative run (default: bench/serve_load.py's EN→FR LoRA run)")
    p.add_argument("--long", type=int, default=8, help="long completions running when the short one is sent")
    p.add_argument("--long-tokens", type=int, default=200)
    p.add_argument("--stream-tokens", type=int, default=400)
    p.add_argument("--settle", type=float, default=3.0, help="seconds between the long requests and the short")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--port", type=int, default=8766)
    args = p.parse_args()
    if args.run:
        run = Path(args.run)
    else:
        from serve_load import default_runs

        run = default_runs()[0][0]
    samples = ROOT / "src" / "tunelab" / "data" / "samples" / "translate_en_fr.jsonl"
    from tunelab import load

    gen = load(run)
    prompts = [gen.render(json.loads(x)["en"]) for x in samples.read_text().splitlines()[:9] if x.strip()]
    del gen
    from tunelab.generation import missing

    modes = [m for m in MODES if m != "vllm" or not missing("vllm")]  # vLLM where its environment is named
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            proc = start(run, args.port, mode)
            try:
                got = measure(f"http://127.0.0.1:{args.port}", run.name, prompts, args)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            print(f"{mode:<11} round {r + 1}: {got}", flush=True)
            runs[mode].append(got)
    results = {m: {k: statistics.median(x[k] for x in rs) for k in rs[0]} | {"runs": rs} for m, rs in runs.items()}
    print(f"\na 2-token completion with {args.long} × {args.long_tokens}-token completions running, and a 1-token "
          f"one after a client left a {args.stream_tokens}-token stream:")
    for mode, r in results.items():
        print(f"  {mode:<11} {r['loaded_s']:.2f} s ({r['loaded_over_idle']}× idle {r['idle_s']:.2f} s); after the "
              f"client left {r['after_disconnect_s']:.2f} s; the long ones {r['long_tokens_per_s']} tokens/s")
    path = write("serving", {"settings": vars(args) | {"run": str(run)}, "results": results})
    print(f"written: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
