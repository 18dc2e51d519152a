"""Rewrite every generated block of docs/*.md (and README.md) from the files the code writes, so no number in the
docs is typed by hand.

    python scripts/docs_tables.py            (or: make docs)
    python scripts/docs_tables.py --check    exit 1 if a block is out of date (nothing written)

A block sits between `<!-- table:NAME -->` and `<!-- /table -->`; NAME is a renderer below, reading
docs/results/*.json (scripts/docs_results.py measures them) or bench/results/*.json (bench/run_all.py). A block
whose file does not exist yet says how to measure it.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS, BENCH = ROOT / "docs" / "results", ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- table:([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


class Missing(Exception):
    pass


def _load(path: Path) -> dict:
    if not path.exists():
        how = (f"python scripts/docs_results.py {path.stem}" if path.parent == RESULTS else "make bench")
        raise Missing(f"*Not measured yet: `{how}` writes `{path.relative_to(ROOT)}`, then `make docs`.*")
    record = json.loads(path.read_text())
    record["_file"] = str(path.relative_to(ROOT))
    return record


def _machine(record: dict) -> str:
    m = record.get("machine") or {}
    flags = ", ".join(m.get("cpu_flags") or m.get("bf16_flags") or []) or m.get("cpu") or m.get("processor") \
        or "CPU flags not recorded"
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    when = f"measured {record['measured_at']}, " if record.get("measured_at") else ""
    return f"({when}{m.get('cpus', '?')} CPU cores, {flags}{gpu}; from `{record.get('_file', '')}`)"


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join("–" if v is None else str(v) for v in r) + " |" for r in rows])


def _bytes(n) -> str:
    if n is None:
        return None
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def _f(v, digits=4):
    return None if v is None else f"{v:.{digits}f}"


def _params(p: dict) -> str:
    return f"{p['trainable']:,} ({p['percent']:.3g}%)"


# ------------------------------------------------------------------------------------------------ renderers

def _interval(g: dict, digits: int) -> str | None:
    return f"{g['interval'][0]:.{digits}f}–{g['interval'][1]:.{digits}f}" if g.get("interval") else None


def _compare_table(rec: dict, digits: int = 4, probe: bool = False) -> str:
    """One row per compare entry (its seeds pooled), from the analysis in the report's results.json."""
    sys.path.insert(0, str(ROOT / "src"))
    from tunelab.stats import p_text  # p at the resampling floor reads "p ≤ 0.002", as in the report
    analysis = rec["result"]["analysis"]
    name = {"f1_macro": "macro F1", "chrf": "chrF", "accuracy": "accuracy"}.get(analysis["metric"], analysis["metric"])
    rows = []
    for g in analysis["groups"]:
        if g["status"] != "ok":
            rows.append([f"`{g['name']}`", g["model"], "failed: " + (g.get("error") or "")[:80]] + [None] * 7)
            continue
        seeds = len(g["values"])
        value = f"{g['mean']:.{digits}f}" + (f" ± {g['std']:.{digits}f}" if seeds > 1 else "")
        vs = g.get("vs_best")
        verdict = "**best**" if g["name"] == analysis["best"] else None if not vs else \
            f"{'tied' if vs['tied'] else 'worse'}, {p_text(vs['p'])}"
        last = f"{g['probe']['accuracy']:.3f}" if probe and g.get("probe") else \
            f"×{g['forgetting']:.3f}" if g.get("forgetting") else None
        rows.append([f"`{g['name']}`", g["model"], value, _interval(g, digits), verdict, _params(g["params"]),
                     f"{g['train_s']:.0f} s" if g.get("train_s") is not None else None,
                     f"{g['inference_per_1000_s']:.1f} s" if g.get("inference_per_1000_s") else None,
                     f"{g['prompt_tokens']:.0f}" if g.get("prompt_tokens") else None, _bytes(g.get("stored")), last])
    seeds = max((len(g.get("values") or []) for g in analysis["groups"]), default=1)
    head = ["entry", "model", f"test {name}" + (f" (mean ± sd, {seeds} seeds)" if seeds > 1 else ""),
            "95% interval", f"vs best ({analysis['test']})", "trainable params", "train time", "per 1,000 requests",
            "prompt tokens", "stored", "earlier-task probe" if probe else "forgetting (ppl ×)"]
    return _table(head, rows)


