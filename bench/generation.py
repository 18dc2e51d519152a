"""Generation speed, side by side in one invocation: tunelab through each engine and each engine driven directly,
on the same prompts with the same forced token count (EOS banned, so every row writes prompts × max-new-tokens
tokens), one prompt at a time and all at once — and a large job (`--large-prompts` × enough tokens to reach
vllm.MIN_TOKENS, the size from which `auto` tries vLLM) on the fastest rows. Each row runs in its own process (its
peak RSS is its own), in `--repeats` rounds of alternating order (the large job: one round); the median run is
reported (the lower of two), all runs beside it.

Two speeds per row: tokens/s while generating (after load and a one-prompt warm-up), and the job's wall time
(`job_s`: from the row's start — what its process imports and loads, merge or engine start, warm-up — to its last
token), which is what a user waits for: an engine that writes faster but takes a minute to start loses a small job.
The prompts (rendered from the run's test split, and their token ids) are prepared once by the parent, so no row's
job includes the bench's own reading of the data; a tunelab row opens the run as `tunelab generate` does.

Rows: HF `generate` on the run as trained (adapter unmerged: tunelab's path before the engine layer) and on the
merged model, llama-cpp-python on the run's f16 GGUF, and `tunelab generate`'s engines (torch, llamacpp, auto)
through `tunelab.generation.choose` — so the difference between a tunelab row and its engine's direct row is what
tunelab adds.

The run: bench/llamacpp.py's short LoRA SFT of SmolLM2-135M-Instruct on the shipped EN→FR data (or --run RUN),
its test prompts rendered as training did.

    python bench/generation.py [--prompts 16] [--tokens 48] [--repeats 2] [--large-prompts 149] [--run RUN]
                                                                    → bench/results/generation.json
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, ROOT, emit, run_child, table, write  # noqa: E402

from tunelab.generation.vllm import MIN_TOKENS  # noqa: E402

ROWS = {  # name: (what, batch: "one" or "all")
    "hf-unmerged-all": ("HF generate, adapter unmerged (before)", "all"),
    "hf-merged-all": ("HF generate, adapter merged", "all"),
    "tunelab-torch-all": ("tunelab --engine torch", "all"),
    "vllm-all": ("vLLM LLM.generate, merged model", "all"),
    "tunelab-vllm-all": ("tunelab --engine vllm", "all"),
    "tunelab-auto-all": ("tunelab --engine auto", "all"),
    "hf-unmerged-one": ("HF generate, adapter unmerged (before)", "one"),
    "hf-merged-one": ("HF generate, adapter merged", "one"),
    "tunelab-torch-one": ("tunelab --engine torch", "one"),
    "llamacpp-one": ("llama-cpp-python, f16 GGUF", "one"),
    "tunelab-llamacpp-one": ("tunelab --engine llamacpp", "one"),
    "tunelab-auto-one": ("tunelab --engine auto", "one"),
    "hf-merged-large": ("HF generate, adapter merged", "large"),
    "vllm-large": ("vLLM LLM.generate, merged model", "large"),
    "tunelab-auto-large": ("tunelab --engine auto", "large"),
}
KINDS = {"one": "one prompt at a time", "all": "all at once", "large": "large job, all at once"}


def _prompts(run: Path, n: int) -> Path:
    """The run's first n test prompts, rendered as training did, and their token ids: written once by the parent
    (bench/.runs/), so a row's job is the command's own work, not the bench's reading of the test split."""
    from tunelab.gguf import held_out_conversations
    from tunelab.runs import load_run, open_finished
    from tunelab.tasks import TASKS

    path, config = open_finished(run)
    generator = load_run(path)
    prompts = [generator.render_conversation(c) for c in held_out_conversations(path, config, TASKS[config.task], n)]
    file = ROOT / "bench" / ".runs" / f"generation-prompts-{n}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    ids = [generator.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    file.write_text(json.dumps({"run": str(path.resolve()), "prompts": prompts, "ids": ids}))
    return file


