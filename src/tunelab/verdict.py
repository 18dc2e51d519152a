"""The verdict of a comparison, drawn from the numbers and from the per-example predictions each run saved
(predictions_test.jsonl): which entry is best, by how much, whether the difference is real (tunelab/stats.py),
what each costs to train and to run, when a fine-tune pays back its training against prompting, and — with
compare.fractions — whether more labelled data would change the answer.

Every sentence is generated from these numbers, and none claims a difference the paired test does not support:
entries within noise of the best are called tied.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import jsonl, stats

METRIC_NAMES = {"accuracy": "accuracy", "f1_macro": "macro F1", "precision_macro": "macro precision",
                "recall_macro": "macro recall", "loss": "loss", "perplexity": "perplexity", "chrf": "chrF",
                "bleu": "BLEU", "rouge_l": "ROUGE-L", "exact_match": "exact match"}


def primary_metric(rows: list[dict]) -> tuple[str, bool]:
    """The metric the report ranks by: the config's classification metric, else chrF when every generative run has
    it, else perplexity. Returns (key, higher_is_better)."""
    done = [r for r in rows if r["status"] != "failed"]
    if not done:
        return "accuracy", True
    if done[0]["task"] == "classify":
        key = done[0]["metric"] if done[0]["metric"] != "loss" else "f1_macro"
        return key, True
    if all("chrf" in r["test"] for r in done):
        return "chrf", True
    return "perplexity", False


def predictions(run_dir: Path) -> tuple[list, list] | None:
    """(references, predictions) of a run's test split, from its predictions_test.jsonl; None without one."""
    path = Path(run_dir) / "predictions_test.jsonl"
    if not path.exists():
        return None
    rows = jsonl.read(path)
    if rows and "predicted" in rows[0]:
        return [str(r["label"]) for r in rows], [str(r["predicted"]) for r in rows]
    if rows and "generated" in rows[0]:
        return [r["reference"] for r in rows], [r["generated"] for r in rows]
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _group(runs: list[dict], key: str, labels) -> dict:
    """One compare entry across its seeds: mean ± std, the 95% interval, costs."""
    done = [r for r in runs if r["status"] != "failed" and (r.get("test") or {}).get(key) is not None]
    first = runs[0]
    group = {"name": first["entry"], "model": first["model"], "method": first["method"],
             "runs": [r["name"] for r in runs], "seeds": [r.get("seed") for r in runs]}
    if not done:
        return {**group, "status": "failed", "error": next((r["error"] for r in runs if r.get("error")), None)}
    mean, std = _mean_std([r["test"][key] for r in done])
    preds = [predictions(r["run_dir"]) for r in done]
    group.update(status="ok", values=[r["test"][key] for r in done], mean=mean, std=std, params=done[0]["params"],
                 train_s=_avg([r.get("train_s") for r in done]),
                 peak_rss_mb=max(r.get("peak_rss_mb") or 0 for r in done),
                 stored=done[0].get("stored"), examples=done[0].get("n_train"),
                 inference_per_1000_s=_avg([((r["test"].get("inference") or {}).get("per_1000_s")) for r in done]),
                 prompt_tokens=_avg([((r["test"].get("inference") or {}).get("prompt_tokens")) for r in done]),
                 engine=", ".join(dict.fromkeys(e for r in done if (e := (r["test"].get("inference") or {})
                                                                      .get("engine")))) or None,
                 forgetting=_avg([r.get("forgetting") for r in done]), benchmarks=done[0].get("benchmarks"),
                 probe=done[0].get("probe"), flags=sorted({f for r in done for f in r.get("flags", [])}),
                 template=done[0].get("template"), shots=done[0].get("shots"), demos=done[0].get("demos"),
                 templates=done[0].get("templates"))
    if all(p is not None for p in preds) and key in stats.CLASSIFICATION + stats.GENERATION:
        refs = preds[0][0]
        if all(p[0] == refs for p in preds):
            group["references"], group["predictions"] = refs, [p[1] for p in preds]
            group["interval"] = list(stats.interval(stats.metric_fn(key, labels), refs, group["predictions"]))
    return group


