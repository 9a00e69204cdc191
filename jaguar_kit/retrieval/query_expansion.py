"""alpha-query expansion of each model's embeddings, before their similarity is taken."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import JaguarKitError
from .step import State, Step, check_embeddings, normalise


def query_expansion(emb: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE / database-side augmentation on one set of embeddings.

    Each vector is replaced by the mean of itself and its ``k`` most similar other
    vectors, weighted by similarity**alpha (itself: weight 1), and re-normalised.
    Negative similarities are clipped to 0 before the power, so far vectors add nothing.
    ``k=0`` returns the (normalised) input unchanged.
    """
    e = normalise(check_embeddings(emb))
    if k < 0:
        raise JaguarKitError(f"retrieval: query expansion k must be >= 0, got {k}")
    n = e.shape[0]
    k = min(int(k), n - 1)
    if k == 0:
        return e
    import torch  # deferred: torch is heavy and only this branch needs it

    et = torch.from_numpy(e)
    out = torch.empty_like(et)
    block = max(1, 2_000_000 // n)
    for start in range(0, n, block):  # blocks keep memory at block x N
        rows = torch.arange(start, min(n, start + block))
        sim = et[rows] @ et.T
        sim[torch.arange(len(rows)), rows] = -float("inf")  # the vector itself is added below
        top_sim, top_idx = sim.topk(k, dim=1)
        w = top_sim.clamp(min=0).pow(alpha)  # (b, k)
        out[rows] = et[rows] + (w.unsqueeze(-1) * et[top_idx]).sum(1)
    return torch.nn.functional.normalize(out, dim=1).numpy()


@dataclass(frozen=True)
class QueryExpansion(Step):
    """Each model's vectors replaced by their alpha-QE (:func:`query_expansion`); k = 0: off."""

    query_expansion_k: int = 0
    query_expansion_alpha: float = 3.0  # weight = similarity ** alpha

    name = "query_expansion"
    space = {"query_expansion_k": (0, 1, 2, 3)}

    @property
    def active(self) -> bool:
        return self.query_expansion_k > 0

    def off(self) -> "QueryExpansion":
        return self.with_settings(query_expansion_k=0)

    def apply(self, state: State) -> State:
        return state.then(embeddings=[query_expansion(e, self.query_expansion_k, self.query_expansion_alpha)
                                      for e in state.embeddings])

    def candidates(self, grid, n):
        return [c for c in super().candidates(grid, n) if c["query_expansion_k"] < n]  # k < N: other images exist

    def describe(self) -> dict:
        return {"query_expansion_k": self.query_expansion_k}


__all__ = ["query_expansion", "QueryExpansion"]
