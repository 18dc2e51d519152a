from pathlib import Path

import pytest
import yaml

from tunelab.config import Config, load_config
from tunelab.errors import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.lr is None or config.lr > 0


def test_examples_cover_the_method_ladder():
    methods = {load_config(p).method.name for p in EXAMPLES}
    assert {"features", "head", "last_layers", "full", "lora", "icl"} <= methods


def test_examples_cover_compare_and_search():
    configs = [load_config(p) for p in EXAMPLES]
    compares = {c.task: c.compare for c in configs if c.compare}
    assert {"features", "full", "lora", "icl_0", "icl_k", "icl_retrieved"} <= set(compares["classify"].methods)
    assert {"base", "icl_k", "icl_retrieved", "prompt", "lora", "full"} <= set(compares["sft"].methods)
    assert any(c.compare and c.compare.seeds for c in configs) and any(c.compare and c.compare.fractions
                                                                       for c in configs)
    assert any(c.search and c.search.space for c in configs)


def test_examples_cover_every_generative_method_and_task():
    configs = [load_config(p) for p in EXAMPLES]
    sft_methods = {c.method.name for c in configs if c.task == "sft"}
    assert {"lora", "prefix", "prompt", "ia3", "adapter", "full", "qlora"} <= sft_methods
    from tunelab.config import TASKS

    assert set(TASKS) == {c.task for c in configs}  # every task has an example
    assert any(c.data.datasets and c.data.replay for c in configs)  # multitask with replay
    assert any(c.train.packing for c in configs)


def write(tmp_path, body: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(body)
    return path


BASE = "model: {name: minilm}\ndata: {train: sample:sentiment_uci}\n"


def test_typo_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, BASE + "method: lora\ntrain: {learning_rat: 1e-4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and "`train.learning_rat`: unknown key" in text and "did you mean `lr`" in text


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, BASE + "method: {name: lora, rank: 4}\ntrain: {warmup: 1.5, batch_size: 0}\n"
                                  "eval: {metric: f2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    assert len(problems) == 4, problems
    joined = "\n".join(problems)
    for key in ("`method.rank`", "`train.warmup`", "`train.batch_size`", "`eval.metric`"):
        assert key in joined
    assert "did you mean `r`" in joined


def test_unknown_method_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'lorax'.*features, head, last_layers, full, lora"):
        load_config(write(tmp_path, BASE + "method: lorax\n"))


def test_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "data: {}\n"))
    joined = "\n".join(err.value.problems)
    assert "`model`: required" in joined and "data.train is required" in joined and "`method`: required" in joined


def test_set_overrides_and_bad_override(tmp_path):
    path = write(tmp_path, BASE + "method: lora\n")
    config = load_config(path, ["train.lr=2e-4", "method.r=4", "data.split.seed=7"])
    assert config.train.lr == 2e-4 and config.method.r == 4 and config.data.split.seed == 7
    with pytest.raises(ConfigError, match="--set 'train.lr'"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match="`train.lrr`: unknown key"):
        load_config(path, ["train.lrr=1"])


def test_method_defaults_and_frozen(tmp_path):
    config = load_config(write(tmp_path, BASE + "method: {name: last_layers, layers: 3}\n"))
    assert config.method.layers == 3 and config.lr == 1e-4
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        config.train.epochs = 10  # frozen after load


def test_split_fractions_checked_and_early_stopping_needs_validation(tmp_path):
    with pytest.raises(ConfigError, match="validation \\+ test must be below 1"):
        load_config(write(tmp_path, "model: {name: minilm}\nmethod: full\n"
                                    "data: {train: x.jsonl, split: {validation: 0.5, test: 0.5}}\n"))
    body = ("model: {name: minilm}\nmethod: full\ndata: {train: x.jsonl, split: {validation: 0}}\n"
            "train: {early_stopping_patience: 2}\n")
    with pytest.raises(ConfigError, match="early_stopping_patience needs validation"):
        load_config(write(tmp_path, body))


def test_saved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, BASE + "method: {name: lora, r: 4}\n"))
    config.save(tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["tunelab_version"] and saved["method"]["r"] == 4
    again = load_config(tmp_path / "saved.yaml")
    assert again == config and again.hash() == config.hash()


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {name: minilm\n"))


def test_duplicate_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="key `method` appears twice"):
        load_config(write(tmp_path, BASE + "method: lora\nmethod: full\n"))


def test_one_dotted_key_setter_for_set_compare_search_and_the_form():
    """config.set_key is every writer of a dotted key: sections made, the `method: lora` shorthand widened, a value
    copied, and a path through a value is a problem (compare and --set report it; it used to be a TypeError)."""
    from tunelab.config import apply_override, set_key

    raw = {"method": "lora", "train": {"lr": 1e-4}}
    value = [1, 2]
    assert set_key(raw, "method.r", 8) is None and raw["method"] == {"name": "lora", "r": 8}
    assert set_key(raw, "data.split.test", value) is None and raw["data"] == {"split": {"test": [1, 2]}}
    assert raw["data"]["split"]["test"] is not value
    assert set_key(raw, "train.lr.x", 1) == "`lr` is not a section"
    assert apply_override(raw, "train.lr.x=1") == "--set train.lr.x: `lr` is not a section"
