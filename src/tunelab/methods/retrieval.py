"""Retrieval of the nearest training examples for in-context learning (classification: methods/icl.py; generation:
methods/demonstrations.py): texts embedded by an encoder, searched in a FAISS inner-product index saved with the
run."""
from __future__ import annotations

from pathlib import Path


class Retriever:
    """Training texts embedded by an encoder (mean pooling, unit length) in a FAISS inner-product index."""

    def __init__(self, encoder: str, index=None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ..models import resolve

        self.encoder = encoder
        directory = resolve(encoder)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModel.from_pretrained(directory, dtype=torch.float32).eval()
        self.index = index

    def embed(self, texts: list[str]):
        import numpy as np

        from .features import embed

        x = embed(self.model, self.tokenizer, texts, None, "mean", 256, 64, progress=len(texts) > 256)
        return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)

    def build(self, texts: list[str]) -> None:
        import faiss

        vectors = self.embed(texts)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def search(self, texts: list[str], k: int):
        return self.index.search(self.embed(texts), min(k, self.index.ntotal))[1]

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, encoder: str, path: Path) -> "Retriever":
        import faiss

        return cls(encoder, faiss.read_index(str(path)))
