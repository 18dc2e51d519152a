"""`tunelab compare`: entries become run configs, failures are rows, finished runs are reused by config hash, and
the report holds the table, the plots and conclusions drawn from the numbers."""
from __future__ import annotations

import base64
import json
import re

import pytest

from tunelab import stats
from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.report import overfitting
from tunelab.verdict import analyze


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
    assert "| icl_k |" in md and "FAILED" in md and "## Verdict" in md and "95% interval" in md
    html = (out / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    # every finished entry kept its per-example predictions, and the report's interval is the one they give
    saved = json.loads((out / "results.json").read_text())["analysis"]
    groups = {g["name"]: g for g in saved["groups"]}
    for name in ("features", "head", "icl_0"):
        pred = [json.loads(x) for x in (out / "runs" / name / "predictions_test.jsonl").read_text().split("\n") if x]
        refs, got = [str(x["label"]) for x in pred], [str(x["predicted"]) for x in pred]
        metric = stats.metric_fn(saved["metric"], rows[name]["labels"])
        assert groups[name]["interval"] == pytest.approx(list(stats.interval(metric, refs, [got])), abs=1e-12)
        assert groups[name]["interval"][0] <= groups[name]["mean"] <= groups[name]["interval"][1]
        assert rows[name]["test"]["inference"]["per_1000_s"] > 0
    assert rows["icl_0"]["test"]["inference"]["prompt_tokens"] > rows["features"]["test"]["inference"]["prompt_tokens"]
    assert "http" not in html.replace("http-equiv", "")  # self-contained: nothing fetched when opened

    # adding a method reuses the finished runs (same config hash) and trains only the new one
    stamps = {n: (out / "runs" / n / "status.json").stat().st_mtime for n in ("features", "head", "icl_0")}
    code = main(["compare", str(path), "--methods", "features,head,icl_0,full"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "features: cached" in printed and "full: training" in printed
    verdict = printed.split("verdict:")[1].strip().splitlines()
    assert 2 <= len(verdict) <= 3 and verdict[0].strip().startswith("Best test macro F1: ") and "**" not in printed
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


def test_seeds_and_fractions_become_entries(make_config, tmp_path):
    from tunelab.compare import entry_configs

    path = make_config(method="lora", name="grid", compare={"methods": ["lora", "icl_0", "icl_k", "icl_retrieved"],
                                                            "seeds": [7, 8],
                                                            "fractions": [0.25, 0.5]})
    config = load_config(path)
    entries = entry_configs(config, path, tmp_path / "out", n_train=200)
    names = [e.name for e in entries]
    # the first seed at the full data keeps the plain name (a one-seed compare's runs are reused); zero-shot
    # entries read no training data and draw nothing at random: one run; retrieved demonstrations: one per size
    assert names == ["lora-frac0.25", "lora-frac0.25-seed8", "lora-frac0.5", "lora-frac0.5-seed8", "lora",
                     "lora-seed8", "icl_0", "icl_k-frac0.25", "icl_k-frac0.25-seed8", "icl_k-frac0.5",
                     "icl_k-frac0.5-seed8", "icl_k", "icl_k-seed8", "icl_retrieved-frac0.25", "icl_retrieved-frac0.5",
                     "icl_retrieved"]
    by = {e.name: e for e in entries}
    assert by["lora-frac0.25-seed8"].config.data.max_train_examples == 50
    assert by["lora"].config.data.max_train_examples is None
    assert by["lora-seed8"].config.train.seed == 8 and by["lora"].config.train.seed == config.train.seed
    assert by["icl_k-seed8"].config.method.seed == 8 and by["icl_k"].config.method.seed == 0
    assert {e.method for e in entries} == {"lora", "icl_0", "icl_k", "icl_retrieved"}
    with pytest.raises(ConfigError, match="fractions must lie in"):
        load_config(make_config(name="bad", compare={"methods": ["lora"], "fractions": [0, 0.5]}))


def test_a_seedless_method_is_trained_once_for_all_seeds(make_config, tmp_path):
    """features declares SEEDLESS (frozen features, an lbfgs logistic regression): a 2-seed compare trains it once
    — and two seeds do give the same classifier, so nothing is lost."""
    import tunelab
    from tunelab.compare import entry_configs

    path = make_config(method="lora", name="seeds", compare={"methods": ["features", "lora"], "seeds": [7, 8]})
    assert [e.name for e in entry_configs(load_config(path), path, tmp_path / "out")] == ["features", "lora",
                                                                                         "lora-seed8"]
    runs = [tunelab.train(make_config(method="features", name=f"f{seed}", train={"seed": seed})).path
            for seed in (7, 8)]
    predictions = [(run / "predictions_test.jsonl").read_text() for run in runs]
    assert predictions[0] == predictions[1] and json.loads(predictions[0].split("\n")[0])


def test_learning_curve_subsets_are_nested_and_stratified():
    import pandas as pd

    from tunelab.data.load import subsample

    frame = pd.DataFrame({"text": [f"t{i}" for i in range(1000)], "label": ["a"] * 800 + ["b"] * 200})
    small, large = subsample(frame, 100, 3, "label"), subsample(frame, 500, 3, "label")
    assert set(small["text"]) <= set(large["text"])
    assert small["label"].value_counts().to_dict() == {"a": 80, "b": 20}
    assert large["label"].value_counts().to_dict() == {"a": 400, "b": 100}
    assert not subsample(frame, 100, 4, "label")["text"].equals(small["text"])


def _fake_run(tmp_path, name, refs, preds, **extra):
    """A finished classification row whose run folder holds only predictions_test.jsonl."""
    run = tmp_path / name
    run.mkdir(parents=True)
    (run / "predictions_test.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": r, "predicted": p}) + "\n"
                                                        for i, (r, p) in enumerate(zip(refs, preds))))
    accuracy = sum(r == p for r, p in zip(refs, preds)) / len(refs)
    row = {"name": name, "entry": name, "seed": 42, "fraction": 1.0, "run_dir": str(run), "method": name,
           "model": "m", "status": "trained", "task": "classify", "metric": "accuracy", "labels": ["neg", "pos"],
           "test": {"accuracy": accuracy, "inference": {"per_1000_s": 1.0, "prompt_tokens": 20}}, "flags": [],
           "params": {"trainable": 1000, "total": 10_000, "percent": 10.0}, "train_s": 10.0, "stored": 4000,
           "n_train": 2400, "records": []}
    for key, value in extra.items():
        row[key] = {**row[key], **value} if isinstance(value, dict) else value
    return row


