"""Every user mistake a hostile first try found: one sentence naming the file, row, key or folder, exit code 2, no
traceback, and no run directory left behind. Data of the wrong type is refused, never read as its Python repr."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from conftest import sample_rows, write_jsonl
from tunelab.cli import main


def _fails(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.startswith("tunelab: error:"), captured.err
    for fragment in fragments:
        assert fragment in captured.err, captured.err
    return captured.err


def _no_run(tmp_path, name="cfg"):
    return not (tmp_path / "runs" / name).exists()


# ------------------------------------------------------------------------------------------------ the data

def _topics(n_labels: int, per_label: int = 12) -> list[dict]:
    words = [r["text"] for r in sample_rows(per_label * n_labels)]
    return [{"text": f"{words[i]} topic{i % n_labels}", "label": f"t{i % n_labels}"} for i in range(len(words))]


@pytest.mark.parametrize("n_labels", [3, 20])
def test_features_trains_and_predicts_with_many_labels(make_config, tmp_path, n_labels):
    import tunelab

    data = write_jsonl(tmp_path / "topics.jsonl", _topics(n_labels))
    cfg = make_config("features", data={"train": str(data), "split": {"validation": 0.0, "test": 0.25,
                                                                      "stratify": False}, "leakage": "ignore"})
    result = tunelab.train(cfg)
    assert result.metrics["test"]["examples"] > 0
    probs = tunelab.load(result.path).predict_proba(["a text"])[0]
    assert len(probs) == n_labels and abs(sum(probs.values()) - 1) < 1e-5


def test_a_label_only_in_evaluation_data_is_refused_before_training(make_config, tmp_path, capsys):
    rows = sample_rows(120)
    test = write_jsonl(tmp_path / "test.jsonl", sample_rows()[-20:] + [{"text": "so so", "label": "neutral"}])
    cfg = make_config("full", data={"train": str(write_jsonl(tmp_path / "t.jsonl", rows)), "test": str(test),
                                    "labels": ["negative", "neutral", "positive"]})
    _fails(capsys, ["train", str(cfg)], "'neutral' have no training example", "1 in test", "data.labels")
    assert _no_run(tmp_path)


def test_values_of_the_wrong_type_are_refused_with_file_row_and_type(make_config, tmp_path, capsys):
    rows = sample_rows(60)
    lists = tmp_path / "lists.parquet"
    pd.DataFrame({"text": [r["text"].split() for r in rows], "label": [r["label"] for r in rows]}).to_parquet(lists)
    _fails(capsys, ["train", str(make_config("features", data={"train": str(lists)}))],
           "lists.parquet, row 1: `text` holds a list", "60 row(s) like this")
    objects = write_jsonl(tmp_path / "objects.jsonl", [{"text": {"body": r["text"]}, "label": r["label"]}
                                                       for r in rows])
    _fails(capsys, ["train", str(make_config("features", data={"train": str(objects)}))],
           "objects.jsonl, row 1: `text` holds an object")
    floats = write_jsonl(tmp_path / "floats.jsonl", [{"text": r["text"], "label": [0.25, 0.75][i % 2]}
                                                     for i, r in enumerate(rows)])
    _fails(capsys, ["train", str(make_config("features", data={"train": str(floats)}))],
           "floats.jsonl, row 1: label `label` is the number 0.25", "regression")
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": i * 7, "label": r["label"]}
                                                       for i, r in enumerate(rows)])
    _fails(capsys, ["train", str(make_config("features", data={"train": str(numbers)}))],
           "numbers.jsonl, row 1: `text` holds an integer", "data.numbers_as_text")
    assert _no_run(tmp_path)
    # numbers are text only when asked for; integer-valued labels (1.0) are class ids
    ok = make_config("features", data={"train": str(numbers), "numbers_as_text": True, "leakage": "ignore"})
    assert main(["train", str(ok)]) == 0


def test_a_byte_order_mark_reads_the_same_in_every_format(tmp_path):
    from tunelab.data.readers import read_table

    rows = sample_rows(6)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    csv = tmp_path / "bom.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + pd.DataFrame(rows).to_csv(index=False).encode())
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for path in (jsonl, csv, as_json):
        frame = read_table(str(path))
        assert list(frame["text"]) == [r["text"] for r in rows] and "text" in frame.columns, path


def test_a_byte_that_is_not_utf8_is_reported_by_line(tmp_path):
    from tunelab.data.readers import read_table
    from tunelab.errors import DataError

    lines = [json.dumps(r) for r in sample_rows(5)]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes("\n".join(lines[:3]).encode() + b"\n" + b'{"text": "caf\xe9", "label": "positive"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 4: byte 0xe9"):
        read_table(str(bad))
    csv = tmp_path / "bad.csv"
    csv.write_bytes(b"text,label\nfine,positive\ngood,positive\nna\xefve,negative\n")
    with pytest.raises(DataError, match=r"bad.csv, line 4: byte 0xef"):
        read_table(str(csv))


def test_sft_messages_that_are_not_a_list_say_so(make_config, tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": "hello there"}] * 10)
    cfg = make_config({"name": "lora", "r": 4}, task="sft", model={"name": str(tiny_llama)},
                      data={"train": str(data)})
    err = _fails(capsys, ["train", str(cfg)], "row 1: `messages` is text, not a list of {role, content}")
    assert "Expecting value" not in err
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": ["a", "list"], "response": "x"}] * 10)
    cfg = make_config({"name": "lora", "r": 4}, task="sft", model={"name": str(tiny_llama)},
                      data={"train": str(prompts)})
    _fails(capsys, ["train", str(cfg)], "row 1: `prompt` holds a list")


def test_preference_data_with_nothing_usable_says_why(make_config, tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"}
                                                  for i in range(10)])
    cfg = make_config("lora", task="dpo", model={"name": str(tiny_llama)}, data={"train": str(data)})
    _fails(capsys, ["train", str(cfg)], "no usable preference row is left", "10 × chosen and rejected are the "
                                                                              "same text")


# --------------------------------------------------------------------------------- configs, models, folders

def test_config_mistakes_are_messages(make_config, tmp_path, capsys):
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(256)) * 4)
    _fails(capsys, ["train", str(garbage)], "garbage.yaml", "not UTF-8 text")
    _fails(capsys, ["validate", str(garbage)], "not UTF-8 text")
    cfg = make_config("features")
    _fails(capsys, ["train", str(cfg), "--set", "train.lr=[1e-4"], "--set train.lr=[1e-4: the value is not valid "
                                                                      "YAML")
    assert _no_run(tmp_path)


def test_broken_model_folders_are_messages_before_any_run_exists(make_config, tiny_bert, tmp_path, capsys):
    import shutil

    corrupt = tmp_path / "corrupt-model"
    shutil.copytree(tiny_bert, corrupt)
    (corrupt / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    cfg = make_config("full", model={"name": str(corrupt)})
    _fails(capsys, ["train", str(cfg)], "corrupt-model: config.json is not valid JSON")
    unknown = tmp_path / "unknown-model"
    shutil.copytree(tiny_bert, unknown)
    raw = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**raw, "model_type": "brand-new-arch"}))
    cfg = make_config("full", model={"name": str(unknown)})
    _fails(capsys, ["train", str(cfg)], "model_type `brand-new-arch` is an architecture transformers")
    assert _no_run(tmp_path)


def test_output_folders_that_cannot_be_used_are_messages(make_config, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _fails(capsys, ["train", str(make_config("features", output={"dir": str(a_file)}))], "is a file, not a folder")
    _fails(capsys, ["train", str(make_config("features", output={"dir": str(a_file / "run")}))],
           "which is a file")
    # root may write anywhere on a normal file system, but not into /proc
    _fails(capsys, ["train", str(make_config("features", output={"dir": "/proc/tunelab-run"}))],
           "/proc/tunelab-run")
    assert a_file.read_text() == "x"
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails(capsys, ["train", str(make_config("features", output={"dir": str(locked / "run")}))],
               "is not writable")


def test_predict_input_files_that_cannot_be_read_are_messages(make_config, tmp_path, capsys):
    cfg = make_config("features", name="f")
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    run = str(tmp_path / "runs" / "f")
    _fails(capsys, ["predict", run, "--input", str(tmp_path / "missing.txt")], "missing.txt: no such file")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"good film\ncaf\xe9 au lait\n")
    _fails(capsys, ["predict", run, "--input", str(latin)], "latin.txt, line 2: byte 0xe9")
    _fails(capsys, ["eval", run], "--data FILE is required")


def test_icl_prints_no_none_and_warnings_are_one_plain_line(make_config, tiny_llama, tmp_path, capsys):
    import warnings

    from tunelab.cli import _plain_warnings

    cfg = make_config({"name": "icl", "shots": 0}, model={"name": str(tiny_llama)},
                      data={"max_train_examples": 20})
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "training:" in out
    saved = warnings.showwarning
    try:
        _plain_warnings()
        for _ in range(2):
            warnings.warn("something a library says\nwith a second line", UserWarning, stacklevel=1)
        warnings.warn("`old_name` is deprecated, use `new_name`", FutureWarning, stacklevel=1)
        err = capsys.readouterr().err
        assert err == "tunelab: warning: something a library says\n"  # once, no source path, no deprecation
    finally:
        warnings.showwarning = saved


def test_compare_checks_the_data_once_and_stops_with_one_message(make_config, tmp_path, capsys):
    rows = sample_rows(80)
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:5] + sample_rows()[-20:])  # 5 rows leak
    cfg = make_config("features", data={"train": str(train), "test": str(test)},
                      compare={"methods": ["features", "head"], "dir": str(tmp_path / "cmp")})
    err = _fails(capsys, ["compare", str(cfg)], "leakage: 5 test example(s) also appear in train")
    assert err.count("train/eval leakage") == 1 and not (tmp_path / "cmp" / "runs").exists()
