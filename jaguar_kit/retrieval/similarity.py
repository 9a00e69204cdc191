"""Global similarity: cosine of each model's embeddings, models ensembled by averaging.

The competition scores every ordered pair of the test images, so there is one set of N
images that are at once queries and gallery: every step takes that single set and the
similarity is an N x N matrix whose diagonal is never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .step import State, Step, check_embeddings, normalise


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """(N, N) float32 cosine similarity of the rows of ``emb`` (re-normalised here).

    Exactly symmetric (computed as ``e @ e.T``, which BLAS evaluates as one symmetric
    product) and clipped to [-1, 1] against rounding.
    """
    e = normalise(check_embeddings(emb))
    return np.clip(e @ e.T, -1.0, 1.0)


@dataclass(frozen=True)
class GlobalSimilarity(Step):
    """Cosine similarity per model, averaged over the models of an ensemble."""

    name = "similarity"

    def apply(self, state: State) -> State:
        total = None
        for e in state.embeddings:
            s = cosine_similarity(e)
            total = s if total is None else total + s
        return state.then(sim=(total / len(state.embeddings)).astype(np.float32))

    def describe(self) -> dict:
        return {}


__all__ = ["cosine_similarity", "GlobalSimilarity"]
