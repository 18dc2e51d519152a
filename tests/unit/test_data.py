import json
import re

import pandas as pd
import pytest

from conftest import sample_rows, write_jsonl
from tunelab.config import Config
from tunelab.data import load_eval_table
from tunelab.data.leakage import normalise
from tunelab.data.readers import read_table
from tunelab.errors import DataError
from tunelab.tasks import load_splits


def config(train, **data) -> Config:
    return Config.model_validate({"model": {"name": "x"}, "method": "full", "data": {"train": str(train), **data}})


@pytest.fixture
def rows():
    return sample_rows(200)


def test_all_formats_read_the_same_rows(tmp_path, rows):
    import datasets

    frame = pd.DataFrame(rows)
    write_jsonl(tmp_path / "d.jsonl", rows)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "d_ds"))
    for name in ("d.jsonl", "d.csv", "d.parquet", "d.json", "d_ds"):
        got = read_table(str(tmp_path / name))
        assert got["text"].tolist() == frame["text"].tolist(), name
        assert got["label"].tolist() == frame["label"].tolist(), name


def test_shipped_sample_split_is_stratified_deterministic_and_leak_free():
    cfg = config("sample:sentiment_uci")
    a, b = load_splits(cfg), load_splits(cfg)
    assert a.train["text"].tolist() == b.train["text"].tolist()
    assert sum(a.sizes().values()) == 3000 and a.labels == ["negative", "positive"]
    assert abs(len(a.test) / 3000 - 0.2) < 0.02 and abs(len(a.validation) / 3000 - 0.1) < 0.02
    share = a.test["label"].value_counts(normalize=True)
    assert abs(share["positive"] - 0.5) < 0.02
    assert a.leaks == {"validation": 0, "test": 0}  # the sample has duplicate texts; grouping keeps them together
    assert not set(a.train["_text_key"]) & set(a.test["_text_key"])
    other = load_splits(config("sample:sentiment_uci", split={"seed": 3}))
    assert other.test["text"].tolist() != a.test["text"].tolist()


def test_group_by_keeps_each_group_on_one_side():
    s = load_splits(config("sample:sentiment_uci", split={"group_by": "source", "validation": 0.3, "test": 0.3,
                                                           "stratify": False},
                              leakage="ignore"))
    sides = [set(s.train["source"]), set(s.validation["source"]), set(s.test["source"])]
    assert sides[0].isdisjoint(sides[1]) and sides[0].isdisjoint(sides[2]) and sides[1].isdisjoint(sides[2])


def test_missing_label_column_names_file_and_columns(tmp_path, rows):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": r["text"], "sentiment": r["label"]} for r in rows])
    with pytest.raises(DataError, match=r"t\.jsonl: column `label` \(set by data.label\) not found; its columns are: "
                                        r"text, sentiment"):
        load_splits(config(path))


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e\.jsonl is empty"):
        load_splits(config(tmp_path / "e.jsonl"))


def test_bad_json_line_is_named(tmp_path, rows):
    path = write_jsonl(tmp_path / "b.jsonl", rows[:3])
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r"b\.jsonl, line 4: not valid JSON"):
        read_table(str(path))