def _runs_min(rec: dict) -> float:
    """Minutes of the compare's runs from scratch: the sum of their wall times (an invocation that reuses finished
    runs takes less)."""
    return sum(r.get("run_s") or 0 for r in rec["result"].get("rows", [])) / 60


def _took(rec: dict) -> str:
    res = rec["result"]
    n = len(res.get("rows", []))
    return (f"{n} runs, {_runs_min(rec):.0f} min from scratch (the sum of their wall times; this invocation of "
            f"`tunelab compare`, reusing finished runs, took {res['compare_wall_s'] / 60:.0f} min).")


def compare_sentiment() -> str:
    rec = _load(RESULTS / "compare-sentiment.json")
    return f"{_compare_table(rec, probe=True)}\n\n{_took(rec)} {_machine(rec)}"


def compare_sentiment_verdict() -> str:
    rec = _load(RESULTS / "compare-sentiment.json")
    return "\n".join(f"- {line}" for line in rec["result"]["recommendation"])


def compare_curves() -> str:
    rec = _load(RESULTS / "compare-sentiment-curves.json")
    analysis = rec["result"]["analysis"]
    curves = analysis["curves"]
    sizes = sorted({p["examples"] for points in curves.values() for p in points})
    rows = []
    for entry, points in curves.items():
        by = {p["examples"]: p for p in points}
        rows.append([f"`{entry}`"] + [f"{by[n]['mean']:.4f} ({_interval(by[n], 3)})" if n in by else None
                                      for n in sizes])
    table = _table(["entry"] + [f"{n:,} examples" for n in sizes], rows)
    said = [s for s in analysis["sentences"] if "overtakes" in s or "labelled examples (" in s or "do not cross" in s]
    image = "![learning curves](results/compare-sentiment-curves-learning_curves.png)"
    return "\n\n".join([table, "\n".join(f"- {s}" for s in said), image, f"{_took(rec)} {_machine(rec)}"])


def compare_translate_fr() -> str:
    rec = _load(RESULTS / "compare-translate-fr.json")
    rows = {r["name"]: r for r in rec["result"]["rows"]}
    dropped = [f"`{n}`: {d['examples_with_fewer_demonstrations']} of {d['examples']} test prompts lost "
               f"{d['demonstrations_dropped']} demonstration(s) to `model.max_length`"
               for n, r in rows.items() if (d := (r.get("test") or {}).get("demonstrations")) and d["shots"]]
    verdict = "\n".join(f"- {line}" for line in rec["result"]["recommendation"])
    return "\n\n".join([_compare_table(rec, digits=1), verdict, "Demonstrations that did not fit: "
                        + ("; ".join(dropped) or "none") + ".", f"{_took(rec)} {_machine(rec)}"])


def compare_translate_fr_engines() -> str:
    """Each entry's time to write its 149 test answers, and the whole run's, before the engine layer wrote them
    (docs/results/compare-translate-fr-before.json, tunelab at the commit it names) and now."""
    before, after = _load(RESULTS / "compare-translate-fr-before.json"), _load(RESULTS / "compare-translate-fr.json")
    old = {r["name"]: r for r in before["result"]["rows"]}
    rows, sums = [], [0.0, 0.0, 0.0, 0.0]
    for r in after["result"]["rows"]:
        o = old.get(r["name"], {})
        cells = [((o.get("test") or {}).get("inference") or {}).get("seconds"),
                 ((r.get("test") or {}).get("inference") or {}).get("seconds"), o.get("run_s"), r.get("run_s")]
        sums = [t + (c or 0) for t, c in zip(sums, cells)]
        rows.append([f"`{r['name']}`", ((r.get("test") or {}).get("inference") or {}).get("engine", "—")]
                    + [f"{c:.0f} s" if c is not None else "—" for c in cells])
    rows.append(["all", ""] + [f"**{t:.0f} s**" for t in sums])
    return "\n\n".join([
        _table(["entry", "engine now (`generate.engine: auto`)", "answers before", "answers now", "run before",
                "run now"], rows),
        f"Before: tunelab {before.get('commit', '?')}, {_machine(before)} Now: {_machine(after)}"])


