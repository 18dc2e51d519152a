"""Tasks are units: a task written in this test module and registered at run time trains end to end through
`tunelab train` and loads through `tunelab.load` — no edit of train.py, config.py or any other module."""
from __future__ import annotations

import pytest

from conftest import sample_rows, write_jsonl


class LengthBucket:
    """A toy task: is the text shorter than 8 words? The labels come from the text itself; it reuses the shared
    Trainer plumbing (tunelab.trainer) and the classifier's model code."""
    NAME = "length_bucket"
    DESCRIPTION = "short or long text"
    DATA_FIELDS = frozenset({"text"})
    METRICS = ("accuracy",)
    KIND, USE = "classifier", "`tunelab.load`"
    PEFT_TASK_TYPE = "SEQ_CLS"
    AUTO_HEAD = "sequence-classification"
    LABELS = ["long", "short"]

    @staticmethod
    def check(config):
        return [] if config.method.name != "features" else ["the toy task trains with gradients"]

    @classmethod
    def load_splits(cls, config):
        from tunelab.data import Splits, text_table

        frame = text_table(config.data.train, config.data.text)
        frame = frame.assign(label=["short" if len(t.split()) < 8 else "long" for t in frame[config.data.text]])
        n = len(frame)
        return Splits(frame.iloc[: n * 3 // 4], frame.iloc[:0], frame.iloc[n * 3 // 4:], cls.LABELS)

    @classmethod
    def fit(cls, ctx):
        import datasets
        from transformers import DataCollatorWithPadding, Trainer, set_seed

        from tunelab.tasks.classifier import load_model
        from tunelab.trainer import callbacks, fit, prepare_method, training_args

        config = ctx.config
        set_seed(config.train.seed)
        tokenizer, model, new = load_model(ctx.model_dir, cls.LABELS)
        model, params = prepare_method(config, model, new, ctx.model_dir, cls.PEFT_TASK_TYPE)
        train = datasets.Dataset.from_dict({"text": list(ctx.splits.train["text"]),
                                            "labels": [cls.LABELS.index(x) for x in ctx.splits.train["label"]]})
        train = train.map(lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True,
                          remove_columns=["text"])
        trainer = Trainer(model=model, args=training_args(config, ctx.run, has_validation=False), train_dataset=train,
                          data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
                          callbacks=callbacks(config, ctx.run, False))
        return params, fit(trainer, config, ctx.run, ctx.resume, tokenizer, files={"labels.json": '["long", "short"]'})

    @classmethod
    def evaluate(cls, ctx, stats):
        clf = cls.load(ctx.run.path, ctx.config)
        test = ctx.splits.test
        predicted = clf.predict(list(test["text"]))
        return {"test": {"accuracy": sum(p == t for p, t in zip(predicted, test["label"])) / len(test)}}

    @staticmethod
    def load(path, config):
        from tunelab.tasks.classifier import Classifier

        return Classifier.from_saved(path, config)

    @staticmethod
    def evaluate_file(path, config, spec, **_):
        return {}

    @staticmethod
    def report(metrics):
        return [f"test accuracy {metrics['test']['accuracy']:.3f}"]

    @staticmethod
    def token_lengths(config, frame, tokenizer):
        return [len(x) for x in tokenizer(list(frame["text"]))["input_ids"]]


@pytest.fixture
def toy_task():
    from tunelab.tasks import TASKS, register

    register(LengthBucket)
    yield LengthBucket
    TASKS.pop(LengthBucket.NAME)


def test_a_task_registered_elsewhere_trains_end_to_end(toy_task, tiny_bert, tmp_path, capsys):
    import yaml

    import tunelab
    from tunelab.cli import main

    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": r["text"]} for r in sample_rows(200)])
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_bert), "max_length": 32}, "task": "length_bucket", "method": "full",
        "data": {"train": str(data)}, "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")}, "eval": {"forgetting": None}}))
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out  # the task's own report lines
    run = tmp_path / "run"
    assert tunelab.load(run).predict(["ok"]) in (["short"], ["long"])
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.6  # the length of a text is learnable from its tokens


def test_an_unknown_task_is_named_with_the_known_ones(tmp_path):
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    cfg = tmp_path / "x.yaml"
    cfg.write_text("model: {name: minilm}\ndata: {train: a.jsonl}\nmethod: full\ntask: clasify\n")
    with pytest.raises(ConfigError, match="unknown task 'clasify'; did you mean `classify`"):
        load_config(cfg)