def test_a_cut_short_gzip_file_is_one_sentence(tmp_path, rows):
    """A .jsonl.gz cut short (a copy interrupted): the table reader and the stream reader name the file, no
    EOFError."""
    import gzip

    from tunelab.data.stream import open_rows

    whole = gzip.compress("\n".join(json.dumps(r) for r in rows * 20).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: the gzip stream is damaged or cut short"):
        read_table(str(cut))
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz, line \d+: the gzip stream is damaged or cut short"):
        list(open_rows(str(cut)))


def test_one_jsonl_reader_names_the_line_or_reports_it(tmp_path):
    """tunelab.jsonl is every JSON Lines read: a bad line is a DataError naming file and line (a JSON value that is
    not an object too — never its repr), or with on_bad a call and a skip; limit stops early; missing_ok."""
    from tunelab import jsonl

    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n{"a": 2\n{"a": 3}\n')
    with pytest.raises(DataError, match=r"p\.jsonl, line 3: expected a JSON object, got list"):
        jsonl.read(path)
    bad = []
    assert jsonl.read(path, on_bad=lambda n, why: bad.append((n, why))) == [{"a": 1}, {"a": 3}]
    assert bad == [(3, "expected a JSON object, got list"), (4, "not valid JSON (Expecting ',' delimiter)")]
    assert [n for n, _ in jsonl.rows(path, on_bad=lambda *a: None, limit=1)] == [1]
    assert jsonl.read(tmp_path / "none.jsonl", missing_ok=True) == []


def test_label_outside_known_set_names_row(tmp_path, rows):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test_rows = [dict(r) for r in sample_rows()[-20:]]
    test_rows[6]["label"] = "neutral"
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    with pytest.raises(DataError, match=r"test\.jsonl, row 7: label 'neutral' is not one of the known labels "
                                        r"\(negative, positive\)"):
        load_splits(config(train, test=str(test)))


def test_empty_text_names_rows(tmp_path, rows):
    rows = [dict(r) for r in rows]
    rows[4]["text"] = "  "
    with pytest.raises(DataError, match=r"row 5: `text` is empty"):
        load_splits(config(write_jsonl(tmp_path / "t.jsonl", rows)))


def test_leakage_between_given_files_is_refused_warned_or_dropped(tmp_path, rows, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dup = dict(rows[0], text=rows[0]["text"].upper() + "  !")  # same text after normalisation
    test = write_jsonl(tmp_path / "test.jsonl", [dup] + sample_rows()[-10:])
    with pytest.raises(DataError, match=r"leakage: 1 test example\(s\) also appear in train"):
        load_splits(config(train, test=str(test)))
    s = load_splits(config(train, test=str(test), leakage="warn"))
    assert s.leaks["test"] == 1 and len(s.test) == 11
    # one plain line, not a Python UserWarning with a source path
    assert "tunelab: warning: leakage: 1 test example(s)" in capsys.readouterr().out
    s = load_splits(config(train, test=str(test), leakage="drop"))
    assert len(s.test) == 10 and dup["text"] not in set(s.test["text"])
    assert "dropped 1 of 11 test example(s)" in capsys.readouterr().out


def test_integer_labels_and_explicit_label_order(tmp_path, rows):
    path = write_jsonl(tmp_path / "i.jsonl", [{"text": r["text"], "label": int(r["label"] == "positive") * 10}
                                              for r in rows])
    assert load_splits(config(path)).labels == ["0", "10"]
    assert load_splits(config(path, labels=["10", "0"])).labels == ["10", "0"]
    assert load_splits(config(path, labels=[10, 0])).labels == ["10", "0"]  # YAML ints mean the same


def test_eval_table_checks_against_run_labels(tmp_path, rows):
    path = write_jsonl(tmp_path / "x.jsonl", rows[:5] + [{"text": "meh", "label": "mixed"}])
    with pytest.raises(DataError, match="row 6: label 'mixed'"):
        load_eval_table(str(path), config(path), ["negative", "positive"])


def test_normalise():
    assert normalise("  Great   PHONE!! ") == normalise("great phone") == "great phone"


def test_group_by_split_still_reports_duplicate_texts_across_groups():
    # The same short review ("Very disappointing.") occurs in two sources: grouping by source cannot keep it
    # together, and the leakage check must say so.
    with pytest.raises(DataError, match="also appear in train"):
        load_splits(config("sample:sentiment_uci", split={"group_by": "source", "validation": 0.3, "test": 0.3,
                                                           "stratify": False}))


def test_data_check_reports_balance_lengths_duplicates_and_leakage(make_config, tmp_path, capsys):
    from tunelab.cli import main

    rows = sample_rows(240)
    train = write_jsonl(tmp_path / "train-dup.jsonl", rows + [dict(rows[0])])  # one repeated text
    val = write_jsonl(tmp_path / "val.jsonl", [rows[5], rows[150]] + sample_rows()[2000:2010])  # 2 leak from train
    path = make_config(data={"train": str(train), "validation": str(val), "split": {"validation": 0, "test": 0.2,
                                                                                   "seed": 1}}, name="chk")
    assert main(["data", "check", str(path)]) == 1  # leakage: exit status 1
    out = capsys.readouterr().out
    assert "LEAKAGE: 2 validation example(s) also in train" in out
    assert "duplicates: 1 repeated text(s)" in out
    assert re.search(r"labels: negative \d+ \(\d+%\), positive \d+", out)
    assert main(["data", "check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["validation"]["examples"] == 12 and report["leakage"]["validation"]["examples"] == 2
    tokens = report["splits"]["train"]["tokens"]
    assert 0 < tokens["min"] <= tokens["median"] <= tokens["p95"] <= tokens["max"]
    clean = make_config(name="clean")
    assert main(["data", "check", str(clean)]) == 0


def _hub_cache(tmp_path, monkeypatch, name: str, splits: dict) -> None:
    """Put `name` (ORG/NAME) into a fresh local datasets cache exactly where `datasets.load_dataset` keeps a Hub
    dataset it downloaded, built offline with the library's own json builder; the Hub itself stays offline."""
    import datasets
    import huggingface_hub

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    files = {split: str(write_jsonl(tmp_path / f"hub-{split}.jsonl", rows)) for split, rows in splits.items()}
    datasets.load_dataset("json", data_files=files, cache_dir=str(cache))
    org, short = name.split("/")
    built = cache / "json"
    next(built.iterdir()).rename(built / "default")
    built.rename(cache / f"{org}___{short}")
    for arrow in (cache / f"{org}___{short}").rglob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", f"{short}-", 1)))


def test_hub_datasets_are_read_by_id_and_their_fingerprint_is_recorded(tmp_path, monkeypatch, make_config, capsys):
    import tunelab
    from tunelab.cli import main

    rows = sample_rows(200)
    _hub_cache(tmp_path, monkeypatch, "acme/reviews", {"train": rows[:160], "test": rows[160:]})
    assert list(read_table("hub:acme/reviews:test")["text"]) == [r["text"] for r in rows[160:]]
    run = tunelab.train(make_config(method="head", name="hub", data={"train": "hub:acme/reviews",
                                                                     "test": "hub:acme/reviews:test"},
                                    train={"max_steps": 2}))
    assert run.manifest["examples"]["test"] == 40 and run.manifest["examples"]["train"] + \
        run.manifest["examples"]["validation"] == 160
    assert set(run.manifest["data_files"]) == {"hub:acme/reviews", "hub:acme/reviews:test"}
    assert all(len(h) == 16 for h in run.manifest["data_files"].values())
    # a dataset that was never downloaded, offline: one clear sentence, exit 2, no run directory
    bad = make_config(method="head", name="hub-missing", data={"train": "hub:acme/missing"})
    assert main(["train", str(bad)]) == 2
    # tunelab's own output is the one error sentence (libraries may log around it: their loggers, not tunelab)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tunelab:")]
    assert said[-1].startswith("tunelab: error: hub:acme/missing: the Hugging Face Hub cannot be reached")
    assert not (tmp_path / "runs" / "hub-missing").exists()
    bad = make_config(method="head", name="hub-split", data={"train": "hub:acme/reviews:validation"})
    assert main(["train", str(bad)]) == 2
    assert "hub:acme/reviews:validation: " in capsys.readouterr().err


def test_hub_options_travel_in_the_spec_and_need_hub_data():
    cfg = {"model": {"name": "x"}, "method": "head"}
    data = Config.model_validate({**cfg, "data": {"train": "hub:acme/reviews", "test": "hub:acme/reviews:test",
                                                  "config": "en", "revision": "v1.0"}}).data
    assert data.train == "hub:acme/reviews?config=en&revision=v1.0"
    assert data.test == "hub:acme/reviews:test?config=en&revision=v1.0"
    from tunelab.data.readers import parse_hub

    assert parse_hub(data.test) == ("acme/reviews", "test", {"name": "en", "revision": "v1.0"})
    with pytest.raises(Exception, match="data.config and data.revision apply to hub: data"):
        Config.model_validate({**cfg, "data": {"train": "a.jsonl", "config": "en"}})


def test_streamed_rows_from_files_and_the_hub_cache(tmp_path, monkeypatch):
    """data.streaming's reader: rows one at a time with their row numbers, from JSON Lines, CSV, Parquet and a Hub
    dataset in the local cache (offline), the same type rules as the table readers."""
    import pandas as pd

    from tunelab.data.stream import TextStream, open_rows
    from tunelab.errors import DataError

    rows = [{"text": f"document {i}"} for i in range(5)]
    _hub_cache(tmp_path, monkeypatch, "acme/corpus", {"train": rows})
    assert [t for t in TextStream("hub:acme/corpus", "text").texts()] == [r["text"] for r in rows]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert [n for n, _ in open_rows(str(tmp_path / "d.csv"))] == [2, 3, 4, 5, 6]  # row 1 is the header
    assert [r["text"] for _, r in open_rows(str(tmp_path / "d.parquet"))] == [r["text"] for r in rows]
    stream = TextStream(str(tmp_path / "d.csv"), "text", held_out=frozenset({"document 2"}), limit=3)
    assert list(stream.texts()) == ["document 0", "document 1", "document 3"] and stream.counts["leaked"] == 1
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        list(open_rows(str(tmp_path / "bad.jsonl")))
    with pytest.raises(DataError, match=r"data\.streaming reads \.jsonl"):
        open_rows(str(write_jsonl(tmp_path / "x.json", rows)))