def _avg(values: list):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def analyze(rows: list[dict]) -> dict:
    """Everything the report says, as numbers and sentences: groups (fraction 1.0), tests against the best,
    costs, break-even against prompting, learning curves and where they cross."""
    key, higher = primary_metric(rows)
    labels = next((r.get("labels") for r in rows if r.get("labels")), None)
    full = [r for r in rows if r.get("fraction", 1.0) == 1.0]
    groups = [_group([r for r in full if r["entry"] == name], key, labels)
              for name in dict.fromkeys(r["entry"] for r in full)]
    ok = [g for g in groups if g["status"] == "ok"]
    sign = 1 if higher else -1
    best = max(ok, key=lambda g: sign * g["mean"]) if ok else None
    test_name = None
    for g in ok:
        if g is best or "predictions" not in g or "predictions" not in best:
            continue
        g["vs_best"] = stats.compare_to_best(key, best["references"], best["predictions"][0], g["predictions"][0],
                                             labels)
        test_name = g["vs_best"]["test"]
    free = [g for g in ok if g["params"]["trainable"] == 0 and "predictions" in g]
    prompting = max(free, key=lambda g: sign * g["mean"]) if free else None
    for g in ok:  # every trained entry against the best entry that trains nothing
        if prompting is not None and g["params"]["trainable"] > 0 and "predictions" in g:
            test = g["vs_best"] if prompting is best else \
                stats.compare_to_best(key, prompting["references"], prompting["predictions"][0], g["predictions"][0],
                                      labels)  # the same test when the best entry is the one that trains nothing
            g["vs_prompting"] = {**test,
                                 "entry": prompting["name"], "difference": g["mean"] - prompting["mean"]}
    analysis = {"metric": key, "higher": higher, "best": best["name"] if best else None, "test": test_name,
                "prompting": prompting["name"] if prompting else None,
                "alpha": stats.ALPHA, "resamples": stats.RESAMPLES, "groups": groups}
    curves = learning_curves(rows, key, labels)
    if curves:
        analysis["curves"] = curves
    analysis["sentences"] = sentences(analysis, rows)
    for g in groups:  # per-example data stays in the run folders, not in the report's numbers
        g.pop("references", None)
        g.pop("predictions", None)
    return analysis


def learning_curves(rows: list[dict], key: str, labels) -> dict:
    """Per entry: (labelled examples, mean metric, 95% interval) at every fraction; {} without fractions."""
    if len({r.get("fraction", 1.0) for r in rows}) < 2:
        return {}
    out = {}
    for entry in dict.fromkeys(r["entry"] for r in rows):
        points = []
        for fraction in sorted({r.get("fraction", 1.0) for r in rows if r["entry"] == entry}):
            runs = [r for r in rows if r["entry"] == entry and r.get("fraction", 1.0) == fraction]
            g = _group(runs, key, labels)
            if g["status"] == "ok":
                points.append({"fraction": fraction, "examples": g["examples"], "mean": g["mean"],
                               "interval": g.get("interval")})
        if points:
            out[entry] = points
    return out


def crossovers(curves: dict, higher: bool) -> list[str]:
    """Where one entry's curve passes another's, between two measured training sizes."""
    out = []
    names = list(curves)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa = {p["fraction"]: p for p in curves[a]}
            pb = {p["fraction"]: p for p in curves[b]}
            common = sorted(set(pa) & set(pb))
            signs = [(pa[f]["mean"] > pb[f]["mean"]) == higher for f in common]
            for k in range(1, len(common)):
                if signs[k] != signs[k - 1]:
                    winner, loser = (a, b) if signs[k] else (b, a)
                    lo, hi = pa[common[k - 1]]["examples"], pa[common[k]]["examples"]
                    after_w, after_l = (pa, pb) if winner == a else (pb, pa)
                    iw, il = after_w[common[k]].get("interval"), after_l[common[k]].get("interval")
                    overlap = iw and il and iw[0] <= il[1] and il[0] <= iw[1]
                    out.append(f"**{winner}** overtakes **{loser}** between {lo:,} and {hi:,} labelled examples "
                               f"({winner}: {_pt(curves[winner], common[k - 1])} → {_pt(curves[winner], common[k])}; "
                               f"{loser}: {_pt(curves[loser], common[k - 1])} → {_pt(curves[loser], common[k])})"
                               + ("; at that size their 95% intervals still overlap, so the crossing is not certain"
                                  if overlap else "") + ".")
    return out


def _pt(points: list[dict], fraction: float) -> str:
    return f"{next(p['mean'] for p in points if p['fraction'] == fraction):.4f}"


