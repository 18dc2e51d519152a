"""The `tunelab compare` report: one row per entry (metrics, cost, forgetting), sentences drawn from the numbers,
plots, and report.md / a self-contained report.html."""
from __future__ import annotations

import json
from pathlib import Path

from .plots import read_jsonl

TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template")
METRIC_NAMES = {"accuracy": "accuracy", "f1_macro": "macro F1", "loss": "loss", "perplexity": "perplexity",
                "chrf": "chrF", "bleu": "BLEU", "rouge_l": "ROUGE-L", "exact_match": "exact match"}
LOWER_IS_BETTER = {"loss", "perplexity"}


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
        row = {"name": e.name, "method": e.config.method.name, "model": e.config.model.name, "status": e.status,
               "error": e.error, "task": e.config.task, "metric": e.config.metric, "flags": []}
        if e.status != "failed":
            metrics = json.loads((e.run_dir / "metrics.json").read_text())
            manifest = json.loads((e.run_dir / "manifest.json").read_text())
            records = read_jsonl(e.run_dir / "metrics.jsonl")
            train = metrics.get("train", {})
            row.update(validation=metrics.get("validation", {}), test=metrics.get("test", {}),
                       params=metrics["params"], train_s=train.get("runtime_s"),
                       examples_per_s=train.get("examples_per_s"), tokens_per_s=train.get("tokens_per_s"),
                       peak_rss_mb=manifest.get("peak_rss_mb"), stored=stored_bytes(e.run_dir / "model"),
                       forgetting=(metrics.get("forgetting") or {}).get("ratio"),
                       probe=metrics.get("forgetting") if "drop" in (metrics.get("forgetting") or {}) else None,
                       records=records,
                       templates=train.get("templates"), template=train.get("template"),
                       shots=train.get("shots"), demos=train.get("demos"))
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


def _value(row: dict, key: str, split: str = "test"):
    return (row.get(split) or {}).get(key)


def recommend(rows: list[dict], key: str, higher: bool) -> list[str]:
    """Plain-language conclusions drawn from the numbers."""
    done = [r for r in rows if r["status"] != "failed" and _value(r, key) is not None]
    if not done:
        return ["No method finished, so there is nothing to recommend; see the errors in the table."]
    name = METRIC_NAMES.get(key, key)
    sign = 1 if higher else -1
    best = max(done, key=lambda r: sign * _value(r, key))
    b = _value(best, key)
    out = [f"Best test {name}: **{best['name']}** ({b:.4f})."]

    def share(r):  # how much of the best result r reaches (for lower-is-better: best / r)
        v = _value(r, key)
        return v / b if higher else b / v

    trained = [r for r in done if r["params"]["trainable"] > 0]
    close = sorted((r for r in trained if r is not best and share(r) >= 0.98),
                   key=lambda r: (r["params"]["trainable"], r["train_s"] or 0))
    for r in close[:3]:
        pct = 100 * r["params"]["trainable"] / max(best["params"]["trainable"], 1)
        t = 100 * (r["train_s"] or 0) / max(best["train_s"] or 1e-9, 1e-9)
        stored = (f"stores {human_bytes(r['stored'])} instead of {human_bytes(best['stored'])}"
                  if r["stored"] < 0.9 * best["stored"] else f"stores as much ({human_bytes(r['stored'])})")
        out.append(f"**{r['name']}** reaches {100 * share(r):.1f}% of {best['name']}'s {name} with {pct:.3g}% of "
                   f"its trainable parameters and {t:.0f}% of its training time, and {stored}.")
    fastest = min(trained, key=lambda r: r["train_s"] or 0, default=None)
    if fastest is not None and fastest is not best and fastest not in close[:3]:
        out.append(f"The quickest to train, **{fastest['name']}**, reaches {100 * share(fastest):.1f}% of the best "
                   f"in {fastest['train_s']:.0f} s (vs {best['train_s']:.0f} s).")
    free = [r for r in done if r["params"]["trainable"] == 0]
    if free:
        icl = max(free, key=lambda r: sign * _value(r, key))
        how = f"{icl['shots']} {icl['demos']} demonstration(s)" if icl.get("shots") else "zero-shot"
        out.append(f"Without any training, **{icl['name']}** ({icl['model']}, {how}) reaches {_value(icl, key):.4f}, "
                   f"{100 * share(icl):.1f}% of the best.")
    cheap = [r for r in trained if share(r) >= 0.98]
    if cheap:
        pick = min(cheap, key=lambda r: (r["train_s"] or 0, r["stored"]))
        if pick is best:
            out.append(f"Recommendation: **{best['name']}** — it is the best, and nothing cheaper comes within 2% "
                       f"of it.")
        else:
            out.append(f"Recommendation: **{pick['name']}** — within 2% of the best ({100 * share(pick):.1f}%) at "
                       f"the lowest training time ({pick['train_s']:.0f} s vs {best['train_s']:.0f} s).")
    probes = [r for r in done if r.get("probe")]
    if probes:
        worst = max(probes, key=lambda r: r["probe"]["drop"])
        p = worst["probe"]
        out.append(f"Forgetting of the earlier task ({p['data']}, `{p['label']}`; linear probe on the encoder): "
                   f"largest after **{worst['name']}** ({p['base_accuracy']:.3f} → {p['accuracy']:.3f}); "
                   + ", ".join(f"{r['name']} {r['probe']['accuracy']:.3f}" for r in probes if r is not worst) + ".")
    forgetting = [r for r in done if r.get("forgetting")]
    if forgetting:
        worst = max(forgetting, key=lambda r: r["forgetting"])
        out.append(f"Forgetting (perplexity on general text, after ÷ before): highest for **{worst['name']}** "
                   f"(×{worst['forgetting']:.3f}); " + ", ".join(f"{r['name']} ×{r['forgetting']:.3f}"
                                                                 for r in forgetting if r is not worst) + ".")
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    if failed:
        out.append(f"Failed: {', '.join(failed)} (see the table); the conclusions above leave them out.")
    return out


