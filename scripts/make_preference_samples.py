"""Build the shipped preference samples from the shipped human-made data (deterministic: rerun to check).

- review_prefs.jsonl (pairs): prompt "Write a positive review of a {movie|restaurant|product}." (chat messages),
  chosen = a sentence of that site that the annotators labelled positive, rejected = one they labelled negative.
  Every sentence is used once. A stand-in for human rankings because the preference is a human judgment (the
  sentiment label of Kotzias et al.) applied to the instruction; unlike real rankings, the two responses are about
  different things, so the pairs are easier than real ones.
- chat_rankings.jsonl (rankings, chat prompts): the conversation so far (ending with a user message) and three
  replies best first: the reply the person actually wrote, a reply by the same person from elsewhere in the same
  conversation (on topic, wrong place), and a reply from another conversation. The order is a construction (the
  "distractor" ranking of next-utterance retrieval benchmarks), not a human rating.
- review_prompts.jsonl (prompts for rl): the first four words of each IMDb sentence of at least eight words (with the
  sentence's label, kept for analysis), for "continue this movie review".

    python scripts/make_preference_samples.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "data" / "samples"
THING = {"imdb": "movie", "yelp": "restaurant", "amazon": "product"}


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / name).read_text(encoding="utf-8").split("\n") if line.strip()]


def write(name: str, rows: list[dict]) -> None:
    (SAMPLES / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{name}: {len(rows)} rows")


def review_prefs(rng: random.Random) -> list[dict]:
    rows = read("sentiment_uci.jsonl")
    out = []
    for source, thing in THING.items():
        pos = [r["text"].strip() for r in rows if r["source"] == source and r["label"] == "positive"]
        neg = [r["text"].strip() for r in rows if r["source"] == source and r["label"] == "negative"]
        rng.shuffle(pos)
        rng.shuffle(neg)
        prompt = [{"role": "user", "content": f"Write a positive review of a {thing}."}]
        out += [{"prompt": prompt, "chosen": c, "rejected": r, "source": source} for c, r in zip(pos, neg)]
    rng.shuffle(out)
    return out


def chat_rankings(rng: random.Random) -> list[dict]:
    convs = [r["messages"] for r in read("chitchat.jsonl")]
    out = []
    for ci, msgs in enumerate(convs):
        replies = [i for i, m in enumerate(msgs)
                   if m["role"] == "assistant" and i > 0 and msgs[i - 1]["role"] == "user"]
        if len(replies) < 3:
            continue
        at = rng.choice(replies[:-1])  # a reply with a later one in the same conversation to serve as distractor
        later = rng.choice([i for i in replies if i > at + 1] or [replies[-1]])
        other = convs[(ci + 1 + rng.randrange(len(convs) - 1)) % len(convs)]
        foreign = [m["content"] for m in other if m["role"] == "assistant"]
        texts = [msgs[at]["content"], msgs[later]["content"], rng.choice(foreign)]
        if len({t.strip().lower() for t in texts}) < 3:
            continue
        out.append({"prompt": msgs[:at], "responses": texts})
    return out


def review_prompts() -> list[dict]:
    out, seen = [], set()
    for r in read("sentiment_uci.jsonl"):
        words = r["text"].split()
        if r["source"] != "imdb" or len(words) < 8:
            continue
        prompt = " ".join(words[:4])
        if prompt.lower() not in seen:
            seen.add(prompt.lower())
            out.append({"prompt": prompt, "label": r["label"]})
    return out


if __name__ == "__main__":
    write("review_prefs.jsonl", review_prefs(random.Random(0)))
    write("chat_rankings.jsonl", chat_rankings(random.Random(1)))
    write("review_prompts.jsonl", review_prompts())
