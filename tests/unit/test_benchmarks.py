"""`tunelab eval RUN --benchmark`: lm-eval-harness tasks on a run and its base, compared per document."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import write_jsonl

import tunelab

pytest.importorskip("lm_eval")

LIMIT = 40


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama):
    """A LoRA SFT run of the tiny Llama on review sentences (so the sentiment task can move), in fp32."""
    import yaml

    root = tmp_path_factory.mktemp("benchmarks")
    rows = [{"prompt": f"Review: {r['text']}\nIs this review positive or negative? Answer:", "response": r["label"]}
            for r in (json.loads(x) for x in (Path(tunelab.__file__).parent / "data" / "samples" /
                                               "sentiment_uci.jsonl").read_text().splitlines()[-120:])]
    cfg = {"model": {"name": str(tiny_llama), "max_length": 64}, "task": "sft", "method": {"name": "lora", "r": 4},
           "data": {"train": str(write_jsonl(root / "sft.jsonl", rows)), "leakage": "ignore",
                    "split": {"validation": 0.1, "test": 0.1, "seed": 1}},
           "train": {"max_steps": 12, "lr": 2e-2, "batch_size": 8, "precision": "fp32"},
           "eval": {"max_new_tokens": 2, "max_generate": 2, "forgetting": None},
           "output": {"dir": str(root / "run")}}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tunelab.train(root / "run.yaml").path


def _cli(capsys, *args) -> tuple[int, str, str]:
    from tunelab.cli import main

    code = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _harness(tmp_path, model_args: str, task: str) -> dict:
    """The harness's own command line on the same model and task: its results file."""
    from tunelab.benchmarks import BATCH_SIZE, SHIPPED

    out = tmp_path / f"harness-{len(list(tmp_path.iterdir()))}"
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
                           "--tasks", task, "--include_path", str(SHIPPED), "--limit", str(LIMIT),
                           "--batch_size", str(BATCH_SIZE), "--device", "cpu", "--output_path", str(out)],
                          capture_output=True, text=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    return json.loads(results.read_text())["results"][task]


def test_a_benchmark_gives_the_harness_command_lines_number_and_a_paired_comparison(lora_run, tiny_llama, tmp_path,
                                                                               capsys, monkeypatch):
    code, out, err = _cli(capsys, lora_run, "--benchmark", "tunelab_sentiment", "--limit", LIMIT, "--json")
    assert code == 0, err
    row = json.loads(out)["tunelab_sentiment"]["metrics"]["acc"]
    run = _harness(tmp_path, f"pretrained={tiny_llama},peft={lora_run / 'model'},tokenizer={lora_run / 'model'},"
                             "dtype=float32", "tunelab_sentiment")
    assert row["run"] == pytest.approx(run["acc,none"], abs=1e-4)  # the base goes through the same code
    assert row["difference"] == pytest.approx(row["run"] - row["base"], abs=1e-12)
    low, high = row["interval"]
    assert low <= row["difference"] <= high and 0 < row["p"] <= 1 and row["documents"] == LIMIT
    assert row["tied"] == (row["p"] >= 0.05)
    # metrics.json keeps what --json printed
    recorded = json.loads((lora_run / "metrics.json").read_text())["benchmarks"]["tunelab_sentiment"]
    assert recorded["metrics"]["acc"] == row and recorded["documents"] == LIMIT

    # a second call reads both results from their caches: the harness is not run again
    import tunelab.benchmarks as benchmarks

    monkeypatch.setattr(benchmarks, "_evaluate", lambda *a, **k: pytest.fail("the harness ran again"))
    code, again, err = _cli(capsys, lora_run, "--benchmark", "tunelab_sentiment", "--limit", LIMIT, "--json")
    assert code == 0, err
    assert json.loads(again) == json.loads(out)
    code, text, _ = _cli(capsys, lora_run, "--benchmark", "tunelab_sentiment", "--limit", LIMIT)
    assert text.startswith(f"tunelab_sentiment acc: run {row['run']:.4f} · base {row['base']:.4f}")
    assert ("tied with the base" in text) == row["tied"]


def test_bad_benchmarks_get_one_sentence(lora_run, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: broken\ndoc_to_text: [unclosed\n")
    for args, words in [(["--benchmark", "no_such_benchmark_task"], "neither a task of lm-eval-harness"),
                        (["--benchmark", str(broken)], f"task YAML {broken}: the harness cannot read it"),
                        (["--benchmark", str(tmp_path / "missing.yaml")], "no such task file or folder"),
                        (["--benchmark", "tunelab_sentiment", "--limit", "0"], "--limit 0 scores no document"),
                        (["--benchmark", "tunelab_sentiment", "--limit", "2.5"], "neither a whole number")]:
        code, out, err = _cli(capsys, lora_run, *args)
        assert code == 2 and words in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


def test_a_hub_task_without_its_data_offline_is_one_sentence(lora_run):
    """hellaswag's data is on the Hub, not cached here: offline, one sentence and exit 2 (in a process of its own:
    datasets reads HF_DATASETS_OFFLINE when imported)."""
    done = subprocess.run([sys.executable, "-m", "tunelab", "eval", str(lora_run), "--benchmark", "hellaswag",
                           "--limit", "2"], capture_output=True, text=True,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "its data is on the Hugging Face Hub and not in the cache here" in done.stderr
    assert "Traceback" not in done.stderr


def test_compare_reports_each_entrys_benchmark_change_from_the_base(make_config, tiny_llama, tmp_path):
    """eval.benchmarks in a compare: each trained entry is scored with its base after training, the report gets a
    column and a plot of the change with its interval, the verdict a sentence; the zero-shot entry is its base."""
    from tunelab.compare import compare

    rows = [{"prompt": f"say {w} {i}", "response": f"{w} {i}"} for i in range(8) for w in ["good", "bad", "fine"]]
    out = tmp_path / "cmp"
    path = make_config(method={"name": "lora", "r": 4}, name="bench", task="sft",
                       model={"name": str(tiny_llama), "max_length": 40},
                       data={"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)),
                             "split": {"validation": 0.1, "test": 0.25}},
                       train={"max_steps": 3, "precision": "fp32"},
                       eval={"max_new_tokens": 2, "forgetting": None, "benchmarks": ["tunelab_sentiment"],
                             "benchmark_limit": 16},
                       compare={"methods": ["base", "lora"], "dir": str(out)})
    result = compare(path)
    rows = {r["name"]: r for r in result["rows"]}
    assert all(r["status"] == "trained" for r in rows.values()), [r.get("error") for r in rows.values()]
    lora = json.loads((out / "runs" / "lora" / "metrics.json").read_text())["benchmarks"]["tunelab_sentiment"]
    acc = lora["metrics"]["acc"]
    assert lora["documents"] == 16 and {"run", "base", "difference", "interval", "p", "tied"} <= set(acc)
    assert "benchmarks" not in json.loads((out / "runs" / "base" / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    head = next(line for line in report.splitlines() if line.startswith("| entry"))
    assert "| tunelab_sentiment acc |" in head
    verdict = ", tied" if acc["tied"] else ", p "
    assert f"{acc['run']:.3f} ({acc['difference']:+.3f} vs base{verdict}" in report
    assert "Benchmark tunelab_sentiment (acc, lm-eval-harness" in report
    assert (out / "benchmarks.png").stat().st_size > 1000 and "Benchmarks (lm-eval-harness)" in report