def _measure(name: str, run: Path, n: int, tokens: int) -> dict:
    """Child side: from the row's start (what a user's process would import and load), warm up, then time."""
    job_start = time.perf_counter()
    from tunelab.generation.llamacpp import threads

    job = json.loads((ROOT / "bench" / ".runs" / f"generation-prompts-{n}.json").read_text())
    if job["run"] != str(run.resolve()):
        raise SystemExit(f"bench/.runs/generation-prompts-{n}.json holds another run's prompts")
    prompts, path = job["prompts"], run
    if ROWS.get(name, ("", ""))[1] == "large" and len(prompts) * tokens < MIN_TOKENS:
        return {"error": f"{len(prompts)} test prompts × {tokens} tokens is under vllm.MIN_TOKENS ({MIN_TOKENS:,})"}
    batch = 1 if ROWS.get(name, ("", ""))[1] == "one" else len(prompts)
    if name.startswith("llamacpp-"):  # llama-cpp-python on the f16 GGUF, fed the very token ids tunelab renders
        import llama_cpp

        from tunelab.generation.llamacpp import gguf_file

        llm = llama_cpp.Llama(model_path=str(gguf_file(path)), n_ctx=1024, n_threads=threads(), verbose=False, seed=0)
        eos, ids = {llm.token_eos(): float("-inf")}, dict(zip(prompts, job["ids"]))
        why = f"llama-cpp-python {llama_cpp.__version__}"

        def generate(ps):
            out = []
            for p in ps:
                llm.reset()
                out.append(llm.create_completion(ids[p], max_tokens=tokens, temperature=0.0, top_k=0, min_p=0.0,
                                                 repeat_penalty=1.0, logit_bias=eos)["choices"][0]["text"])
            return out
    else:
        from tunelab.runs import load_run

        generator = load_run(path)  # the run as `tunelab generate` opens it: its tokenizer now, its model lazily
    if name == "prepare-vllm":  # once before the rows: the merged folder and vLLM's parity record, so no row pays them
        from tunelab.generation import choose, missing

        if not missing("vllm"):
            choose("vllm", generator, path, len(prompts), tokens).close()
        return {"prepared": not missing("vllm")}
    if name.startswith("tunelab-"):
        from tunelab.generation import choose

        engine_name = name.split("-")[1]
        # auto is asked as `tunelab generate` asks: with the job's size (one prompt, or all of them)
        t_open = time.perf_counter()
        engine = choose(engine_name, generator, path, 1 if batch == 1 else len(prompts), tokens)
        ready = time.perf_counter() - t_open
        why = engine.why

        def generate(ps):
            out = []
            for i in range(0, len(ps), batch):  # one request at a time: each call is one prompt
                out += engine.generate(ps[i:i + batch], max_new_tokens=tokens, batch_size=batch, ignore_eos=True)
            return out
    elif name.startswith("hf-"):
        if "merged" in name and "unmerged" not in name:
            generator.model = generator.model.merge_and_unload().eval()
        why = f"HF generate ({generator.precision})"

        def generate(ps):
            return generator.generate(ps, max_new_tokens=tokens, batch_size=batch, ignore_eos=True)
    elif name.startswith("vllm-"):
        return _vllm_direct(path, generator, job["ids"], tokens)
    generate(prompts[:1])  # warm-up
    t0 = time.perf_counter()
    texts = generate(prompts)
    seconds = time.perf_counter() - t0
    job_s = time.perf_counter() - job_start
    written = len(prompts) * tokens
    # what came back, counted again (text → tokens: special tokens dropped, so a little under): an engine that
    # stopped early (it once did at the chat's end token) would report a speed it never had
    from tunelab.models.saved import load_tokenizer

    tokenizer = load_tokenizer(path / "model")
    counted = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    if counted < written / 2:
        return {"error": f"{why}: wrote about {counted} of the {written} tokens asked (stopped early)",
                "engine": why}
    out = {"engine": why, "prompts": len(prompts), "tokens": written, "tokens_counted": counted,
           "seconds": round(seconds, 2), "tokens_per_s": round(written / seconds, 1),
           "threads": threads(), "job_s": round(job_s, 1)}
    if name.startswith("tunelab-"):
        out["ready_s"] = round(ready, 1)
        if hasattr(engine, "close"):  # the engine's own process (vllm): its peak memory counts too
            engine.close()
            out["child_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return out


def _vllm_direct(path: Path, generator, ids: list[list[int]], tokens: int) -> dict:
    """vLLM's own LLM class on the run's merged folder, in the vLLM environment (bench/vllm_direct.py)."""
    import subprocess

    from tunelab.generation import missing
    from tunelab.generation import vllm as vllm_engine

    if missing("vllm"):
        return {"error": missing("vllm")}
    job = {"model": str(vllm_engine.folder(generator, path)), "tokens": tokens,
           "dtype": "bfloat16" if generator.precision == "bf16" else "float32",
           "ids": ids}
    started = time.perf_counter()  # the job: vLLM's own process, from its start to its exit
    done = subprocess.run([vllm_engine.python(), str(ROOT / "bench" / "vllm_direct.py"), json.dumps(job)],
                          capture_output=True, text=True)
    job_s = time.perf_counter() - started
    line = next((x for x in done.stdout.splitlines() if x.startswith("VLLM-DIRECT ")), None)
    if line is None:
        return {"error": f"exit {done.returncode}: {(done.stdout + done.stderr)[-400:]}"}
    return {**json.loads(line[len("VLLM-DIRECT "):]), "prompts": len(ids), "job_s": round(job_s, 1),
            "child_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def _median(runs: list[dict]) -> dict:
    """The run of median speed, with every run's tokens/s beside it (an errored run counts as none)."""
    ok = sorted((r for r in runs if r.get("tokens_per_s")), key=lambda r: r["tokens_per_s"])
    if not ok:
        return runs[-1]
    return {**ok[(len(ok) - 1) // 2], "runs_tokens_per_s": [r.get("tokens_per_s") for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--run", help="a finished generative run (default: bench/llamacpp.py's short run)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of every row (the median is reported)")
    ap.add_argument("--large-prompts", type=int, default=149, help="the large job's prompts (the run's test set)")
    ap.add_argument("--large-tokens", type=int, help="the large job's tokens each (default: to vllm.MIN_TOKENS)")
    ap.add_argument("--rows", help="comma-separated rows to measure again (the others' results are kept, and the "
                                   "file says which rows this invocation measured)")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        emit(_measure(args.only, Path(args.run), args.prompts, args.tokens))
        return
    if args.run:
        run = Path(args.run)
    else:
        from llamacpp import _run

        run = _run()
    from tunelab.generation.llamacpp import gguf_file

    if not gguf_file(run).is_file():  # made here, so that no row's time or memory includes the export
        import tunelab

        tunelab.export(run, "gguf", quant="f16")
    for n in {args.prompts, args.large_prompts}:  # the rows' prompts, prepared once here
        _prompts(run, n)
    large_tokens = args.large_tokens or -(-MIN_TOKENS // args.large_prompts)  # prompts × tokens ≥ MIN_TOKENS
    jobs = {"one": (args.prompts, args.tokens), "all": (args.prompts, args.tokens),
            "large": (args.large_prompts, large_tokens)}

    def row(name: str) -> dict:
        n, tokens = jobs[ROWS[name][1]]
        return run_child("generation.py", name, "--run", str(run), "--prompts", str(n), "--tokens", str(tokens))

    chosen = args.rows.split(",") if args.rows else list(ROWS)
    unknown = [n for n in chosen if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: no row {', '.join(unknown)}; the rows: {', '.join(ROWS)}")
    kept = {}
    if args.rows:  # the other rows as the last full invocation measured them, on the same job
        previous = json.loads((RESULTS / "generation.json").read_text())
        same = {"prompts": args.prompts, "max_new_tokens": args.tokens, "large_job": {
            "prompts": args.large_prompts, "max_new_tokens": large_tokens, "min_tokens": MIN_TOKENS}}
        if any(previous.get(k) != v for k, v in same.items()):
            raise SystemExit("--rows: bench/results/generation.json measured another job; run every row")
        from _common import machine

        here, there = machine(), previous.get("machine", {})
        if any(here.get(k) != there.get(k) for k in ("cpu", "cpus", "bf16_flags")):  # speeds of two hosts, one table
            raise SystemExit(f"--rows: bench/results/generation.json was measured on another machine "
                             f"({there.get('cpu')}, {there.get('cpus')} CPUs); run every row here")
        kept = {n: r for n, r in previous["results"].items() if n not in chosen}
    if any(n.startswith(("vllm-", "tunelab-vllm", "tunelab-auto")) for n in chosen):
        run_child("generation.py", "prepare-vllm", "--run", str(run), "--prompts", str(args.prompts))  # merged, parity
    rounds: dict = {name: [] for name in chosen}
    small = [n for n in chosen if ROWS[n][1] != "large"]
    for k in range(args.repeats):  # rounds in alternating order: a host's slow phase does not hit one row only
        for name in (small if k % 2 == 0 else small[::-1]):
            rounds[name].append(row(name))
    for name in chosen:
        if ROWS[name][1] == "large":  # minutes a row: one round
            rounds[name].append(row(name))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = {name: {**_median(runs), "measured_at": stamp} for name, runs in rounds.items()}
    results = {name: kept.get(name) or measured[name] for name in ROWS}
    before = {b: results[f"hf-unmerged-{b}"].get("tokens_per_s") for b in ("one", "all")}
    for name, r in results.items():
        if r.get("tokens_per_s") and before.get(ROWS[name][1]):
            r["vs_before"] = round(r["tokens_per_s"] / before[ROWS[name][1]], 2)
    ratios = {}
    for b in KINDS:  # tunelab auto against the best engine driven directly: by tokens/s, and by the job's wall time
        direct = [r for n, r in results.items() if ROWS[n][1] == b and not n.startswith("tunelab-")]
        auto = results[f"tunelab-auto-{b}"]
        best_tps = max((r.get("tokens_per_s") or 0 for r in direct), default=0)
        best_job = min((r["job_s"] for r in direct if r.get("job_s") and r.get("tokens_per_s")), default=None)
        ratios[b] = {"tokens_per_s": round((auto.get("tokens_per_s") or 0) / best_tps, 2) if best_tps else None,
                     "job_s": round(best_job / auto["job_s"], 2) if best_job and auto.get("job_s") else None,
                     "prompts": jobs[b][0], "tokens": jobs[b][1]}
    print(table([[f"{ROWS[n][0]}, {KINDS[ROWS[n][1]]}", r.get("tokens_per_s", r.get("error")), r.get("job_s", ""),
                  r.get("vs_before", ""), r.get("peak_rss_mb", ""), r.get("engine", "")] for n, r in results.items()],
                ["", "tokens/s", "job s", "× before", "peak RSS MB", "engine"]))
    for b, r in ratios.items():
        print(f"tunelab auto / fastest engine driven directly, {KINDS[b]} ({r['prompts']} × {r['tokens']} tokens): "
              f"{r['tokens_per_s']}× by tokens/s, {r['job_s']}× by the job's wall time")
    write("generation", {"run": str(run.relative_to(ROOT) if run.is_relative_to(ROOT) else run),
                         "prompts": args.prompts, "max_new_tokens": args.tokens, "repeats": args.repeats,
                         "large_job": {"prompts": args.large_prompts, "max_new_tokens": large_tokens,
                                       "min_tokens": MIN_TOKENS},
                         "rows": ROWS, "results": results, "auto_vs_fastest_direct": ratios})

if __name__ == "__main__":
    main()
