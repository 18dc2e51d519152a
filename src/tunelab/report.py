"""The `tunelab compare` report: one row per entry (metrics, cost, forgetting), sentences drawn from the numbers,
plots, and report.md / a self-contained report.html."""
from __future__ import annotations

import json
from pathlib import Path

from .plots import read_jsonl
from .stats import p_text
from .verdict import METRIC_NAMES, benchmark_columns, benchmark_row

TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template")


def stored_bytes(model_dir: Path) -> int:
    """Bytes a task needs on disk beyond the base model: everything the run saved except the tokenizer (the base
    model's own) — an adapter, a classifier head, a full model, or an icl run's demonstrations and index."""
    if not model_dir.is_dir():
        return 0
    return sum(f.stat().st_size for f in model_dir.rglob("*")
               if f.is_file() and not f.name.startswith(TOKENIZER_FILES))


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} GB"


def overfitting(records: list[dict]) -> str | None:
    """A sentence when validation loss rose (≥5% over its minimum, by the last evaluation) while the training loss
    kept falling; None otherwise."""
    evals = [(r["epoch"], r["eval_loss"]) for r in records if "eval_loss" in r]
    train = [(r["epoch"], r["loss"]) for r in records if "loss" in r]
    if len(evals) < 2 or len(train) < 2:
        return None
    best_epoch, best = min(evals, key=lambda e: e[1])
    last_epoch, last = evals[-1]
    if last < best * 1.05 or last_epoch == best_epoch:
        return None
    before = [loss for epoch, loss in train if epoch <= best_epoch] or [train[0][1]]
    after = [loss for epoch, loss in train if epoch > best_epoch]
    if not after or min(after) >= before[-1]:
        return None
    return (f"overfitting: validation loss rose from {best:.3f} (epoch {best_epoch:g}) to {last:.3f} (epoch "
            f"{last_epoch:g}) while training loss fell from {before[-1]:.3f} to {after[-1]:.3f}")


def _machine() -> dict:
    import os
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or None}


def compare_rows(entries) -> list[dict]:
    """One row per compare entry: its numbers from the run directory, or its error."""
    rows = []
    for e in entries:
        row = {"name": e.name, "entry": e.method or e.name, "seed": e.seed, "fraction": e.fraction,
               "run_dir": str(e.run_dir), "method": e.config.method.name, "model": e.config.model.name,
               "status": e.status, "error": e.error, "task": e.config.task, "metric": e.config.metric, "flags": []}
        if e.status != "failed":
            metrics = json.loads((e.run_dir / "metrics.json").read_text())
            manifest = json.loads((e.run_dir / "manifest.json").read_text())
            records = read_jsonl(e.run_dir / "metrics.jsonl")
            train = metrics.get("train", {})
            row.update(validation=metrics.get("validation", {}), test=metrics.get("test", {}),
                       params=metrics["params"], train_s=train.get("runtime_s"),
                       run_s=manifest.get("wall_time_s"),  # the whole run: data, training, evaluation
                       examples_per_s=train.get("examples_per_s"), tokens_per_s=train.get("tokens_per_s"),
                       peak_rss_mb=manifest.get("peak_rss_mb"), stored=stored_bytes(e.run_dir / "model"),
                       forgetting=(metrics.get("forgetting") or {}).get("ratio"),
                       benchmarks=metrics.get("benchmarks"),
                       probe=metrics.get("forgetting") if "drop" in (metrics.get("forgetting") or {}) else None,
                       records=records,
                       templates=train.get("templates"), template=train.get("template"),
                       shots=train.get("shots"), demos=train.get("demos"),
                       n_train=(manifest.get("examples") or {}).get("train"), labels=manifest.get("labels"))
            flag = overfitting(records)
            if flag:
                best = train.get("best_checkpoint")
                row["flags"].append(flag + ("; the best checkpoint was kept" if best else ""))
            leaks = manifest.get("leakage") or {}
            if any(leaks.values()):
                row["flags"].append("leakage: " + ", ".join(f"{n} {k} text(s) also in train" for k, n in leaks.items()
                                                            if n))
        rows.append(row)
    return rows