def _flip(refs, wrong):
    """Predictions wrong exactly on the examples in `wrong`."""
    return [("pos" if r == "neg" else "neg") if i in wrong else r for i, r in enumerate(refs)]


@pytest.mark.parametrize("differ,tied", [(2, True), (60, False)])
def test_verdict_calls_a_noise_sized_difference_tied(tmp_path, differ, tied):
    """600 test examples; B is wrong on `differ` more examples than A. 2 of 600 is noise (McNemar p = 0.5), 60 of 600
    is not (p ≈ 1.7e-18): the verdict must say tied for the first and must not for the second."""
    refs = ["neg", "pos"] * 300
    base_wrong = set(range(0, 600, 10))  # both wrong on these 60
    a = _fake_run(tmp_path, "a", refs, _flip(refs, base_wrong), params={"trainable": 5_000_000},
                  test={"inference": {"per_1000_s": 9.0, "engine": "torch (fp32, adapter merged into the base)"}})
    b = _fake_run(tmp_path, "b", refs, _flip(refs, base_wrong | set(range(1, 1 + 10 * differ, 10))),
                  test={"inference": {"per_1000_s": 2.0, "engine": "vllm 0.32.0 (fp32, merged/)"}})
    analysis = analyze([a, b])
    assert analysis["best"] == "a" and analysis["test"] == "McNemar (exact)"
    vs = next(g for g in analysis["groups"] if g["name"] == "b")["vs_best"]
    assert (vs["only_a_right"], vs["only_b_right"]) == (differ, 0)
    assert vs["tied"] is tied
    text = "\n".join(analysis["sentences"])
    # the costs name the engine that wrote each entry's answers
    assert "a: torch (fp32, adapter merged into the base); b: vllm 0.32.0 (fp32, merged/)." in text
    if tied:
        assert "Statistically tied with it" in text and "**b**" in text
        # among the tied, the cheaper one to run is recommended
        assert "Recommendation: **b**" in text and "2.0 s per 1,000" in text
    else:
        assert "Statistically tied" not in text and "not by chance" in text
        assert "Recommendation: **a**" in text


