"""Stacked grouped-query attention (tunelab/attention.py): the same outputs and gradients as transformers' sdpa on
packed rows, really taken on the CPU, and never written into a saved config."""
import json

import pytest
import torch

from tunelab.attention import NAME, use_stacked_gqa


def _gqa_model(heads=4, kv=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _packed_batch():
    """Two rows of 12 tokens, each holding several examples (position ids restart per example)."""
    torch.manual_seed(1)
    ids = torch.randint(2, 64, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4]])
    return ids, pos


def test_stacked_gqa_equals_sdpa_on_packed_rows_with_its_gradients(monkeypatch):
    ids, pos = _packed_batch()
    plain, stacked = _gqa_model(), _gqa_model()
    assert use_stacked_gqa(stacked) and stacked.config._attn_implementation == NAME
    seen, masks = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kw):
        seen.append((query.shape[1], key.shape[1], kw.get("attn_mask") is not None))
        masks.append(kw.get("attn_mask"))
        return sdpa(query, key, value, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = {}
    for name, model in (("plain", plain), ("stacked", stacked)):
        seen.clear()
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        logits.float().pow(2).mean().backward()
        out[name] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()}, list(seen))
    # transformers repeats the two key/value heads to four query heads; the stacked form runs on the two
    assert out["plain"][2] == [(4, 4, True)] * 2
    assert out["stacked"][2] == [(2, 2, True)] * 2
    # both layers got one tiled mask, made once in the query's dtype (each layer's own copy would be kept for the
    # backward)
    assert masks[-1] is masks[-2] and masks[-1].dtype == torch.float32 and masks[-1].shape == (2, 1, 24, 12)
    torch.testing.assert_close(out["stacked"][0], out["plain"][0], rtol=1e-5, atol=1e-5)
    for n, g in out["plain"][1].items():
        torch.testing.assert_close(out["stacked"][1][n], g, rtol=1e-4, atol=1e-6)


def test_unpadded_generation_and_full_attention_models_keep_sdpa(tmp_path, monkeypatch):
    """Without a mask (one unpadded row) sdpa's own enable_gqa path runs; a model without grouped heads is left as
    it is; the saved config names no tunelab function, so the folder loads anywhere."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert not use_stacked_gqa(_gqa_model(heads=4, kv=4))
    model = _gqa_model()
    use_stacked_gqa(model)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append(q.shape[1]) or sdpa(q, k, v, **kw))
    with torch.no_grad():
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert calls and set(calls) == {4}  # the query heads as they are: the stacked form was not taken
    model.save_pretrained(tmp_path / "saved")
    assert NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["num_key_value_heads"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
    assert AutoConfig.from_pretrained(tmp_path / "saved").num_attention_heads == 4


@pytest.mark.parametrize("bf16,checkpointing", [(False, False), (True, False), (True, True)])
def test_adapter_inputs_are_not_cast_to_fp32_under_autocast(bf16, checkpointing, make_config, tiny_llama, tmp_path,
                                                             monkeypatch):
    """A training step under bf16 autocast feeds each LoRA adapter its bf16 input (PEFT's cast to the fp32
    adapter weights would be a copy per adapter that autocast casts straight back), in the forward and in the
    checkpointed blocks' recomputation (which must match it); in fp32 nothing changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from conftest import write_jsonl
    from tunelab.config import load_config
    from tunelab.runs import RunDir
    from tunelab.tasks import TASKS, load_splits

    rows = [{"prompt": f"say {w}", "response": w} for w in ["good", "bad", "great", "awful", "fine"] * 4]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    path = make_config(method={"name": "lora", "r": 4, "dropout": 0.0}, model={"name": str(tiny_llama)},
                       task="sft", data={"train": str(data), "split": {"validation": 0, "test": 0},
                                         "leakage": "ignore"},
                       train={"precision": "bf16" if bf16 else "fp32", "batch_size": 4,
                              "max_steps": 1, "gradient_checkpointing": checkpointing})
    config = load_config(path)
    trainer, *_ = TASKS[config.task].build_trainer(config, load_splits(config), str(tiny_llama),
                                                   RunDir(tmp_path / "run"))
    casts = []
    original = BaseTunerLayer._cast_input_dtype

    def spy(self, x, dtype):
        out = original(self, x, dtype)
        casts.append((x.dtype, out.dtype))
        return out

    monkeypatch.setattr(BaseTunerLayer, "_cast_input_dtype", spy)
    trainer.train()
    assert trainer.state.global_step == 1 and casts, "the adapters ran"
    expected = torch.bfloat16 if bf16 else torch.float32
    assert set(casts) == {(expected, expected)}
    assert trainer.model.is_gradient_checkpointing == checkpointing
    # the flag is PEFT's, switched off only for the forward: afterwards every adapter casts again
    assert all(m.cast_input_dtype_enabled for m in trainer.model.modules() if isinstance(m, BaseTunerLayer))