def _table(rows: list[dict], key: str) -> tuple[list[str], list[list[str]]]:
    done = [r for r in rows if r["status"] != "failed"]
    keys = [k for k in METRIC_NAMES if any(k in (r.get("test") or {}) for r in done)]
    if key in keys:  # the ranking metric first
        keys.remove(key)
        keys.insert(0, key)
    keys = keys[:4]
    val_keys = [k for k in keys if any(k in (r.get("validation") or {}) for r in done)][:2]
    head = (["method", "model"] + [f"validation {METRIC_NAMES[k]}" for k in val_keys]
            + [f"test {METRIC_NAMES[k]}" for k in keys]
            + ["trainable params", "train time", "throughput", "peak RAM", "stored", "forgetting", "notes"])
    body = []
    for r in rows:
        if r["status"] == "failed":
            body.append([r["name"], r["model"]] + ["—"] * (len(head) - 3) + [f"FAILED: {r['error']}"])
            continue
        p = r["params"]
        speed = (f"{r['tokens_per_s']:.0f} tok/s" if r.get("tokens_per_s") else
                 f"{r['examples_per_s']:.0f} ex/s" if r.get("examples_per_s") else "—")
        notes = list(r["flags"])
        if r["status"] == "cached":
            notes.append("cached")
        if r.get("template"):
            notes.append(f"template: {r['template']!r}")
        body.append([r["name"], r["model"]]
                    + [_fmt(_value(r, k, "validation")) for k in val_keys] + [_fmt(_value(r, k)) for k in keys]
                    + [f"{p['trainable']:,} ({p['percent']:.3g}%)", f"{r['train_s']:.0f} s" if r["train_s"] else "—",
                       speed, f"{r['peak_rss_mb'] / 1024:.1f} GB" if r.get("peak_rss_mb") else "—",
                       human_bytes(r["stored"]), _forgetting_cell(r),
                       "; ".join(notes)])
    return head, body