def test_verdict_on_several_seeds_and_generation_metrics(tmp_path):
    refs = ["neg", "pos"] * 50
    rows = [_fake_run(tmp_path, f"a{s}", refs, _flip(refs, set(range(s, 100, 7))), entry="a", seed=s)
            for s in (1, 2, 3)]
    analysis = analyze(rows)
    (group,) = analysis["groups"]
    assert group["runs"] == ["a1", "a2", "a3"] and len(group["values"]) == 3 and group["std"] > 0
    assert group["mean"] == pytest.approx(sum(group["values"]) / 3)
    assert group["interval"][0] < group["mean"] < group["interval"][1]
    assert "mean of 3 seeds" in analysis["sentences"][0]
    # chrF (a corpus metric): intervals and a paired permutation test instead of McNemar
    gen = []
    for name, outputs in (("good", ["le chat noir", "la maison", "bonjour"] * 10), ("poor", ["xx", "yy", "zz"] * 10)):
        run = tmp_path / f"g-{name}"
        run.mkdir()
        (run / "predictions_test.jsonl").write_text("".join(
            json.dumps({"prompt": "p", "reference": r, "generated": g}) + "\n"
            for r, g in zip(["le chat noir", "la maison", "bonjour"] * 10, outputs)))
        gen.append({"name": name, "entry": name, "fraction": 1.0, "run_dir": str(run), "method": name, "model": "m",
                    "status": "trained", "task": "sft", "metric": "loss", "flags": [], "records": [],
                    "test": {"chrf": 100.0 if name == "good" else 0.0, "loss": 1.0}, "params": {"trainable": 0}})
    analysis = analyze(gen)
    assert (analysis["metric"], analysis["best"], analysis["test"]) == ("chrf", "good", "paired permutation")
    # the resampled metric (from cached per-sentence statistics) is the metric the run reports
    from tunelab.metrics import generation_metrics

    refs, hyps = ["le chat noir", "la maison", "bonjour"], ["le chien noir", "la maisons", "bon"]
    reported = generation_metrics(refs, hyps)
    for key in ("chrf", "bleu", "rouge_l", "exact_match"):
        assert stats.metric_fn(key)(refs, hyps) == pytest.approx(reported[key], abs=1e-9)
    assert next(g for g in analysis["groups"] if g["name"] == "poor")["vs_best"]["p"] < 0.01


def _curve_rows(tmp_path):
    """features flat at 0.85; lora 0.70 → 0.95 across four training sizes: the curves cross between 240 and 600."""
    refs = ["neg", "pos"] * 300
    scores = {"features": [0.85, 0.85, 0.86, 0.86], "lora": [0.70, 0.80, 0.90, 0.95]}
    rows = []
    for entry, accs in scores.items():
        for fraction, n, acc in zip((0.1, 0.25, 0.5, 1.0), (240, 600, 1200, 2400), accs):
            suffix = "" if fraction == 1 else f"-frac{fraction:g}"
            wrong = set(range(0, 600))
            wrong = set(sorted(wrong, key=lambda i: (i * 7919) % 600)[:round((1 - acc) * 600)])
            rows.append(_fake_run(tmp_path, f"{entry}{suffix}", refs, _flip(refs, wrong), entry=entry,
                                  fraction=fraction, n_train=n))
    return rows


