"""Multi-turn chat in one pass vs one example per assistant turn, on the shipped chit-chat (examples/chat-lora.yaml:
SmolLM2-135M + LoRA, batch 4, max_length 512).

Before (tunelab until issue 18): a conversation with n answers became n examples, each the whole history so far plus
one answer in the loss — the history is processed again for every answer (quadratic in turns). Now: the
conversation is rendered once with every answer in the loss. Both are built by tunelab's own encoder
(`tasks/sft.py`: `encode_conversations`, and `encode_turn` for every turn — still the fallback for chat templates
that rewrite earlier turns) and trained by the same trainer, each in its own process.

Reported: examples and tokens per epoch, trained (answer) tokens, real tokens/s over the timed steps, and the
projected time of one epoch (tokens per epoch / tokens per second).

    python bench/chat_turns.py [--steps 10]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import ROOT, emit, ratio, run_child, table, write  # noqa: E402

CONFIG = ROOT / "examples" / "chat-lora.yaml"


def run(mode: str, steps: int) -> dict:
    from sft import build_tunelab, train_timed

    from tunelab.config import load_config
    from tunelab.data.conversations import resolve_prompt_format
    from tunelab.tasks import sft

    config = load_config(CONFIG, [f"train.max_steps={steps}", "train.logging_steps=1000"])
    if mode == "per_turn":  # the previous behaviour: one example per assistant turn
        def per_turn(conv, tokenizer, data, max_length):
            fmt = resolve_prompt_format(data, tokenizer)
            return [sft.encode_turn(conv, i, tokenizer, fmt, data, max_length) for i in range(len(conv.turns))]

        sft.encode_rows = per_turn
    trainer, _, _, encoded, _ = build_tunelab(config, f"chat-{mode}")
    train = encoded["train"]
    measured = train_timed(trainer).result(1, 1, None)
    epoch_tokens = sum(len(r["input_ids"]) for r in train.rows)
    return {"mode": mode, "examples_per_epoch": len(train.rows), "tokens_per_epoch": epoch_tokens,
            "trained_tokens_per_epoch": sum(sum(r["completion_mask"]) for r in train.rows),
            "truncated": train.truncated, "tokens_per_s": measured["tokens_per_s"],
            "timed_steps": measured["timed_steps"], "seconds": measured["seconds"],
            "epoch_s_projected": round(epoch_tokens / measured["tokens_per_s"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", choices=["one_pass", "per_turn"])
    args = ap.parse_args()
    if args.only:
        emit(run(args.only, args.steps))
        return
    res = {mode: run_child("chat_turns.py", mode, "--steps", str(args.steps)) for mode in ("per_turn", "one_pass")}
    rows = [[m, r.get("examples_per_epoch"), r.get("tokens_per_epoch"), r.get("trained_tokens_per_epoch"),
             r.get("tokens_per_s"), r.get("epoch_s_projected"), r.get("peak_rss_mb"), r.get("error")]
            for m, r in res.items()]
    print("\n" + table(rows, ["chit-chat", "examples/epoch", "tokens/epoch", "trained tokens", "real tok/s",
                              "epoch s (projected)", "peak RSS MB", "error"]))
    speedup = ratio(res["per_turn"].get("epoch_s_projected"), res["one_pass"].get("epoch_s_projected"))
    print(f"one pass: an epoch {speedup}× faster")
    write("chat_turns", {"config": str(CONFIG.relative_to(ROOT)), "steps": args.steps,
                              "results": res, "epoch_speedup": speedup})


if __name__ == "__main__":
    main()