def compare_translate_fr_verdict() -> str:
    """The README's verdict: which entries are tied with the best, and which trained entries beat prompting."""
    sys.path.insert(0, str(ROOT / "src"))
    from tunelab.stats import p_text

    rec = _load(RESULTS / "compare-translate-fr.json")
    analysis = rec["result"]["analysis"]
    ok = [g for g in analysis["groups"] if g["status"] == "ok"]
    best = next(g for g in ok if g["name"] == analysis["best"])
    tied = [g["name"] for g in ok if (g.get("vs_best") or {}).get("tied")]
    text = (f"On the shipped EN→FR strings (`examples/compare-translate-fr.yaml`, SmolLM2-135M, 150 test strings; "
            f"{_runs_min(rec):.0f} min from scratch on {rec['machine']['cpus']} CPU cores), "
            f"**{best['name']}** has the best chrF, {best['mean']:.1f} (95% interval {_interval(best, 1)}); "
            + (f"statistically tied with it: {', '.join(f'**{t}**' for t in tied)}. " if tied else
               "every other entry is worse (paired permutation test, p < 0.05). "))
    prompting = next((g for g in ok if g["name"] == analysis.get("prompting")), None)
    versus = [g for g in ok if g.get("vs_prompting")]
    if prompting and versus:
        def word(v):
            return "within noise" if v["tied"] else "better" if v["difference"] > 0 else "worse"

        text += (f"Against prompting without training — **{prompting['name']}**, {prompting['mean']:.1f} — "
                 + "; ".join(f"{g['name']} {g['vs_prompting']['difference']:+.1f} ({word(g['vs_prompting'])}, "
                             f"{p_text(g['vs_prompting']['p'])})" for g in versus) + ". ")
    return text + _machine(rec)


def compare_sentiment_templates() -> str:
    rec = _load(RESULTS / "compare-sentiment.json")
    rows = []
    for r in rec["result"]["rows"]:
        for template, m in (r.get("templates") or {}).items():
            rows.append([f"`{r['name']}`", "`" + template.replace("\n", "\\n") + "`", _f(m["accuracy"]),
                         _f(m["f1_macro"])])
    return _table(["entry", "template", "val accuracy", "val macro F1"], rows) + f"\n\n{_machine(rec)}"


def translate_fr() -> str:
    rec = _load(RESULTS / "translate-fr.json")
    base, lora = rec["result"]["base"], rec["result"]["lora"]
    m = lora["metrics"]
    rows = [["SmolLM2-135M-Instruct, zero-shot (same prompt)", _f(base.get("chrf"), 1), _f(base.get("bleu"), 1),
             _f(base.get("rouge_l"), 3), _f(base.get("exact_match"), 3)],
            [f"+ LoRA ({_params(m['params'])} trainable), {m['train']['runtime_s']:.0f} s of training",
             _f(m["test"].get("chrf"), 1), _f(m["test"].get("bleu"), 1), _f(m["test"].get("rouge_l"), 3),
             _f(m["test"].get("exact_match"), 3)]]
    return _table(["model", "chrF", "BLEU", "ROUGE-L", "exact match"], rows) + f"\n\n{_machine(rec)}"


def benchmarks() -> str:
    rec = _load(RESULTS / "benchmarks.json")
    res, rows = rec["result"], []
    for task, t in res["results"].items():
        for metric, r in t["metrics"].items():
            low, high = r.get("interval") or (None, None)
            verdict = ("tied" if r["tied"] else "better" if (r["difference"] > 0) == r.get("higher_is_better", True)
                       else "worse") if "tied" in r else r.get("paired")
            rows.append([f"`{task}`", metric, t["documents"], _f(r.get("base"), 3), _f(r["run"], 3),
                         f"{r['difference']:+.3f}" if "difference" in r else None,
                         f"{low:+.3f} to {high:+.3f}" if low is not None else None,
                         f"{r['p']:.2g}" if "p" in r else None, verdict])
    took = f"First call {res['first_wall_s']:.0f} s (both models, both tasks), again {res['cached_wall_s']:.0f} s " \
        f"(read from the caches)."
    return _table(["task", "metric", "documents", "base", "run", "difference", "95% interval", "p", "verdict"],
                  rows) + f"\n\n{took} {_machine(rec)}"