def test_crossover_sentence_matches_the_curves(tmp_path):
    analysis = analyze(_curve_rows(tmp_path))
    curves = analysis["curves"]
    assert [p["examples"] for p in curves["lora"]] == [240, 600, 1200, 2400]
    assert [round(p["mean"], 4) for p in curves["lora"]] == [0.70, 0.80, 0.90, 0.95]
    text = "\n".join(analysis["sentences"])
    assert ("**lora** overtakes **features** between 600 and 1,200 labelled examples (lora: 0.8000 → 0.9000; "
            "features: 0.8500 → 0.8600)") in text
    assert "**lora** went from 0.9000 with 1,200 to 0.9500 with 2,400 labelled examples (+0.0500) — still improving" \
        in text


@pytest.mark.skipif(__import__("tunelab.plots", fromlist=["find_browser"]).find_browser() is None,
                    reason="no headless Chromium (apt-get install chromium-headless-shell; CI installs it)")
def test_report_renders_with_its_plots_in_headless_chromium(tmp_path):
    """Open report.html in a real browser: the screenshot must show the plots — matplotlib's blue (loss curves,
    scatter points, the first learning curve), orange (validation loss, the second learning curve) and the red
    Pareto front — which only appear if the embedded PNGs decode and render."""
    import numpy as np
    from PIL import Image

    from tunelab.config import Config
    from tunelab.plots import screenshot
    from tunelab.report import compare_report

    rows = _curve_rows(tmp_path / "runs")
    curve = _records([(1, 0.30), (2, 0.28), (3, 0.35)], [(0.5, 0.6), (1, 0.35), (2, 0.2), (3, 0.1)])
    for r in rows:
        r["records"] = curve
    rows[-1]["test"]["inference"]["per_1000_s"] = 3.0
    analysis = analyze(rows)
    config = Config.model_validate({"model": {"name": "minilm"}, "data": {"train": "sample:sentiment_uci"},
                                    "method": "lora", "compare": {"fractions": [0.1, 0.25, 0.5, 1.0]}})
    paths = compare_report(rows, analysis, tmp_path, title="render check", config=config)
    assert set(paths["plots"]) == {"loss", "metric_vs_cost", "metric_vs_params", "learning_curves"}
    html = (tmp_path / "report.html").read_text()
    assert "overtakes" in html and "Learning curves" in html
    png = screenshot(paths["report_html"], tmp_path / "shot.png", width=1280, height=3400)
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (3400, 1280)

    def count(rgb, tolerance=30):
        return int((np.abs(pixels - np.array(rgb)).sum(-1) < tolerance).sum())

    assert count((31, 119, 180)) > 300   # tab:blue
    assert count((255, 127, 14)) > 200   # tab:orange
    assert count((214, 39, 40)) > 50     # tab:red: the Pareto front
    # no failed-row background (a failed row paints ~30,000 pixels; the red line's anti-aliasing a few dozen)
    assert count((253, 236, 234), tolerance=6) < 500
    # the learning-curve plot's own PNG: lora's orange line is drawn
    curve_png = np.asarray(Image.open(paths["plots"]["learning_curves"]).convert("RGB")).astype(int)
    assert int((np.abs(curve_png - np.array((255, 127, 14))).sum(-1) < 30).sum()) > 100  # lora's line


