"""The server's limits on requests and batches, in one place: what one request may ask for, how work is batched."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    max_batch: int = 16
    """Most requests (classify: texts) run together in one forward pass; 1 turns batching off."""
    continuous: bool = True
    """Generation in continuous batching (a request joins and leaves the running batch at any token); False: in
    static batches, one `generate` call each (what tunelab did before; bench/serving.py compares the two)."""
    engine: str = "torch"
    """What generates: torch (tunelab's own loop, in this process) or vllm (vLLM's engine in its environment)."""
    batch_wait_ms: float = 10.0
    """How long a worker waits for more requests after the first one arrives."""
    max_queue: int = 256
    """Requests waiting per model beyond which the server answers 503."""
    max_tokens: int = 512
    """Largest max_tokens a request may ask for."""
    max_input_tokens: int | None = None
    """Longest prompt in tokens (default: the model's context minus max_tokens requested)."""
    max_classify_inputs: int = 256
    """Most texts in one /v1/classify request."""
    max_input_chars: int = 100_000
    """Longest single text / prompt in characters (rejected before tokenizing)."""
    max_body_bytes: int = 16 * 2**20
    """Largest request body; a larger one is refused with 413 before it is read (by its Content-Length, or as soon
    as that many bytes have arrived)."""
    max_batch_tokens: int = 16_384
    """Most prompt tokens in one generation batch (a long prompt runs with fewer others)."""
    max_classify_tokens: int = 2_048
    """Most tokens (estimated from the characters, at most model.max_length a text) in one classify batch: it
    bounds how long a batch takes, so a small request behind large ones waits one short batch."""