def peft_methods() -> str:
    rec = _load(RESULTS / "peft-methods.json")
    res = rec["result"]
    rows = [["none (zero-shot)", 0, None, None, _f(res["base"].get("chrf"), 1), _f(res["base"].get("bleu"), 1)]]
    for name, r in res.items():
        if name == "base":
            continue
        m = r["metrics"]
        rows.append([f"`{name}`", f"{m['params']['trainable']:,}", f"{m['train']['runtime_s']:.0f} s",
                     _f((m.get("validation") or {}).get("loss"), 2), _f(m["test"].get("chrf"), 1),
                     _f(m["test"].get("bleu"), 1)])
    return _table(["method", "trainable", "train time", "val loss", "chrF", "BLEU"], rows) + f"\n\n{_machine(rec)}"


def forgetting() -> str:
    rec = _load(RESULTS / "forgetting.json")
    rows = []
    for name, r in rec["result"].items():
        m = r["metrics"]
        f = m.get("forgetting") or {}
        rows.append([f"`{name}`", m["train"]["steps"], _f(m["test"].get("exact_match"), 2),
                     _f(f.get("base_perplexity"), 2), _f(f.get("perplexity"), 2), _f(f.get("ratio"), 3)])
    return _table(["run", "steps", "test exact match", "perplexity before", "perplexity after", "ratio"], rows) + \
        f"\n\n{_machine(rec)}"


def preferences() -> str:
    rec = _load(RESULTS / "preferences.json")
    res = rec["result"]
    rows = []
    for name in ("reward-reviews", "reward-chat-rankings"):
        t = res[name]["metrics"]["test"]
        rows.append([f"`{name}`", f"pairwise accuracy {_f(t['accuracy'], 3)} on {t['pairs']} test pairs, mean margin "
                     f"{_f(t['margin'], 2)}", f"{res[name]['metrics']['train']['runtime_s']:.0f} s"])
    d = res["dpo-reviews"]["metrics"]
    t = d["test"]
    rows.append(["`dpo-reviews`", f"on {t['pairs']} test pairs: log π(chosen) − log π(rejected) "
                 f"{_f(t['base_logp_margin'], 1)} → {_f(t['logp_margin'], 1)}; chosen preferred "
                 f"{t['base_preference_accuracy']:.1%} → {t['preference_accuracy']:.1%}; DPO reward accuracy "
                 f"{t['reward_accuracy']:.1%}; forgetting ×{_f((d.get('forgetting') or {}).get('ratio'), 3)}",
                 f"{d['train']['runtime_s']:.0f} s"])
    r = res["rl-positive-reviews"]["metrics"]
    h = r["held_out"]
    rows.append(["`rl-positive-reviews`", f"on {h['prompts']} held-out prompts × {h['samples_per_prompt']}: mean "
                 f"reward {_f(h['base_reward'], 3)} → {_f(h['tuned_reward'], 3)}; KL(tuned ‖ base) {h['kl']:.1f} nats "
                 f"per completion; forgetting ×{_f((r.get('forgetting') or {}).get('ratio'), 3)}",
                 f"{r['train']['runtime_s']:.0f} s"])
    table = _table(["run", "result", "train time"], rows)
    samples = _table(["prompt", "base (reward)", "tuned (reward)"], [
        [s["prompt"], f"{s['base']} ({s['base_reward']:.2f})", f"{s['tuned']} ({s['tuned_reward']:.2f})"]
        for s in res.get("rl-samples", [])[:3]])
    return f"{table}\n\nSamples of the RL policy (from its `samples.jsonl`):\n\n{samples}\n\n{_machine(rec)}"


def export_onnx() -> str:
    rec = _load(RESULTS / "export-onnx.json")
    rows = [[f"`{name}`", f"{r['max_abs_diff']:.1e}", f"{1000 * r['torch_eager_s']:.0f} ms",
             f"{1000 * r['onnxruntime_s']:.0f} ms", f"{r['speedup']:.2f}×"] for name, r in rec["result"].items()]
    return _table(["run", "max |logit diff| vs PyTorch", "PyTorch eager", "onnxruntime", "speed-up"], rows) + \
        f"\n\n{_machine(rec)}"