def sentences(analysis: dict, rows: list[dict]) -> list[str]:
    key, higher, groups = analysis["metric"], analysis["higher"], analysis["groups"]
    name = METRIC_NAMES.get(key, key)
    ok = [g for g in groups if g["status"] == "ok"]
    if not ok:
        return ["No entry finished, so there is nothing to recommend; see the errors in the table."]
    best = next(g for g in ok if g["name"] == analysis["best"])
    seeds = len(best["values"])
    f = _fmt(key)
    interval = f", 95% interval {f(best['interval'][0])}–{f(best['interval'][1])}" if best.get("interval") else ""
    spread = f"; mean of {seeds} seeds, ± {f(best['std'])}" if seeds > 1 else ""
    out = [f"Best test {name}: **{best['name']}** ({f(best['mean'])}{interval}{spread})."]
    tested = [g for g in ok if "vs_best" in g]
    tied = [g for g in tested if g["vs_best"]["tied"]]
    if tested:
        how = f"{analysis['test']} test of {name} on the same test examples" + \
            (", first seed of each" if seeds > 1 else "") + f", p ≥ {analysis['alpha']}"
        if tied:
            worse = len(tested) - len(tied)
            out.append(f"Statistically tied with it ({how}): " + ", ".join(
                f"**{g['name']}** ({f(g['mean'])}, {stats.p_text(g['vs_best']['p'])})" for g in tied)
                + (f". The other {worse} are worse than the best (p < {analysis['alpha']})." if worse > 1 else
                   f". The remaining one is worse than the best (p < {analysis['alpha']})." if worse else "."))
        else:
            out.append(f"Every other entry is worse than it, and not by chance ({analysis['test']} test of {name}, "
                       f"all p < {analysis['alpha']}).")
    else:
        out.append("No per-example predictions to test the differences with: read the table as point estimates.")
    contenders = [best] + tied
    cost = [g for g in contenders if g.get("inference_per_1000_s") is not None]
    if len(contenders) > 1 and cost:
        run = min(cost, key=lambda g: g["inference_per_1000_s"])
        train = min(contenders, key=lambda g: g.get("train_s") or 0)
        others = ", ".join(f"{g['name']} {g['inference_per_1000_s']:.1f} s" for g in cost if g is not run)
        why = "the best, and the cheapest to run of the entries tied with it" if run is best else \
            f"tied with the best ({stats.p_text(run['vs_best']['p'])}) and the cheapest of those to run"
        out.append(f"Recommendation: **{run['name']}** — {why} ({run['inference_per_1000_s']:.1f} s per 1,000 "
                   f"requests; {others})"
                   + (f"; cheapest of them to train: {train['name']}, {_secs(train['train_s'])}"
                      if train is not run else "") + ".")
    else:
        out.append(f"Recommendation: **{best['name']}** — nothing else is within noise of it.")
    out += _engines(ok)
    out += _prompting(ok, best, key)
    curves = analysis.get("curves")
    if curves:
        out += crossovers(curves, higher) or ["The learning curves do not cross: the order of the entries is the same "
                                              "at every training size measured."]
        out.append(_still_improving(curves, best["name"]))
    out += _forgetting(ok)
    failed = [g["name"] for g in groups if g["status"] == "failed"]
    if failed:
        out.append(f"Failed: {', '.join(failed)} (see the table); the conclusions above leave them out.")
    return out


def _engines(ok: list[dict]) -> list[str]:
    """Which engine wrote each entry's test answers: the costs per 1,000 requests are its timings."""
    by: dict[str, list[str]] = {}
    for g in ok:
        if g.get("engine") and g.get("inference_per_1000_s"):
            by.setdefault(g["engine"], []).append(g["name"])
    if not by:
        return []
    return ["Cost per 1,000 requests: the time to write the test answers (greedy), on the engine `generate.engine` "
            "chose for each entry — " + "; ".join(f"{', '.join(names)}: {engine}" for engine, names in by.items())
            + "."]


def _fmt(key: str):
    """Numbers at the resolution the metric is read at: 0–1 metrics to 4 decimals, 0–100 scores (chrF, BLEU) to 2."""
    digits = 2 if key in ("chrf", "bleu", "perplexity") else 4
    return lambda v: f"{v:.{digits}f}"


