"""Preference data, reward models, DPO and RL on tiny random models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import tunelab
from conftest import ROOT, sample_rows, write_jsonl
from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError, DataError

SAMPLES = ROOT / "src" / "tunelab" / "data" / "samples"


def review_pairs(n: int) -> list[dict]:
    rows = [json.loads(x) for x in (SAMPLES / "review_prefs.jsonl").read_text().split("\n") if x.strip()]
    return rows[:n]


def pref_config(tmp_path, model, data_file, task="reward", method="full", name="pref", **sections):
    cfg = {"model": {"name": str(model), "max_length": 64}, "task": task,
           "data": {"train": str(data_file), "split": {"validation": 0.15, "test": 0.15, "seed": 1}},
           "method": method,
           "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "logging_steps": 2, "precision": "fp32"},
           "eval": {"forgetting": None}, "output": {"dir": str(tmp_path / "runs" / name)}}
    if method is None:
        del cfg["method"]
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------------------------ data

def test_rankings_become_pairs_and_bad_rows_are_counted(tmp_path, tiny_bert, capsys):
    from tunelab.tasks import load_splits

    rows = [{"prompt": f"question {i}", "responses": [f"best answer {i}", f"middle answer {i}", f"worst answer {i}"]}
            for i in range(40)]
    rows += [{"prompt": "", "responses": ["a", "b"]},                      # missing prompt
             {"prompt": "q", "responses": ["same", "Same."]},              # the same text twice
             {"prompt": "q2", "responses": ["only one"]},                  # not a ranking
             {"prompt": "q3", "responses": ["x", ""]}]                     # empty response
    train = write_jsonl(tmp_path / "rank.jsonl", rows)
    config = load_config(pref_config(tmp_path, tiny_bert, train))
    splits = load_splits(config)
    out = capsys.readouterr().out
    assert "dropped 4 of 44 row(s)" in out and "the prompt is missing or empty" in out
    total = len(splits.train) + len(splits.validation) + len(splits.test)
    assert total == 40 * 3  # k(k-1)/2 pairs per ranking of k = 3
    first = splits.train.iloc[0]
    assert first["_chosen"].split()[0] in ("best", "middle") and first["_rejected"].split()[0] in ("middle", "worst")
    # all pairs of one ranking stay in one split (no prompt straddles)
    for a in ("train", "validation", "test"):
        for b in ("train", "validation", "test"):
            if a < b:
                assert not set(getattr(splits, a)["_row"]) & set(getattr(splits, b)["_row"])

    best = load_config(pref_config(tmp_path, tiny_bert, train, name="b", data={"ranking_pairs": "best_vs_rest"}))
    assert sum(len(getattr(load_splits(best), s)) for s in ("train", "validation", "test")) == 40 * 2

    refuse = load_config(pref_config(tmp_path, tiny_bert, train, name="c", data={"bad_rows": "error"}))
    with pytest.raises(DataError, match=r"rank.jsonl: row 41: the prompt is missing or empty; row 42: two responses"):
        load_splits(refuse)


def test_scores_pairs_and_chat_prompts(tmp_path, tiny_bert):
    from tunelab.data.preferences import preference_table

    rows = [{"prompt": [{"role": "user", "content": "hi"}], "responses": ["a", "b", "c"], "s": [1, 3, 3]},
            {"prompt": [{"role": "assistant", "content": "hi"}], "responses": ["a", "b"], "s": [1, 2]},
            {"prompt": "p", "responses": ["a", "b"], "s": [2, 2]}]
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    config = load_config(pref_config(tmp_path, tiny_bert, path, data={"scores": "s"}))
    table = preference_table(str(path), config.data)
    assert len(table) == 1  # the chat prompt ending with an assistant message and the all-ties ranking are dropped
    assert table.iloc[0]["_pairs"] == [("b", "a"), ("c", "a")]  # equal scores (b, c) make no pair
    assert table.iloc[0]["_prompt"] == [{"role": "user", "content": "hi"}]


def test_preference_config_checks(tmp_path, tiny_bert, tiny_llama):
    train = write_jsonl(tmp_path / "p.jsonl", review_pairs(20))
    dpo = load_config(pref_config(tmp_path, tiny_llama, train, task="dpo", method=None))
    assert dpo.method.name == "lora" and dpo.to_dict()["dpo"]["beta"] == 0.1  # LoRA by default; settings saved
    with pytest.raises(ConfigError, match=r"bad.yaml(.|\n)*`rl.reward`: `function` must be module:function"):
        load_config(pref_config(tmp_path, tiny_llama, train, task="rl", name="bad",
                                rl={"reward": {"function": "nocolon"}}))
    path = pref_config(tmp_path, tiny_llama, train, task="rl", method="features", name="bad2",
                       data={"chosen": "x"}, rl={"reward": {"function": "m:f"}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)  # every cross-check problem at once
    assert "data.chosen do(es) not apply to task rl" in text
    assert "method features cannot be used with task rl" in text
    with pytest.raises(ConfigError, match="task rl needs an `rl:` section"):
        load_config(pref_config(tmp_path, tiny_llama, train, task="rl", method="lora", name="norl"))
    with pytest.raises(ConfigError, match=r"must be a multiple of rl.group_size \(4\)"):
        load_config(pref_config(tmp_path, tiny_llama, train, task="rl", name="mult", train={"batch_size": 6},
                                rl={"reward": {"function": "m:f"}}))


# ---------------------------------------------------------------------------------------------------- reward

def test_reward_model_learns_pairs_and_reloads(tmp_path, tiny_bert):
    from tunelab.train import train

    path = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(400))
    result = train(pref_config(tmp_path, tiny_bert, path, train={"epochs": 4, "batch_size": 16, "lr": 1e-3}))
    m = result.metrics
    assert m["test"]["pairs"] + m["validation"]["pairs"] + result.metrics["train"]["pairs"]["train"] == 400
    # positive vs negative sentences under "write a positive review": learnable from words even by a tiny model
    assert m["test"]["accuracy"] > 0.6, m["test"]
    model = tunelab.load(result.path)
    from tunelab.tasks import load_splits

    again, rows = model.evaluate(load_splits(result.config).test)
    assert again["accuracy"] == m["test"]["accuracy"] and abs(again["margin"] - m["test"]["margin"]) < 1e-5
    assert (result.path / "predictions_test.jsonl").exists()
    log = [json.loads(x) for x in (result.path / "metrics.jsonl").read_text().split("\n") if x.strip()]
    assert any("eval_accuracy" in r for r in log)
    # `tunelab eval` on a reward run: pairwise accuracy on a file (here the held-out pairs, the same numbers)
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(
        load_splits(result.config).test["_prompt"], rows["chosen"], rows["rejected"])])
    file_metrics = tunelab.evaluate(result.path, str(held))
    assert file_metrics["accuracy"] == m["test"]["accuracy"] and file_metrics["pairs"] == m["test"]["pairs"]
    assert (result.path / "evaluations" / "held.json").exists()


# ------------------------------------------------------------------------------------------------------- dpo

def test_dpo_raises_held_out_margin_and_reload_reproduces_it(tmp_path, tiny_llama):
    from tunelab.tasks import dpo, load_splits
    from tunelab.train import train

    path = write_jsonl(tmp_path / "pairs.jsonl", review_pairs(300))
    result = train(pref_config(tmp_path, tiny_llama, path, task="dpo", method={"name": "lora", "r": 8},
                               train={"epochs": 2, "batch_size": 8, "lr": 5e-3}, dpo={"beta": 0.1}))
    test = result.metrics["test"]
    assert test["base_logp_margin"] < test["logp_margin"], test  # the policy now prefers chosen more than the base
    assert test["reward_margin"] > 0 and test["reward_accuracy"] > 0.5
    assert (result.path / "model" / "adapter_config.json").exists()  # an adapter, the base is the reference
    gen = tunelab.load(result.path)
    again = dpo.preference_metrics(gen.model, gen.tokenizer, load_splits(result.config).test, result.config.data,
                                   0.1, 64, lambda: None)
    for key in ("logp_margin", "base_logp_margin", "reward_margin"):
        assert again[key] == pytest.approx(test[key], abs=1e-4)
    # `tunelab eval` on a dpo run: the margins against the base on the pairs of a file (the test pairs here)
    frame = load_splits(result.config).test
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(
        frame["_prompt"], frame["_chosen"], frame["_rejected"])])
    assert main(["eval", str(result.path), "--data", str(held)]) == 0
    saved = json.loads((result.path / "evaluations" / "held.json").read_text())
    assert saved["logp_margin"] == pytest.approx(test["logp_margin"], abs=1e-4) and saved["pairs"] == test["pairs"]


def test_response_logps_match_a_single_sequence(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.tasks.preference import response_logps

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts, responses = ["the movie was", "a"], [" great fun", " very bad and boring ."]
    got = response_logps(model, tok, prompts, responses, batch_size=2)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n_prompt = len(tok(p)["input_ids"])
        ids = tok(p + r)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        want = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        assert got[i] == pytest.approx(want, abs=1e-4)


# -------------------------------------------------------------------------------------------------------- rl

REWARD_MODULE = '''
def short_words(prompts, completions, **kw):
    return [sum(len(w) <= 3 for w in c.split()) / max(len(c.split()), 1) for c in completions]
'''


def test_rl_against_a_function_logs_reward_kl_and_plots(tmp_path, tiny_llama):
    from tunelab.train import train

    (tmp_path / "my_reward.py").write_text(REWARD_MODULE)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": " ".join(r["text"].split()[:3])} for r in sample_rows(120)])
    config = pref_config(tmp_path, tiny_llama, prompts, task="rl", method={"name": "lora", "r": 8},
                         data={"prompt_format": "plain"},
                         train={"max_steps": 6, "batch_size": 8, "lr": 1e-2, "logging_steps": 1},
                         rl={"reward": {"function": f"{tmp_path / 'my_reward.py'}:short_words"}, "group_size": 4,
                             "max_new_tokens": 8, "eval_prompts": 8, "kl": 0.1})
    result = train(config, allow_code=True)
    held = result.metrics["held_out"]
    assert held["prompts"] == 8 and held["samples_per_prompt"] == 2
    assert np.isfinite(held["kl"]) and held["kl"] > 0  # the policy moved away from the base
    assert {"base_reward", "tuned_reward", "base_length", "tuned_length"} <= set(held)
    log = [json.loads(x) for x in (result.path / "metrics.jsonl").read_text().split("\n") if x.strip()]
    steps = [r for r in log if "reward" in r]
    assert len(steps) >= 5 and all("kl" in r and "completions/mean_length" in r for r in steps)
    assert (result.path / "rewards.png").stat().st_size > 10_000
    samples = [json.loads(x) for x in (result.path / "samples.jsonl").read_text().split("\n") if x.strip()]
    assert len(samples) == 16 and {"prompt", "base", "tuned", "base_reward", "tuned_reward"} <= set(samples[0])
    # `tunelab eval` on an rl run: its reward on the prompts of a file, base vs tuned (a function reward runs code:
    # refused without --allow-code, as in training)
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "the film was"}, {"prompt": "a story of"}])
    assert main(["eval", str(result.path), "--data", str(few)]) == 2
    again = tunelab.evaluate(result.path, str(few), allow_code=True)
    assert again["prompts"] == 2 and {"base_reward", "tuned_reward", "kl"} <= set(again)


def test_rl_reward_errors_before_the_run_exists(tmp_path, tiny_llama):
    from tunelab.errors import TunelabError
    from tunelab.train import train

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"p {i}"} for i in range(20)])
    config = pref_config(tmp_path, tiny_llama, prompts, task="rl", name="r1", rl={"reward": {"function": "x.py:f"}})
    with pytest.raises(TunelabError, match="file x.py does not exist"):
        train(config, allow_code=True)
    assert not (tmp_path / "runs" / "r1").exists()
    # a config that names code runs it only when the user allows it (here the file would not even be looked at)
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\ndef f(**kw): return []\n")
    config = pref_config(tmp_path, tiny_llama, prompts, task="rl", name="r3",
                         rl={"reward": {"function": f"{tmp_path / 'evil.py'}:f"}})
    with pytest.raises(TunelabError, match="--allow-code"):
        train(config)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "runs" / "r3").exists()
    config = pref_config(tmp_path, tiny_llama, prompts, task="rl", name="r2", rl={"reward": {"run": str(tmp_path)}})
    with pytest.raises(TunelabError, match="not a tunelab run directory"):
        train(config)
    assert not (tmp_path / "runs" / "r2").exists()
