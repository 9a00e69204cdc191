"""Post-processing as a pipeline of steps, built from the retrieval config.

``submit``, ``score``, ``tune`` and the kernels all turn a
:class:`~jaguar_kit.config.RetrievalConfig` into the same :class:`Pipeline` and run it:
query expansion, global similarity, k-reciprocal re-ranking, local verification, in that
order; a step that is off is skipped. A new step is a :class:`~.step.Step` subclass in its
own module; it joins the config-driven pipeline by a line in :data:`STEPS` (and its
parameters in ``RetrievalConfig``), and any code may run or tune it by passing the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..config import RetrievalConfig
from .query_expansion import QueryExpansion
from .rerank import KReciprocalRerank
from .similarity import GlobalSimilarity
from .step import Context, State, Step, start
from .verify import LocalVerification

STEPS: tuple[type[Step], ...] = (QueryExpansion, GlobalSimilarity, KReciprocalRerank, LocalVerification)


@dataclass(frozen=True)
class Pipeline:
    """Steps applied in order to the embeddings of one set of images."""

    steps: tuple[Step, ...]

    @classmethod
    def from_config(cls, cfg: RetrievalConfig, step_types: Sequence[type[Step]] = STEPS) -> "Pipeline":
        return cls(tuple(t.from_config(cfg) for t in step_types))

    def to_config(self, cfg: RetrievalConfig) -> RetrievalConfig:
        """A copy of ``cfg`` holding every step's parameters."""
        for s in self.steps:
            cfg = s.to_config(cfg)
        return cfg

    def without_images(self) -> "Pipeline":
        """Steps that look at image files switched off: what embeddings alone can do."""
        return Pipeline(tuple(s.off() if s.needs_images else s for s in self.steps))

    def states(self, state: State):
        """(step, the state it gets) for every step, then (None, the final state)."""
        for s in self.steps:
            yield s, state
            if s.active:
                state = s.apply(state)
        yield None, state

    def run(self, embeddings: Sequence[np.ndarray], ctx: Context | None = None) -> np.ndarray:
        """The (N, N) similarity of the embeddings (one (N, D) array per model, rows aligned)."""
        *_, (_, final) = self.states(start(embeddings, ctx or Context()))
        return final.similarity("the end of the pipeline")


def final_similarity(
    embeddings: Sequence[np.ndarray], cfg: RetrievalConfig, device: "str | None" = None
) -> np.ndarray:
    """The (N, N) similarity of the config's steps that need no images (symmetric, higher = more alike).

    Per model: optional query expansion, then cosine similarity; models are ensembled by
    averaging their similarity matrices; with ``cfg.rerank`` the k-reciprocal distance D is
    blended in as (1 - b) * cosine + b * (1 - D), b = ``cfg.rerank_blend``.
    """
    return Pipeline.from_config(cfg).without_images().run(embeddings, Context(device=device))


__all__ = ["STEPS", "Pipeline", "final_similarity"]