def _forgetting_cell(r: dict) -> str:
    """Perplexity ratio on general text (generative), or earlier-task probe accuracy before → after (classify)."""
    if r.get("forgetting"):
        return f"×{r['forgetting']:.3f}"
    if r.get("probe"):
        return f"probe {r['probe']['base_accuracy']:.3f} → {r['probe']['accuracy']:.3f}"
    return "—"


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def compare_plots(rows: list[dict], key: str, out: Path) -> dict[str, Path]:
    """loss.png (train vs validation loss per method), metric_vs_params.png (log x), metric_vs_time.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = METRIC_NAMES.get(key, key)
    done = [r for r in rows if r["status"] != "failed" and _value(r, key) is not None]
    paths = {}
    curves = [r for r in done if any("loss" in x or "eval_loss" in x for x in r["records"])]
    if curves:
        cols = min(3, len(curves))
        nrows = -(-len(curves) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), dpi=100, squeeze=False)
        for ax, r in zip(axes.flat, curves):
            train = [(x["epoch"], x["loss"]) for x in r["records"] if "loss" in x]
            val = [(x["epoch"], x["eval_loss"]) for x in r["records"] if "eval_loss" in x]
            if train:
                ax.plot(*zip(*train), label="train", color="tab:blue", alpha=0.8)
            if val:
                ax.plot(*zip(*val), "o-", label="validation", color="tab:orange")
            ax.set_title(r["name"] + (" ⚠ overfitting" if any(f.startswith("overfitting") for f in r["flags"])
                                      else ""), fontsize=10)
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(curves):]:
            ax.axis("off")
        fig.tight_layout()
        paths["loss"] = out / "loss.png"
        fig.savefig(paths["loss"])
        plt.close(fig)
    if done:
        for fname, xkey, xlabel in (("metric_vs_params", "params", "trainable parameters (log scale)"),
                                    ("metric_vs_time", "train_s", "training time, s (log scale)")):
            fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
            for r in done:
                x = r["params"]["trainable"] if xkey == "params" else (r["train_s"] or 0)
                free = r["params"]["trainable"] == 0  # icl: nothing trained (its time is index + template choice)
                x = max(x, 1 if xkey == "params" else 0.1)  # no parameters: drawn at the axis' left edge
                ax.scatter([x], [_value(r, key)], s=60, marker="x" if free else "o",
                           color="tab:gray" if free else "tab:blue")
                label = r["name"] + (" (no training)" if free and xkey == "params" else "")
                ax.annotate(label, (x, _value(r, key)), textcoords="offset points", xytext=(5, 5), fontsize=9)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"test {name}")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            paths[fname] = out / f"{fname}.png"
            fig.savefig(paths[fname])
            plt.close(fig)
    return paths


def compare_report(rows: list[dict], out: Path, *, title: str, config) -> dict:
    """Write report.md (PNG files beside it) and a self-contained report.html (PNGs embedded)."""
    import base64
    import html

    key, higher = primary_metric(rows)
    plots = compare_plots(rows, key, out)
    head, body = _table(rows, key)
    advice = recommend(rows, key, higher)
    data = config.data.train or ", ".join(d.train for d in config.data.datasets or [])
    intro = (f"Task `{config.task}` on `{data}` (split seed {config.data.split.seed}, training seed "
             f"{config.train.seed}); every method saw the same train/validation/test split. Ranked by test "
             f"{METRIC_NAMES.get(key, key)} ({'higher' if higher else 'lower'} is better).")
    captions = {"loss": "Training vs validation loss per method",
                "metric_vs_params": f"Test {METRIC_NAMES.get(key, key)} vs trainable parameters",
                "metric_vs_time": f"Test {METRIC_NAMES.get(key, key)} vs training time"}
    templates = [(r["name"], r["templates"]) for r in rows if r.get("templates")]

    md = [f"# {title}", "", intro, "", "## Recommendation", ""] + [f"- {a}" for a in advice] + ["", "## Results", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", "\\n") for c in row) + " |" for row in body]
    for name, t in templates:
        md += ["", f"### Prompt templates of {name} (validation)", "", "| template | accuracy | macro F1 |",
               "|---|---|---|"]
        md += [f"| `{k!r}` | {v['accuracy']:.4f} | {v['f1_macro']:.4f} |" for k, v in t.items()]
    md += ["", "## Plots", ""] + [f"![{captions[k]}]({p.name})" for k, p in plots.items()]
    md += ["", "Training time is what the method itself costs (for icl: building the demonstration index and "
           "scoring the templates); peak RAM is the whole run's process; stored is what this task needs on disk "
           "beyond the base model. Each run's own folder has its config, metrics and predictions."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    # the numbers of the report, for documentation tables generated from them (scripts/docs_tables.py)
    kept = [{k: v for k, v in r.items() if k != "records"} for r in rows]
    (out / "results.json").write_text(json.dumps({"title": title, "metric": key, "recommendation": advice,
                                                  "machine": _machine(), "rows": kept}, indent=2, default=str))

    def bold(text: str) -> str:
        parts = html.escape(text).split("**")
        return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))

    img = {k: base64.b64encode(p.read_bytes()).decode() for k, p in plots.items()}
    h = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
         "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;"
         "text-align:right;vertical-align:top}th{background:#f3f3f3}td:first-child,td:nth-child(2),td:last-child"
         "{text-align:left}tr.failed td{background:#fdecea}img{max-width:100%;border:1px solid #eee;margin:.5em 0}"
         "figure{margin:1em 0}figcaption{color:#555;font-size:13px}</style></head><body>",
         f"<h1>{html.escape(title)}</h1>", f"<p>{bold(intro.replace('`', ''))}</p>", "<h2>Recommendation</h2><ul>"]
    h += [f"<li>{bold(a)}</li>" for a in advice]
    h += ["</ul><h2>Results</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    for r, row in zip(rows, body):
        cls = " class='failed'" if r["status"] == "failed" else ""
        h.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    h.append("</table>")
    for name, t in templates:
        h.append(f"<h3>Prompt templates of {html.escape(name)} (validation)</h3><table><tr><th>template</th>"
                 "<th>accuracy</th><th>macro F1</th></tr>")
        h += [f"<tr><td><code>{html.escape(repr(k))}</code></td><td>{v['accuracy']:.4f}</td>"
              f"<td>{v['f1_macro']:.4f}</td></tr>" for k, v in t.items()]
        h.append("</table>")
    h.append("<h2>Plots</h2>")
    h += [f"<figure><img alt='{html.escape(captions[k])}' src='data:image/png;base64,{b}'>"
          f"<figcaption>{html.escape(captions[k])}</figcaption></figure>" for k, b in img.items()]
    h.append(f"<p>{html.escape(md[-1])}</p></body></html>")
    (out / "report.html").write_text("\n".join(h))
    return {"report_md": out / "report.md", "report_html": out / "report.html", "plots": plots}
