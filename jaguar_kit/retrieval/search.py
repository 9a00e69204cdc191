"""Scoring every setting of the steps' search spaces on labelled images (what ``tune`` runs).

Settings are scored through the steps themselves (:meth:`Step.fit` then :meth:`Step.apply`),
so a setting scores here exactly what the pipeline built from it gives at submission. The
steps are searched jointly, as a tree: the state after a step's setting is computed once
and shared by every setting of the steps after it. A step marked ``joint = False`` (costly
per setting, like local matching) starts a new stage searched on the best setting of the
steps before it; the steps of later stages are off while an earlier stage is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..metrics import identity_balanced_map
from .step import Context, State, Step, start


@dataclass(frozen=True)
class Scored:
    """One setting of every step, with its identity-balanced mAP and rank-1."""

    variant: str  # which embeddings (e.g. the TTA setting)
    steps: tuple[Step, ...]  # the whole pipeline as scored, fitted
    complexity: tuple  # candidate positions: lower is simpler
    map: float
    rank1: float

    def row(self) -> dict:
        row: dict = {"tta": self.variant}
        for s in self.steps:
            row.update(s.describe())
        return {**row, "map": self.map, "rank1": self.rank1}


def best(scored: Sequence[Scored]) -> Scored:
    """The highest mAP; ties (within 1e-9) go to higher rank-1, then to the simplest setting."""
    top = max(s.map for s in scored)
    return max((s for s in scored if s.map >= top - 1e-9),
               key=lambda s: (s.rank1, tuple(-np.array(s.complexity, dtype=float))))


def _stages(steps: Sequence[Step], searched: Sequence[bool]) -> list[tuple[int, int]]:
    cuts = [0] + [i for i, s in enumerate(steps) if i > 0 and searched[i] and not s.joint] + [len(steps)]
    return list(zip(cuts[:-1], cuts[1:]))


def _advance(step: Step, state: State) -> State:
    return step.apply(state) if step.active else state


def search(
    variants: Mapping[str, Sequence[np.ndarray]],
    labels: np.ndarray,
    ctx: Context,
    steps: Sequence[Step],
    grid: Mapping[str, Sequence],
    searched: Sequence[bool],
    progress: bool = False,
    desc: str = "tune",
) -> tuple[Scored, list[Scored]]:
    """The best setting and every setting scored (``variants``: name -> per-model embeddings).

    ``searched[i]``: whether ``steps[i]`` tries its candidates (else it keeps its setting);
    ``grid`` overrides the steps' own search spaces. Ties go to the earlier variant.
    """
    y = np.asarray(labels, dtype=object)
    n = len(y)
    scored: list[Scored] = []
    chosen: Scored | None = None
    for lo, hi in _stages(steps, searched):
        later = tuple(s.off() for s in steps[hi:])
        cands = [steps[i].candidates(grid, n) if searched[i] else [{}] for i in range(lo, hi)]
        if chosen is None:
            roots = [(v, i, start(models, ctx)) for i, (v, models) in enumerate(variants.items())]
            prefix: tuple[Step, ...] = ()
        else:
            prefix = chosen.steps[:lo]
            state = start(variants[chosen.variant], ctx)
            for s in prefix:
                state = _advance(s, state)
            roots = [(chosen.variant, list(variants).index(chosen.variant), state)]
        bar = tqdm(total=len(roots) * int(np.prod([len(c) for c in cands])), desc=desc, disable=not progress,
                   leave=False)
        stage: list[Scored] = []

        def walk(state: State, i: int, done: tuple, where: tuple, variant: str, rank: int) -> None:
            if i == hi:
                for s in later:
                    state = _advance(s, state)
                r = identity_balanced_map(state.similarity("the end of the pipeline"), y)
                stage.append(Scored(variant, prefix + done + later, (rank, *where), r.map, r.rank1))
                bar.update()
                return
            for pos, cand in enumerate(cands[i - lo]):
                step = steps[i].with_settings(**cand).fit(state, y)
                walk(_advance(step, state), i + 1, done + (step,), where + (pos,), variant, rank)

        for variant, rank, root in roots:
            walk(root, lo, (), (), variant, rank)
        bar.close()
        chosen = best(stage)
        seen = {tuple(s.row().items()) for s in scored}
        scored += [s for s in stage if tuple(s.row().items()) not in seen]
    assert chosen is not None
    return chosen, scored


__all__ = ["Scored", "best", "search"]