def serve_load() -> str:
    rec = _load(BENCH / "serve_load.json")
    rows = [[kind, mode, r["requests_per_s"], f"{r['p50_ms']:.0f} ms", f"{r['p95_ms']:.0f} ms", r["errors_5xx"]]
            for mode, kinds in rec["results"].items() for kind, r in kinds.items()]
    ratio = "; ".join(f"{k} {v}×" for k, v in rec["throughput_ratio"].items())
    out = _table(["kind", "mode", "requests/s", "p50", "p95", "5xx"], rows) + \
        f"\n\nBatching / one at a time, throughput: {ratio}."
    fair = rec.get("fairness")
    if fair:
        out += (f" A one-text classify request sent while {fair['big_requests']} requests of "
                f"{fair['texts_per_big_request']} texts × {fair['chars_per_text']:,} characters were running was "
                f"answered in {fair['small_behind_big_s']} s ({fair['small_alone_s']} s alone; the large ones took "
                f"{max(fair['big_request_s'])} s); a 50 MB body got {fair['body_50mb_status']} in "
                f"{fair['body_50mb_s']} s.")
    return out + f"\n\n{_machine(rec)}"


def range_verdict(ours: dict | None, theirs: dict | None, whose: str) -> str:
    """Lower / higher than the other side's in every run, or tied: from the runs' ranges (`min`, `max`), not the
    medians — two sets of runs whose ranges overlap are not told apart."""
    if not ours or not theirs:
        return "not measured"
    if ours["max"] < theirs["min"]:
        return f"lower than {whose} in every run"
    if ours["min"] > theirs["max"]:
        return f"higher than {whose} in every run"
    return f"tied with {whose} (the runs' ranges overlap)"


def peers() -> str:
    rec = _load(BENCH / "peers.json")
    st, summary = rec["settings"], rec["summary"]

    def cell(side, key):
        v = summary.get(side, {}).get(key)
        return None if v is None else (f"{v['median']}" if v["min"] == v["max"] else
                                       f"{v['median']} ({v['min']}–{v['max']})")

    rows = [[name, cell(side, "tokens_per_s"), cell(side, "train_s"), cell(side, "train_phase_rss_mb"),
             cell(side, "peak_rss_mb"), cell(side, "wall_s")]
            for side, name in (("tunelab", "tunelab"), ("tunelab+checkpointing", "tunelab, gradient checkpointing"),
                               ("llamafactory", "LLaMA-Factory 0.9.5 (checkpoints activations by default)"))
            if side in summary]
    r, rc = rec["ratios"], rec.get("ratios_checkpointing")
    runs = st["repeats"]

    def by_phase_of(side: str) -> str | None:
        phases = [run["phases_rss_mb"] for run in rec["runs"].get(side, []) if run.get("phases_rss_mb")]
        return ", ".join(f"{k} {statistics.median(p.get(k, 0) for p in phases):,.0f}" for k in phases[0]) \
            if phases else None

    by_phase, by_phase_checkpointing = by_phase_of("tunelab"), by_phase_of("tunelab+checkpointing")
    validation = [run["validation_s"] for run in rec["runs"].get("tunelab", []) if run.get("validation_s")]

    def verdict(key: str) -> str:
        return range_verdict(summary.get("tunelab", {}).get(key), summary.get("llamafactory", {}).get(key),
                             "LLaMA-Factory's")

    verdicts = (f"By default, tunelab's whole-process peak RSS: {verdict('peak_rss_mb')}; "
                f"its real tokens/s: {verdict('tokens_per_s')}.")
    allocators = sorted({run["allocator"] for side_runs in rec["runs"].values() for run in side_runs
                         if run.get("allocator")})
    return (_table([f"LoRA SFT, {st['steps']} steps" + (f", median (min–max) of {runs} runs" if runs > 1 else
                                                       ", one run"), "real tokens/s", "train s",
                    "training-phase peak RSS MB", "whole-process peak RSS MB", "wall s"], rows)
            + f"\n\ntunelab / LLaMA-Factory: real tokens/s {r['tokens_per_s']}×, whole-process peak RSS "
              f"{r['peak_rss']}×, training-phase peak RSS {r['train_phase_rss']}× "
              f"({'bf16' if st['bf16'] else 'fp32: this CPU has no fast bf16'})."
            + (f" With gradient checkpointing: real tokens/s {rc['tokens_per_s']}×, whole-process peak RSS "
               f"{rc['peak_rss']}×, training-phase peak RSS {rc['train_phase_rss']}×." if rc else "")
            + (f" tunelab's peak RSS by phase (MB, median): {by_phase}." if by_phase else "")
            + (f" With gradient checkpointing: {by_phase_checkpointing}." if by_phase_checkpointing else "")
            + (f" tunelab's allocator: {', '.join(allocators)}." if allocators else "")
            + (f" tunelab's validation pass at the end of training, left out of its tokens/s (within its train s): "
               f"{statistics.median(validation):.1f} s (median)." if validation else "")
            + f" {verdicts}"
            + f"\n\n{_machine(rec)}")


