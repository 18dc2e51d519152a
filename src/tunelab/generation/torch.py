"""The embedded engine, always available: Hugging Face `generate` on the run's own model, prompts of similar
length batched together. A run with a single LoRA-type adapter generates on the adapter merged into its base: one
matmul per projection instead of three, the same function up to rounding — the first time, that is checked on the
run's test answers (teacher-forced) and recorded in RUN/engines.json["torch"]."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BATCHES = True
PROBE = 8  # test answers the merge is checked on
AGREEMENT, PERPLEXITY = 0.9, 0.05  # parity: next-token agreement at least, |log perplexity ratio| at most


def unfit(generator, path) -> str | None:
    return None


def open(generator, path: Path | None, answers: list | None = None) -> "TorchEngine":
    merged = _merge(generator, path, answers)
    why = f"torch ({generator.precision}, {'adapter merged into the base' if merged else 'the model as trained'})"
    return TorchEngine(generator, why)


class TorchEngine:
    name = "torch"

    def __init__(self, generator, why: str):
        self.generator, self.why = generator, why
        self.label = why  # what runs, in a few words (`why` may gain the reason auto picked it)

    def generate(self, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, progress: bool = False,
                 ignore_eos: bool = False) -> list[str]:
        return self.generator.generate(prompts, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                       temperature=temperature or 1.0, top_p=top_p, batch_size=batch_size,
                                       progress=progress, ignore_eos=ignore_eos)


def mergeable(generator) -> bool:
    """One adapter of a method `tunelab merge` can fold (LoRA, DoRA, IA3, ...) on an unquantized base, and no
    demonstrations."""
    from ..methods import trait

    model = generator.model
    if not (hasattr(model, "merge_and_unload") and len(getattr(model, "peft_config", {})) == 1
            and generator.demonstrations is None and trait(generator.config.method.name, "MERGEABLE")):
        return False
    base = model.get_base_model()  # a 4-/8-bit base (QLoRA) would be requantized: merged only by `tunelab merge`
    return getattr(base, "hf_quantizer", None) is None and not getattr(base, "is_loaded_in_4bit", False) \
        and not getattr(base, "is_loaded_in_8bit", False)


def _merge(generator, path: Path | None, answers: list | None = None) -> bool:
    """Fold the adapter into the base in place (the generator then generates only: its loss and
    `adapter_disabled` are the merged model's); record the check once, on `answers` or the run's test answers."""
    if not mergeable(generator):
        return False
    from .record import read_record, record_parity

    # the check reads a causal LM's next-token logits; an encoder-decoder (seq2seq) is merged unchecked
    rows = probe(generator, path, answers and answers[:PROBE]) \
        if path is not None and "torch" not in read_record(path) and not generator.encoder_decoder else []
    before = [logits(generator, ids) for ids, _ in rows]
    generator.model = generator.model.merge_and_unload().eval()
    if rows:
        record_parity(path, "torch", {"merged": True, "precision": generator.precision,
                                      **teacher_forced(before, [logits(generator, ids) for ids, _ in rows], rows)})
    return True


def summary(record: dict) -> dict:
    """RUN/engines.json["torch"] (the merged adapter against the unmerged one) as a row of the parity table."""
    agreement, ratio = record.get("next_token_agreement"), record.get("perplexity_ratio")
    return {"engine": f"torch ({record.get('precision')}, adapter merged)", "agreement": agreement,
            "perplexity_ratio": ratio, "greedy_identical": None,
            "passed": None if agreement is None or not ratio else
            agreement >= AGREEMENT and abs(math.log(ratio)) <= PERPLEXITY}


def test_answers(path: Path, n: int = PROBE) -> list[tuple[str, str]]:
    """Up to `n` (rendered prompt, reference answer) pairs of the run's test split, from predictions_test.jsonl
    (which the run's evaluation wrote)."""
    from .. import jsonl
    from ..errors import DataError

    pairs = []
    try:
        for _, r in jsonl.rows(Path(path) / "predictions_test.jsonl"):  # read only as far as the n it needs
            if isinstance(r.get("prompt"), str) and isinstance(r.get("reference"), str):
                pairs.append((r["prompt"], r["reference"]))
                if len(pairs) == n:
                    break
    except (OSError, DataError):  # missing or damaged: no answers to check on
        return []
    return pairs


def probe(generator, path: Path, answers: list | None = None) -> list[tuple[list[int], int]]:
    """Token ids of up to PROBE test prompts with their reference answers (`answers`, else read from the run), and
    where each answer starts."""
    tok, rows = generator.tokenizer, []
    for prompt, reference in answers if answers is not None else test_answers(path):
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        rows.append((ids + tok(reference, add_special_tokens=False)["input_ids"], len(ids)))
    return rows


def logits(generator, ids: list[int]) -> torch.Tensor:
    import torch  # here, not at the top: the llamacpp path imports this module and never needs torch

    with torch.inference_mode(), generator.autocast():
        return generator.model(input_ids=torch.tensor([ids], device=generator.model.device)).logits[0].float().cpu()


def teacher_forced(reference: list, other: list, probe: list[tuple[list[int], int]]) -> dict:
    """How closely `other`'s logits follow `reference`'s on the probe sequences (ids, where the answer starts),
    over the answer tokens: the share of positions whose most likely next token agrees, the largest logit
    difference, and the perplexity ratio of the reference answers (other / reference)."""
    import torch

    agree = total = 0
    nll_ref = nll_other = diff = 0.0
    for ref, oth, (ids, start) in zip(reference, other, probe):
        targets = torch.tensor(ids[start:])
        if not len(targets) or start < 1:
            continue
        span = slice(start - 1, len(ids) - 1)
        agree += int((ref[span].argmax(-1) == oth[span].argmax(-1)).sum())
        total += len(targets)
        diff = max(diff, float((ref[span] - oth[span]).abs().max()))
        nll_ref += float(torch.nn.functional.cross_entropy(ref[span], targets, reduction="sum"))
        nll_other += float(torch.nn.functional.cross_entropy(oth[span], targets, reduction="sum"))
    if not total:
        return {"checked_tokens": 0}
    return {"checked_tokens": total, "next_token_agreement": round(agree / total, 4),
            "max_logit_diff": round(diff, 4), "perplexity_ratio": round(math.exp((nll_other - nll_ref) / total), 4)}