def _prompting(ok: list[dict], best: dict, key: str) -> list[str]:
    """The best no-training entry, each trained entry tested against it, and after how many requests fine-tuning
    pays back its training time."""
    free = [g for g in ok if g["params"]["trainable"] == 0 and g.get("inference_per_1000_s")]
    trained = [g for g in ok if g["params"]["trainable"] > 0 and g.get("inference_per_1000_s")]
    if not free:
        return []
    f = _fmt(key)
    icl = max(free, key=lambda g: g["mean"])
    how = f"{icl['shots']} {icl['demos']} demonstration(s)" if icl.get("shots") else "zero-shot"
    out = [f"Without any training, **{icl['name']}** ({icl['model']}, {how}, {icl['prompt_tokens']:.0f} prompt tokens "
           f"per request) reaches {f(icl['mean'])} and costs {icl['inference_per_1000_s']:.1f} s per 1,000 requests."]
    versus = [g for g in ok if (g.get("vs_prompting") or {}).get("entry") == icl["name"]]
    if versus:
        def verdict(v):
            return "within noise" if v["tied"] else "better" if v["difference"] > 0 else "worse"
        out.append(f"Against it, same test examples ({versus[0]['vs_prompting']['test']}): " + "; ".join(
            f"**{g['name']}** {g['vs_prompting']['difference']:+.{2 if key in ('chrf', 'bleu') else 4}f} "
            f"({verdict(g['vs_prompting'])}, {stats.p_text(g['vs_prompting']['p'])})" for g in versus) + ".")
    target = best if best["params"]["trainable"] > 0 else (max(trained, key=lambda g: g["mean"]) if trained else None)
    if target is not None:
        saved = icl["inference_per_1000_s"] - target["inference_per_1000_s"]
        if saved > 0 and target.get("train_s"):
            n = 1000 * target["train_s"] / saved
            out.append(f"**{target['name']}** answers for {target['inference_per_1000_s']:.1f} s per 1,000 requests: "
                       f"its {_secs(target['train_s'])} of training are paid back after about {n:,.0f} requests.")
        else:
            out.append(f"**{target['name']}** is no cheaper per request than {icl['name']}: on cost alone, prompting "
                       f"never pays for training here.")
    return out


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def _still_improving(curves: dict, best: str) -> str:
    points = curves.get(best) or []
    if len(points) < 2:
        return ""
    a, b = points[-2], points[-1]
    gain = b["mean"] - a["mean"]
    within = b.get("interval") and b["interval"][0] <= a["mean"] <= b["interval"][1]
    verdict = ("flat: the smaller training set's score lies inside the full one's 95% interval" if within
               else "still improving: more labelled data would likely help")
    return (f"**{best}** went from {a['mean']:.4f} with {a['examples']:,} to {b['mean']:.4f} with {b['examples']:,} "
            f"labelled examples ({gain:+.4f}) — {verdict}.")


def benchmark_row(group: dict, task: str, metric: str) -> dict | None:
    """An entry's row of RUN/metrics.json["benchmarks"][task]["metrics"][metric] (see tunelab.benchmarks), or None."""
    return (((group.get("benchmarks") or {}).get(task) or {}).get("metrics") or {}).get(metric)


def benchmark_columns(groups: list[dict]) -> list[tuple[str, str]]:
    """(task, metric) of every benchmark an entry was scored on (eval.benchmarks): its first metric, a column each."""
    marks = {}
    for g in groups:
        for task, result in (g.get("benchmarks") or {}).items():
            if result.get("metrics"):
                marks.setdefault(task, next(iter(result["metrics"])))
    return list(marks.items())


def _forgetting(ok: list[dict]) -> list[str]:
    out = []
    probes = [g for g in ok if g.get("probe")]
    if probes:
        worst = max(probes, key=lambda g: g["probe"]["drop"])
        p = worst["probe"]
        out.append(f"Forgetting of the earlier task ({p['data']}, `{p['label']}`; linear probe on the encoder): "
                   f"largest after **{worst['name']}** ({p['base_accuracy']:.3f} → {p['accuracy']:.3f}); "
                   + ", ".join(f"{g['name']} {g['probe']['accuracy']:.3f}" for g in probes if g is not worst) + ".")
    for task, metric in benchmark_columns(ok):  # lm-eval-harness: each entry against the base model, paired
        rows = [(g["name"], r) for g in ok if "difference" in (r := benchmark_row(g, task, metric) or {})]
        if rows:
            worse = [n for n, r in rows if "tied" in r and not r["tied"] and
                     (r["difference"] < 0) == r.get("higher_is_better", True)]
            out.append(f"Benchmark {task} ({metric}, lm-eval-harness; base model {rows[0][1]['base']:.3f}): "
                       + ", ".join(f"{n} {r['run']:.3f} ({r['difference']:+.3f}"
                                   + (", tied" if r.get("tied") else f", {stats.p_text(r['p'])}" if "p" in r else "")
                                   + ")" for n, r in rows)
                       + (f" — **{', '.join(worse)}** lost ground on it." if worse
                          else " — no entry is measurably worse than the base." if all("tied" in r for _, r in rows)
                          else "."))
    ratios = [g for g in ok if g.get("forgetting")]
    if ratios:
        worst = max(ratios, key=lambda g: g["forgetting"])
        out.append(f"Forgetting (perplexity on general text, after ÷ before): highest for **{worst['name']}** "
                   f"(×{worst['forgetting']:.3f}); " + ", ".join(f"{g['name']} ×{g['forgetting']:.3f}"
                                                                 for g in ratios if g is not worst) + ".")
    return out