def bench_summary() -> str:
    rec = _load(BENCH / "summary.json")
    return _table(["measure", "target", "measured"], rec["rows"]) + f"\n\n{_machine(rec)}"


def config_fields() -> str:
    """Every config key with its type, default and documentation, from the typed config itself."""
    sys.path.insert(0, str(ROOT / "src"))
    from tunelab.config import Config

    rows = []

    def walk(model, prefix: str):
        from pydantic import BaseModel

        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
            section = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
            key = f"{prefix}{name}"
            if section is not None and name not in ("method",):
                walk(section, key + ".")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            doc = (field.description or "").replace("\n", " ").replace("|", "\\|")
            rows.append([f"`{key}`", f"`{default}`", doc])

    walk(Config, "")
    return _table(["key", "default", "what it does"], rows)

def gguf_speed() -> str:
    rec = _load(BENCH / "llamacpp.json")
    rows = [[name, r["tokens_per_s"], f"{r['vs_tunelab_single']}×", r.get("file_mb"),
             f"{r['parity_identical']:.0%}" if "parity_identical" in r else None,
             f"{r['perplexity_ratio']:.4f}" if "perplexity_ratio" in r else None]
            for name, r in rec["results"].items()]
    return (_table([f"greedy generation, {rec['prompts']} test prompts, ≤ {rec['max_new_tokens']} new tokens",
                    "tokens/s", "× tunelab one at a time", "GGUF MB", "identical answers", "perplexity ratio"],
                   rows) + f"\n\nllama-cpp-python {rec['llama_cpp_python']}, {rec['threads']} threads on both "
                           f"sides. {_machine(rec)}")


def generation_engines() -> str:
    rec = _load(BENCH / "generation.json")
    kinds = {"one": "one prompt at a time", "all": "all at once", "large": "large job"}

    def memory(r: dict):  # an engine in a process of its own (vLLM): that process's peak beside this one's
        child = r.get("child_peak_rss_mb")
        return f"{r.get('peak_rss_mb')} + {child} (vLLM's process)" if child else r.get("peak_rss_mb")
    rows = [[f"{what}, {kinds[batch]}", r.get("tokens_per_s", r.get("error")), r.get("job_s"),
             f"{r['vs_before']}×" if r.get("vs_before") else None, memory(r), r.get("ready_s"), r.get("engine")]
            for name, (what, batch) in rec["rows"].items() for r in [rec["results"].get(name, {})]]
    a = rec["auto_vs_fastest_direct"]
    if not isinstance(a.get("one"), dict):  # a result written before job times were measured
        a = {b: {"tokens_per_s": v, "job_s": None} for b, v in a.items()}
    large = rec.get("large_job")
    size = (f"; the large job: {large['prompts']} prompts × {large['max_new_tokens']} tokens, the size from which "
            f"`auto` tries vLLM (vllm.MIN_TOKENS = {large['min_tokens']:,})" if large else "")
    said = "; ".join(f"{kinds[b]}: {r['tokens_per_s']}× by tokens/s once started"
                     + (f", {r['job_s']}× by the job's wall time" if r.get("job_s") else "") for b, r in a.items())
    return (_table([f"{rec['prompts']} test prompts × {rec['max_new_tokens']} forced tokens{size}", "tokens/s",
                    "job s", "× before (unmerged HF)", "peak RSS MB", "ready s", "engine"], rows)
            + f"\n\n`tunelab generate --engine auto` against the fastest engine driven directly — {said}. The job's "
              f"wall time runs from the row's start in its own process (what it imports and loads, merge or engine "
              f"start, a one-prompt warm-up; the prompts are prepared beforehand) to its last token: what a user "
              f"waits for. {_machine(rec)}")