def test_generative_compare_with_prompting_baselines(make_config, tiny_llama, tiny_bert, tmp_path):
    """sft entries side by side: the base model zero-shot, k random and k retrieved demonstrations, and LoRA; chrF
    with intervals from the saved predictions, inference cost with prompt tokens, and demonstrations that do not
    fit counted."""
    from conftest import write_jsonl
    from tunelab.compare import compare

    words = ["good", "bad", "great", "awful", "fine", "nice", "poor", "okay"]
    rows = [{"prompt": f"say {w} {i}", "response": f"{w} {i}"} for i in range(8) for w in words]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "gen"
    path = make_config(method={"name": "lora", "r": 4}, name="gen", model={"name": str(tiny_llama),
                                                                           "max_length": 40},
                       task="sft", data={"train": str(data), "split": {"validation": 0.1, "test": 0.25}},
                       train={"max_steps": 3}, eval={"max_new_tokens": 3},
                       compare={"methods": ["base", "icl_k", "icl_retrieved", "lora"], "shots": 3,
                                "icl": {"retriever": str(tiny_bert)}, "dir": str(out),
                                # the prompting entries get max_length ≥ 512 unless told: here three
                                # demonstrations cannot fit
                                "overrides": {"icl_k": {"model.max_length": 64}}})
    result = compare(path)
    rows = {r["name"]: r for r in result["rows"]}
    assert all(r["status"] == "trained" for r in rows.values()), [r.get("error") for r in rows.values()]
    analysis = result["analysis"]
    assert analysis["metric"] == "chrf" and analysis["test"] == "paired permutation"
    tokens = {n: rows[n]["test"]["inference"]["prompt_tokens"] for n in rows}
    assert tokens["icl_k"] > tokens["base"] == tokens["lora"]  # demonstrations are paid for on every request
    assert rows["base"]["params"]["trainable"] == 0 and rows["lora"]["params"]["trainable"] > 0
    demos = rows["icl_k"]["test"]["demonstrations"]
    assert demos["examples"] == rows["icl_k"]["test"]["examples"]
    # max_length 64 cannot hold three demonstrations: some were dropped, and the count says how many
    assert demos["demonstrations_dropped"] > 0 and demos["examples_with_fewer_demonstrations"] > 0
    groups = {g["name"]: g for g in analysis["groups"]}
    for name in rows:
        pred = [json.loads(x) for x in (out / "runs" / name / "predictions_test.jsonl").read_text().split("\n") if x]
        interval = stats.interval(stats.metric_fn("chrf"), [p["reference"] for p in pred],
                                  [[p["generated"] for p in pred]])
        assert groups[name]["interval"] == pytest.approx(list(interval), abs=1e-9)
    text = "\n".join(analysis["sentences"])
    assert "Without any training" in text and "Against it, same test examples (paired permutation)" in text
    # the trained entry is tested against the best entry that trains nothing
    assert groups["lora"]["vs_prompting"]["entry"] == analysis["prompting"] in ("base", "icl_k", "icl_retrieved")
    assert "vs_prompting" not in groups["base"]


@pytest.mark.parametrize("key", ["f1_macro", "precision_macro", "recall_macro"])
def test_macro_metrics_are_scikit_learn_s(key):
    """The resampling tests' macro metrics (counted in numpy for speed) equal scikit-learn's on random subsets: with
    the label list given (a label never predicted, a prediction outside the list) and without it."""
    import numpy as np
    from sklearn.metrics import precision_recall_fscore_support

    which = {"precision_macro": 0, "recall_macro": 1, "f1_macro": 2}[key]
    rng = np.random.default_rng(0)
    labels = ["neg", "neu", "pos", "never"]
    for n in (1, 2, 7, 50):
        for _ in range(20):
            y = rng.choice(["neg", "neu", "pos"], n).astype(object)
            p = rng.choice(["neg", "neu", "pos", "other"], n).astype(object)
            for given in (labels, None):
                expected = precision_recall_fscore_support(y, p, labels=given, zero_division=0)[which].mean()
                assert stats.metric_fn(key, given)(y, p) == pytest.approx(float(expected), abs=1e-12)
