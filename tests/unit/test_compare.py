"""`tunelab compare`: entries become run configs, failures are rows, finished runs are reused by config hash, and
the report holds the table, the plots and conclusions drawn from the numbers."""
from __future__ import annotations

import base64
import re

import pytest

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.report import overfitting, primary_metric, recommend


def test_compare_runs_reports_and_caches(make_config, tiny_llama, tiny_bert, tmp_path, capsys):
    from tunelab.cli import main
    from tunelab.compare import compare

    out = tmp_path / "cmp"
    path = make_config(method="features", name="cmp", compare={
        "methods": ["features", "head", "icl_0", "icl_k"], "icl_model": str(tiny_llama), "shots": 2,
        "overrides": {"icl_k": {"model.name": str(tiny_bert)},  # an encoder: this entry must fail, as a row
                      "head": {"train.epochs": 2}},
        "dir": str(out)})
    result = compare(path)
    rows = {r["name"]: r for r in result["rows"]}
    assert [r["name"] for r in result["rows"]] == ["features", "head", "icl_0", "icl_k"]
    assert rows["icl_k"]["status"] == "failed" and "encoder" in rows["icl_k"]["error"]
    assert all(rows[n]["status"] == "trained" for n in ("features", "head", "icl_0"))
    assert rows["icl_0"]["params"]["trainable"] == 0 and rows["icl_0"]["model"] == str(tiny_llama)
    assert rows["head"]["train_s"] > 0 and rows["head"]["stored"] > rows["features"]["stored"] > 0
    # the per-entry override reached only its entry; the others keep the base config
    assert load_config(out / "configs" / "head.yaml").train.epochs == 2
    assert load_config(out / "configs" / "features.yaml").train.epochs == 1
    md = (out / "report.md").read_text()
    assert "| icl_k |" in md and "FAILED" in md and "## Recommendation" in md
    html = (out / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing fetched when opened

    # adding a method reuses the finished runs (same config hash) and trains only the new one
    stamps = {n: (out / "runs" / n / "status.json").stat().st_mtime for n in ("features", "head", "icl_0")}
    code = main(["compare", str(path), "--methods", "features,head,icl_0,full"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "features: cached" in printed and "full: training" in printed
    assert {n: (out / "runs" / n / "status.json").stat().st_mtime for n in stamps} == stamps
    # a changed setting changes the hash: that entry runs again
    result = compare(path, ["compare.overrides.head={train.epochs: 1}"], methods=["features", "head"])
    assert [r["status"] for r in result["rows"]] == ["cached", "trained"]


def test_compare_config_errors_name_every_problem(make_config):
    from tunelab.compare import compare

    path = make_config(method="features", name="bad", compare={
        "methods": ["features", "lroa", "icl_0"], "overrides": {"fulll": {"train.epochs": 1}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "did you mean `lora`" in text and "overrides for `fulll`" in text
    path = make_config(method="features", name="bad2", compare={
        "methods": ["features", "head"], "overrides": {"head": {"train.epoks": 1}}})
    with pytest.raises(ConfigError, match="compare entry `head`.*train.epoks"):
        compare(path)


def _records(evals, train):
    return [{"epoch": e, "eval_loss": v} for e, v in evals] + [{"epoch": e, "loss": v} for e, v in train]


def test_overfitting_flag():
    rising = _records([(1, 0.30), (2, 0.34), (3, 0.45)], [(0.5, 0.6), (1, 0.35), (2, 0.15), (3, 0.05)])
    flag = overfitting(rising)
    assert flag and "0.300 (epoch 1)" in flag and "0.450 (epoch 3)" in flag
    assert overfitting(_records([(1, 0.30), (2, 0.28), (3, 0.27)], [(1, 0.4), (2, 0.3), (3, 0.2)])) is None
    # validation up but training loss up as well: not the overfitting pattern
    assert overfitting(_records([(1, 0.30), (2, 0.40)], [(1, 0.3), (2, 0.5)])) is None


def _row(name, f1, trainable, train_s, stored, **extra):
    return {"name": name, "model": "m", "status": "trained", "task": "classify", "metric": "f1_macro",
            "test": {"f1_macro": f1}, "params": {"trainable": trainable}, "train_s": train_s, "stored": stored,
            "flags": [], **extra}


def test_recommendation_follows_the_numbers():
    rows = [_row("full", 0.935, 22_000_000, 90, 91e6), _row("lora", 0.930, 110_000, 78, 457e3),
            _row("features", 0.91, 770, 15, 3e3), _row("icl_k", 0.80, 0, 60, 1e5, shots=4, demos="random"),
            {"name": "prompt", "model": "m", "status": "failed", "error": "boom", "task": "classify",
             "metric": "f1_macro", "flags": []}]
    key, higher = primary_metric(rows)
    assert (key, higher) == ("f1_macro", True)
    text = "\n".join(recommend(rows, key, higher))
    assert "Best test macro F1: **full**" in text
    assert "**lora** reaches 99.5% of full's macro F1 with 0.5% of its trainable parameters" in text
    assert "**icl_k**" in text and "85.6% of the best" in text
    assert "Recommendation: **lora**" in text  # within 2% and faster than full
    assert "Failed: prompt" in text
    rows[1]["test"]["f1_macro"] = 0.80  # LoRA far behind: full is the pick
    assert "Recommendation: **full**" in "\n".join(recommend(rows, key, higher))


def _full_row(name, f1, trainable, train_s, stored, records, **extra):
    return {**_row(name, f1, trainable, train_s, stored), "validation": {"f1_macro": f1 + 0.01, "accuracy": f1},
            "test": {"f1_macro": f1, "accuracy": f1}, "params": {"trainable": trainable, "total": 22_700_000,
                                                                 "percent": 100 * trainable / 22_700_000},
            "examples_per_s": 100.0, "tokens_per_s": None, "peak_rss_mb": 2048.0, "forgetting": None,
            "records": records, **extra}


@pytest.mark.skipif(__import__("tunelab.plots", fromlist=["find_browser"]).find_browser() is None,
                    reason="no headless Chromium (apt-get install chromium-headless-shell; CI installs it)")
def test_report_renders_with_its_plots_in_headless_chromium(tmp_path):
    """Open report.html in a real browser: the screenshot must show the plots (matplotlib's blue and orange),
    which only appear if the embedded PNGs decode and render."""
    import numpy as np
    from PIL import Image

    from tunelab.config import Config
    from tunelab.plots import screenshot
    from tunelab.report import compare_report

    curve = _records([(1, 0.30), (2, 0.28), (3, 0.35)], [(0.5, 0.6), (1, 0.35), (2, 0.2), (3, 0.1)])
    rows = [_full_row("full", 0.935, 22_700_000, 91, 91e6, curve),
            _full_row("lora", 0.923, 111_000, 78, 457e3, curve),
            _full_row("icl_k", 0.87, 0, 60, 1e5, [], shots=4, demos="retrieved",
                      templates={"Review: {text}\nSentiment: {label}": {"accuracy": 0.88, "f1_macro": 0.88}})]
    config = Config.model_validate({"model": {"name": "minilm"}, "data": {"train": "sample:sentiment_uci"},
                                    "method": "lora"})
    paths = compare_report(rows, tmp_path, title="render check", config=config)
    png = screenshot(paths["report_html"], tmp_path / "shot.png", width=1280, height=2600)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2600, 1280)

    def count(rgb, tolerance=30):
        return int((np.abs(pixels - np.array(rgb)).sum(-1) < tolerance).sum())

    assert count((31, 119, 180)) > 300   # tab:blue: train-loss lines and the scatter points
    assert count((255, 127, 14)) > 200   # tab:orange: validation-loss curves
    assert count((253, 236, 234), tolerance=6) == 0   # no failed-row background: no method failed