def serving() -> str:
    rec = _load(BENCH / "serving.json")
    st, res = rec["settings"], rec["results"]

    def cell(r: dict, key: str, unit: str = " s", digits: int = 2) -> str:
        return f"{r[key]:.{digits}f}{unit} ({', '.join(f'{x[key]:.{digits}f}' for x in r['runs'])})"
    names = {"continuous": "continuous (torch)", "static": "static batches (torch)", "vllm": "vLLM's engine"}
    rows = [[names.get(mode, mode), cell(r, "idle_s"), cell(r, "loaded_s"), cell(r, "loaded_over_idle", "×", 1),
             cell(r, "after_disconnect_s"), cell(r, "long_tokens_per_s", "", 1)] for mode, r in res.items()]
    return (_table(["generation", "2-token completion, idle", f"… with {st['long']} × {st['long_tokens']}-token "
                    "completions running", "loaded / idle", f"1-token completion after a client left a "
                    f"{st['stream_tokens']}-token stream", f"the {st['long']} long ones, tokens/s"], rows)
            + f"\n\nMedians of {st['repeats']} runs per mode (each run in brackets), modes alternating. "
              f"{_machine(rec)}")


def engine_speed() -> str:
    """The README's line: tunelab's generation against its old path, one prompt and all at once, and the server."""
    gen, srv = _load(BENCH / "generation.json"), _load(BENCH / "serving.json")
    r = gen["results"]

    def best(batch: str) -> tuple[str, dict]:
        name = max((n for n in r if n.startswith("tunelab-") and n.endswith(batch) and r[n].get("tokens_per_s")),
                   key=lambda n: r[n]["tokens_per_s"])
        return name.split("-")[1], r[name]
    one, all_ = best("one"), best("all")
    c, st = srv["results"]["continuous"], srv["results"]["static"]
    return (f"Answers at engine speed: one prompt at a time, tunelab's `{one[0]}` engine writes "
            f"{one[1]['tokens_per_s']} tokens/s, {one[1]['vs_before']}× Hugging Face `generate` on the run as "
            f"trained; {gen['prompts']} prompts at once, `{all_[0]}` writes {all_[1]['tokens_per_s']}, "
            f"{all_[1]['vs_before']}×. Serving, a 2-token request sent while {srv['settings']['long']} long ones "
            f"run answers in {c['loaded_s']:.2f} s ({c['loaded_over_idle']:.1f}× its idle latency; "
            f"{st['loaded_s']:.1f} s in static batches). " + (
                f"{_machine(gen)[:-1]} and `bench/results/serving.json`)" if gen.get("machine") == srv.get("machine")
                else f"Generation {_machine(gen)}; serving {_machine(srv)}."))


def chat_turns() -> str:
    rec = _load(BENCH / "chat_turns.json")
    r = rec["results"]
    before, after = r["per_turn"], r["one_pass"]
    return (f"On the shipped chit-chat (`{rec['config']}`, {after['examples_per_epoch']} conversations), one pass "
            f"trains the same {after['trained_tokens_per_epoch']:,} answer tokens from {after['tokens_per_epoch']:,} "
            f"tokens per epoch instead of {before['tokens_per_epoch']:,} in {before['examples_per_epoch']:,} "
            f"per-turn examples: {after['tokens_per_s']} real tokens/s (before: {before['tokens_per_s']}), so an epoch "
            f"takes about {after['epoch_s_projected']:.0f} s instead of {before['epoch_s_projected']:.0f} s — "
            f"{rec['epoch_speedup']}× faster. {_machine(rec)}")


def compile_break_even() -> str:
    rec = _load(BENCH / "compile.json")
    rows = [[side, r.get("step_s", [None])[0], r.get("steady_step_s"),
             r.get("compile_overhead_s") if r.get("compiled") else None, r.get("break_even_steps"),
             r.get("peak_rss_mb")]
            for side, r in rec["results"].items()]
    b = rec["break_even_steps"]
    return (_table([f"LoRA SFT job of bench/peers.py, {rec['settings']['steps']} steps", "first step s",
                    "steady step s", "compile overhead s", "break-even steps", "peak RSS MB"], rows)
            + f"\n\nCompiled blocks: {rec['steady_speedup']}× per step; compiling pays back after {b['cold']} steps "
              f"with an empty Inductor cache, {b['warm']} with a filled one. {_machine(rec)}")