def _fmt(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(analysis: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """The results table: one row per compare entry (its seeds pooled), and each row's status."""
    key = analysis["metric"]
    name = METRIC_NAMES.get(key, key)
    groups = analysis["groups"]
    head = ["entry", "model", f"test {name}", "95% interval", f"vs {analysis['best']}", "trainable params",
            "train time", "per 1,000 requests", "prompt tokens", "peak RAM", "stored", "forgetting", "notes"]
    marks = benchmark_columns(groups)
    head[-1:-1] = [f"{task} {metric}" for task, metric in marks]
    body, status = [], []
    for g in groups:
        status.append(g["status"])
        if g["status"] != "ok":
            body.append([g["name"], g["model"]] + ["—"] * (len(head) - 3) + [f"FAILED: {g.get('error')}"])
            continue
        seeds = len(g["values"])
        value = f"{g['mean']:.4f}" + (f" ± {g['std']:.4f} ({seeds} seeds)" if seeds > 1 else "")
        interval = f"{g['interval'][0]:.4f}–{g['interval'][1]:.4f}" if g.get("interval") else "—"
        vs = g.get("vs_best")
        verdict = "best" if g["name"] == analysis["best"] else "—" if not vs else \
            f"{'tied' if vs['tied'] else 'worse'} ({p_text(vs['p'])}" + \
            (f"; McNemar {p_text(vs['mcnemar_p'])})" if "mcnemar_p" in vs else ")")
        p = g["params"]
        notes = list(g.get("flags") or [])
        if g.get("template"):
            notes.append(f"template: {g['template']!r}")
        body.append([g["name"], g["model"], value, interval, verdict, f"{p['trainable']:,} ({p['percent']:.3g}%)",
                     f"{g['train_s']:.0f} s" if g.get("train_s") else "—",
                     f"{g['inference_per_1000_s']:.1f} s" if g.get("inference_per_1000_s") else "—",
                     _fmt(g.get("prompt_tokens"), 0), f"{g['peak_rss_mb'] / 1024:.1f} GB" if g.get("peak_rss_mb") else
                     "—", human_bytes(g["stored"]) if g.get("stored") is not None else "—", _forgetting_cell(g),
                     *(benchmark_cell(g, task, metric) for task, metric in marks), "; ".join(notes)])
    return head, body, status


def benchmark_cell(g: dict, task: str, metric: str) -> str:
    """`0.612 (+0.014 vs base, tied)`: the entry's score on a benchmark and its paired change from the base model."""
    row = benchmark_row(g, task, metric)
    if row is None:
        return "—"
    if "difference" not in row:
        return f"{row['run']:.3f}"
    verdict = "" if "tied" not in row else ", tied" if row["tied"] else f", {p_text(row['p'])}"
    return f"{row['run']:.3f} ({row['difference']:+.3f} vs base{verdict})"


def _forgetting_cell(g: dict) -> str:
    """Perplexity ratio on general text (generative), or earlier-task probe accuracy before → after (classify)."""
    if g.get("forgetting"):
        return f"×{g['forgetting']:.3f}"
    if g.get("probe"):
        return f"probe {g['probe']['base_accuracy']:.3f} → {g['probe']['accuracy']:.3f}"
    return "—"


def compare_plots(rows: list[dict], analysis: dict, out: Path) -> dict[str, Path]:
    """loss.png (train vs validation loss per entry), metric_vs_cost.png (with the Pareto front),
    metric_vs_params.png, learning_curves.png (with compare.fractions)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = analysis["metric"]
    name = METRIC_NAMES.get(key, key)
    ok = [g for g in analysis["groups"] if g["status"] == "ok"]
    paths = {}

    def save(fig, fname):
        fig.tight_layout()
        paths[fname] = out / f"{fname}.png"
        fig.savefig(paths[fname])
        plt.close(fig)

    first = [r for r in rows if r["status"] != "failed" and r.get("fraction", 1.0) == 1.0 and r["name"] == r["entry"]
             and any("loss" in x or "eval_loss" in x for x in r["records"])]
    if first:
        cols = min(3, len(first))
        fig, axes = plt.subplots(-(-len(first) // cols), cols, figsize=(4.2 * cols, 3.2 * -(-len(first) // cols)),
                                 dpi=100, squeeze=False)
        for ax, r in zip(axes.flat, first):
            train = [(x["epoch"], x["loss"]) for x in r["records"] if "loss" in x]
            val = [(x["epoch"], x["eval_loss"]) for x in r["records"] if "eval_loss" in x]
            if train:
                ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
            if val:
                ax.plot(*zip(*val), "o-", label="validation", color="tab:orange")
            ax.set_title(r["name"] + (" ⚠ overfitting" if any(f.startswith("overfitting") for f in r["flags"])
                                      else ""), fontsize=10)
            ax.set(xlabel="epoch", ylabel="loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(first):]:
            ax.axis("off")
        save(fig, "loss")
    costed = [g for g in ok if g.get("inference_per_1000_s")]
    if costed:
        fig, ax = plt.subplots(figsize=(7, 4.4), dpi=100)
        for g in costed:
            lo, hi = g.get("interval") or (g["mean"], g["mean"])
            ax.errorbar([g["inference_per_1000_s"]], [g["mean"]], yerr=[[g["mean"] - lo], [hi - g["mean"]]], fmt="o",
                        color="tab:gray" if g["params"]["trainable"] == 0 else "tab:blue", capsize=3)
            ax.annotate(g["name"], (g["inference_per_1000_s"], g["mean"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=9)
        front = pareto(costed, analysis["higher"])
        ax.plot([g["inference_per_1000_s"] for g in front], [g["mean"] for g in front], "--", color="tab:red",
                label="Pareto front (nothing both cheaper and better)")
        ax.set_xscale("log")
        ax.set(xlabel="inference cost, s per 1,000 requests (log scale)", ylabel=f"test {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "metric_vs_cost")
    if ok:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
        for g in ok:
            free = g["params"]["trainable"] == 0  # no training: drawn at the axis' left edge
            x = max(g["params"]["trainable"], 1)
            ax.scatter([x], [g["mean"]], s=60, marker="x" if free else "o", color="tab:gray" if free else "tab:blue")
            ax.annotate(g["name"] + (" (no training)" if free else ""), (x, g["mean"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=9)
        ax.set_xscale("log")
        ax.set(xlabel="trainable parameters (log scale)", ylabel=f"test {name}")
        ax.grid(alpha=0.3)
        save(fig, "metric_vs_params")
    points = [(i, f"{g['name']} · {task}", f"{task} {metric}", row)
              for i, (task, metric) in enumerate(benchmark_columns(ok)) for g in ok
              if "difference" in (row := benchmark_row(g, task, metric) or {})]
    if points:  # each benchmark's change from the base model per entry, with its paired 95% interval
        fig, ax = plt.subplots(figsize=(7, 0.9 + 0.45 * len(points)), dpi=100)
        labelled = set()
        for y, (i, _, label, row) in enumerate(points):
            low, high = row.get("interval") or (row["difference"],) * 2
            ax.errorbar([row["difference"]], [y], xerr=[[row["difference"] - low], [high - row["difference"]]],
                        fmt="o", capsize=3, color=f"C{i}", label=None if label in labelled else label)
            labelled.add(label)
        ax.axvline(0, color="tab:gray", linestyle=":")
        ax.set_yticks(range(len(points)), [p[1] for p in points], fontsize=8)
        ax.set(xlabel="change from the base model (run − base), 95% paired interval")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "benchmarks")
    curves = analysis.get("curves")
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.4), dpi=100)
        sizes = [p["examples"] for points in curves.values() for p in points if p["examples"]]
        for entry, points in curves.items():
            if len(points) == 1:  # zero-shot: no training data, the same score at every size
                ax.axhline(points[0]["mean"], linestyle=":", color="tab:gray")
                ax.annotate(f"{entry} (no training data)", (min(sizes), points[0]["mean"]), xytext=(0, 4),
                            textcoords="offset points", fontsize=8, color="tab:gray")
                continue
            x = [p["examples"] for p in points]
            y = [p["mean"] for p in points]
            err = [[p["mean"] - (p["interval"] or [p["mean"]] * 2)[0] for p in points],
                   [(p["interval"] or [p["mean"]] * 2)[1] - p["mean"] for p in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=entry)
        ax.set_xscale("log")
        ax.set(xlabel="labelled training examples (log scale)", ylabel=f"test {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "learning_curves")
    return paths


def pareto(groups: list[dict], higher: bool) -> list[dict]:
    """The entries no other entry beats on both inference cost and the metric, by increasing cost."""
    sign = 1 if higher else -1
    front, best = [], None
    for g in sorted(groups, key=lambda g: (g["inference_per_1000_s"], -sign * g["mean"])):
        if best is None or sign * g["mean"] > sign * best:
            front.append(g)
            best = g["mean"]
    return front


def compare_report(rows: list[dict], analysis: dict, out: Path, *, title: str, config) -> dict:
    """Write report.md (PNG files beside it), a self-contained report.html (PNGs embedded) and results.json (the
    numbers, for documentation tables generated from them)."""
    import base64

    key, higher = analysis["metric"], analysis["higher"]
    name = METRIC_NAMES.get(key, key)
    plots = compare_plots(rows, analysis, out)
    head, body, status = _table(analysis)
    advice = [s for s in analysis["sentences"] if s]
    data = config.data.train or ", ".join(d.train for d in config.data.datasets or [])
    seeds = config.compare.seeds or [config.train.seed]
    intro = (f"Task `{config.task}` on `{data}` (split seed {config.data.split.seed}; training seed(s) "
             f"{', '.join(map(str, seeds))}); every entry saw the same train/validation/test split. Ranked by test "
             f"{name} ({'higher' if higher else 'lower'} is better). Intervals: paired bootstrap over the test "
             f"examples ({analysis['resamples']:,} resamples, the same for every entry); the last column tests each "
             f"entry against the best ({analysis['test'] or 'no test'}; tied when p ≥ {analysis['alpha']}).")
    captions = {"loss": "Training vs validation loss per entry (first seed)",
                "metric_vs_cost": f"Test {name} vs inference cost, 95% intervals, with the Pareto front",
                "metric_vs_params": f"Test {name} vs trainable parameters",
                "learning_curves": f"Learning curves: test {name} vs labelled training examples (95% intervals)",
                "benchmarks": "Benchmarks (lm-eval-harness): each entry's change from the base model, 95% paired "
                              "intervals (an interval across 0 is a tie)"}
    templates = [(g["name"], g["templates"]) for g in analysis["groups"] if g.get("templates")]
    note = ("Training time is what the method itself costs (for icl: building the demonstration index and scoring "
            "the templates); per 1,000 requests is the measured time of answering the test split, one process; "
            "prompt tokens are what each request reads (demonstrations included); peak RAM is the whole run's "
            "process; stored is what this task needs on disk beyond the base model. Each run's own folder has its "
            "config, metrics and per-example predictions.")
    md = [f"# {title}", "", intro, "", "## Verdict", ""] + [f"- {a}" for a in advice] + ["", "## Results", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", "\\n") for c in row) + " |" for row in body]
    for entry, t in templates:
        md += ["", f"### Prompt templates of {entry} (validation)", "", "| template | accuracy | macro F1 |",
               "|---|---|---|"]
        md += [f"| `{k!r}` | {v['accuracy']:.4f} | {v['f1_macro']:.4f} |" for k, v in t.items()]
    md += ["", "## Plots", ""] + [f"![{captions[k]}]({p.name})" for k, p in plots.items()] + ["", note]
    (out / "report.md").write_text("\n".join(md) + "\n")
    kept = [{k: v for k, v in r.items() if k != "records"} for r in rows]
    (out / "results.json").write_text(json.dumps({"title": title, "metric": key, "recommendation": advice,
                                                  "analysis": analysis, "machine": _machine(), "rows": kept},
                                                 indent=2, default=str))

    images = {k: base64.b64encode(p.read_bytes()).decode() for k, p in plots.items()}
    page = _templates().get_template("report.html").render(
        title=title, intro=intro, advice=advice, head=head, rows=list(zip(status, body)), templates=templates,
        images=images, captions=captions, note=note)
    (out / "report.html").write_text(page)
    return {"report_md": out / "report.md", "report_html": out / "report.html", "plots": plots}


def _templates():
    """The report's Jinja2 page (templates/report.html), escaping everything; `bold` turns **x** into <b>x</b>."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from markupsafe import Markup, escape

    env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["bold"] = lambda text: Markup("".join(f"<b>{escape(p)}</b>" if i % 2 else str(escape(p))
                                                      for i, p in enumerate(str(text).split("**"))))
    env.filters["pyrepr"] = repr
    return env
