"""Packing: short examples share a row but cannot attend to each other — through the real trainer."""
import pytest
import torch

from conftest import write_jsonl
from tunelab.config import load_config
from tunelab.runs import RunDir
from tunelab.tasks import TASKS, load_splits


@pytest.fixture
def packed_trainer(make_config, tiny_llama, tmp_path):
    rows = [{"prompt": f"say {w} " * (1 + i % 4), "response": w} for i, w in
            enumerate(["good", "bad", "great", "awful", "fine"] * 8)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)

    def build(packing: bool, method="lora"):
        path = make_config(method=method, name=f"pack{packing}", model={"name": str(tiny_llama), "max_length": 128},
                           task="sft", data={"train": str(data), "split": {"validation": 0, "test": 0},
                                             "leakage": "ignore"},
                           train={"batch_size": 8, "packing": packing, "precision": "fp32"})
        config = load_config(path)
        return TASKS[config.task].build_trainer(config, load_splits(config), str(tiny_llama), RunDir(tmp_path / "run"))

    return build


def _segments(batch, pad_id):
    """(row, start, end) of every example in a packed batch; the padding that ends a short row is left out."""
    out = []
    for r, pos in enumerate(batch["position_ids"]):
        starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
        for a, b in zip(starts[:-1], starts[1:]):
            if not (batch["input_ids"][r, a:b] == pad_id).all():
                out.append((r, a, b))
    return out


def test_packed_logits_equal_unpacked(packed_trainer):
    trainer, tokenizer, _, encoded, _ = packed_trainer(packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch  # the position ids carry the boundaries
    assert batch["input_ids"].shape[0] > 1, "packed rows stay rows of the batch (not one flattened row)"
    segments = _segments(batch, tokenizer.pad_token_id)
    assert len(segments) > 2 * batch["input_ids"].shape[0], "several examples should share each packed row"
    model = trainer.model.eval()
    with torch.no_grad():
        # the inputs TRL's compute_loss gives the model (it sets use_cache=False)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, a, b in segments:
            alone = model(input_ids=batch["input_ids"][r:r + 1, a:b]).logits[0]
            torch.testing.assert_close(packed[r, a:b], alone, rtol=1e-4, atol=1e-4)
    # the loss the trainer optimises (labelled positions only, no full logits) equals the unpacked examples' loss
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        total, count = 0.0, 0
        for r, a, b in segments:
            logits = model(input_ids=batch["input_ids"][r:r + 1, a:b]).logits[0, :-1]
            target = batch["labels"][r, a + 1:b]
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            count += int(keep.sum())
    torch.testing.assert_close(loss, total / count, rtol=1e-4, atol=1e-5)
    assert int((batch["labels"][:, 1:] != -100).sum()) == count  # no loss on the padding at the end of a row
    # loss positions: the response tokens of each example, never its prompt, never across a boundary
    rows = {tuple(r["input_ids"]): r["completion_mask"] for r in encoded["train"].rows}
    for r, a, b in segments:
        labels = batch["labels"][r, a:b]
        assert labels[0] == -100
        mask = rows[tuple(batch["input_ids"][r, a:b].tolist())]
        assert [int(x != -100) for x in labels] == mask


def test_without_the_block_mask_the_examples_would_leak(packed_trainer):
    """The check above can fail: with the cache on, transformers skips packed-sequence detection and the
    second example attends to the first (TRL turns the cache off in compute_loss)."""
    trainer, *_ = packed_trainer(packing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    pos = batch["position_ids"][0]
    b = (pos == 0).nonzero().flatten().tolist()[1]
    model = trainer.model.eval()
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1],
                      use_cache=True).logits[0]
        alone = model(input_ids=batch["input_ids"][:1, b:b + 3]).logits[0]
    assert (leaky[b:b + 3] - alone).abs().max() > 1e-3


def test_compiled_shape_fills_a_short_batch_with_rows_that_carry_nothing(packed_trainer):
    """Compiled blocks get one batch shape: an epoch's short last batch is filled up with rows of padding, which
    change neither the loss nor the tokens counted (a new batch size would recompile every block)."""
    from tunelab.tasks.sft_trainer import PackedRows

    trainer, tokenizer, *_ = packed_trainer(packing=True)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))][8:]  # after one full batch
    assert 0 < len(examples) < 8, "the packed rows should end the epoch with a short batch of the 8 configured"
    plain = PackedRows(tokenizer.pad_token_id)(examples)
    fixed = PackedRows(tokenizer.pad_token_id)
    fixed.fixed(128, 8)
    filled = fixed(examples)
    assert filled["input_ids"].shape == filled["labels"].shape == filled["position_ids"].shape == (8, 128)
    n, width = plain["input_ids"].shape
    assert n == len(examples) and width < 128  # without it: a batch of another shape
    extra = filled["input_ids"][n:]
    assert (extra == tokenizer.pad_token_id).all() and (filled["labels"][n:] == -100).all()
    assert (filled["labels"][:n, :width] == plain["labels"]).all() and (filled["labels"][:n, width:] == -100).all()
    # the Trainer counts non-padding tokens: the filler adds none
    assert int((filled["input_ids"] != tokenizer.pad_token_id).sum()) == \
        int((plain["input_ids"] != tokenizer.pad_token_id).sum())
    model = trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, dict(filled)), trainer.compute_loss(model, dict(plain)),
                                   rtol=1e-5, atol=1e-6)


def test_packing_fills_rows(packed_trainer):
    plain, *_ = packed_trainer(packing=False)
    packed, *_ = packed_trainer(packing=True)
    assert len(packed.train_dataset) <= len(plain.train_dataset) / 2
    lengths = [len(r) for r in packed.train_dataset["input_ids"]]
    assert max(lengths) <= 128 and sum(lengths) == sum(len(r) for r in plain.train_dataset["input_ids"])



def test_group_by_length_batches_similar_lengths(make_config, tiny_llama, tmp_path):
    """train.group_by_length: batches hold examples of similar length, so less padding than random batches."""
    rows = [{"prompt": "say " + "word " * (i % 20), "response": "ok"} for i in range(64)]
    data = write_jsonl(tmp_path / "len.jsonl", rows)

    def padding(group: bool) -> int:
        path = make_config(method="lora", name=f"g{group}", model={"name": str(tiny_llama), "max_length": 128},
                           task="sft", data={"train": str(data), "split": {"validation": 0, "test": 0},
                                             "leakage": "ignore"},
                           train={"batch_size": 8, "group_by_length": group, "precision": "fp32"})
        config = load_config(path)
        trainer, *_ = TASKS[config.task].build_trainer(config, load_splits(config), str(tiny_llama),
                                                       RunDir(tmp_path / "r"))
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
        order = list(trainer._get_train_sampler(trainer.train_dataset))
        batches = [[lengths[i] for i in order[k:k + 8]] for k in range(0, len(order), 8)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    assert padding(True) < 0.7 * padding(False)  # measured: 296 vs 568 padding tokens per epoch