def ceiling() -> str:
    rec = _load(BENCH / "ceiling.json")
    s, c, g, sh, pk = rec["step"], rec["ceilings"], rec["gemm"], rec["shares"], rec["bf16_peak_gflops"]
    names = {"gemm_and_attention_in_step": "only its GEMMs and attention, as timed in the step",
             "gemm_in_step": "only its GEMMs, as timed in the step",
             "gemm_isolated": "only its GEMMs, each shape at its best rate alone"}
    rows = [["the step as it runs", s["step_s"], s["tokens_per_s"], f"{100 * s['mfu']:.1f}%"]] + [
        [names[k], c[k]["step_s"], c[k]["tokens_per_s"], f"{100 * c[k]['mfu']:.1f}%"] for k in names]
    st = rec["settings"]
    return (_table([f"sft LoRA step, {st['batch']} × {st['seq']}, if it took", "step s", "real tokens/s", "MFU"], rows)
            + f"\n\nThe step's {g['calls_per_step']} GEMM calls ({g['shapes']} shapes, {g['gflop_per_step']} GFLOP) "
              f"take {100 * sh['gemm']:.0f}% of it and run at {g['in_step_gflops']} GFLOP/s (profiled); alone, the "
              f"same shapes run at {g['isolated_gflops']} GFLOP/s. The attention kernel takes "
              f"{100 * sh['attention']:.0f}%, "
              f"everything else {100 * sh['other']:.0f}%. MFU against the 2048² bf16 matmul peak measured before "
              f"and after ({pk['before']} and {pk['after']} GFLOP/s; the higher is used). "
              f"A step of only its GEMMs as they run in it would be "
              f"{'below' if c['gemm_in_step']['mfu'] < 0.35 else 'at or above'} 35% MFU; at their rates alone, "
              f"{'below' if c['gemm_isolated']['mfu'] < 0.35 else 'at or above'}. {_machine(rec)}")


def dropout() -> str:
    rec = _load(BENCH / "dropout.json")
    rows = [[targets, side, r["step_s"], " / ".join(map(str, r["runs"]))]
            for targets, sides in rec["results"].items() for side, r in sides.items()]
    return (_table(["LoRA targets (bench/sft.py job, 4 × 256)", "dropout", "median step s", "runs (alternating)"],
                   rows) + f"\n\n{_machine(rec)}")


RENDERERS = {"compare-sentiment": compare_sentiment, "compare-sentiment-verdict": compare_sentiment_verdict,
             "compare-curves": compare_curves, "compare-translate-fr": compare_translate_fr,
             "compare-translate-fr-verdict": compare_translate_fr_verdict,
             "compare-translate-fr-engines": compare_translate_fr_engines,
             "compare-sentiment-templates": compare_sentiment_templates, "translate-fr": translate_fr,
             "peft-methods": peft_methods, "benchmarks": benchmarks, "forgetting": forgetting,
             "preferences": preferences,
             "export-onnx": export_onnx, "serve-load": serve_load, "serving": serving, "engine-speed": engine_speed,
             "bench-summary": bench_summary, "peers": peers,
             "gguf-speed": gguf_speed, "generation-engines": generation_engines, "chat-turns": chat_turns,
             "compile": compile_break_even,
             "ceiling": ceiling, "dropout": dropout,
             "config-fields": config_fields}


def render(name: str) -> str:
    try:
        return RENDERERS[name]()
    except Missing as exc:
        return str(exc)


def main(check: bool) -> int:
    stale = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()

        unknown = [name for name in BLOCK.findall(text) if name[1] not in RENDERERS]
        if unknown:
            raise SystemExit(f"{page.relative_to(ROOT)}: no renderer for table `{unknown[0][1]}`")
        new = BLOCK.sub(lambda m: f"{m.group(1)}{render(m.group(2))}\n{m.group(4)}", text)
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
            if not check:
                page.write_text(new)
    print(("out of date: " if check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
