"""Scoring every setting of the steps' search spaces on labelled images (what ``tune`` runs).

Settings are scored through the steps themselves (:meth:`Step.fit` then :meth:`Step.apply`),
so a setting scores here exactly what the pipeline built from it gives at submission. The
steps are searched jointly, as a tree: the state after a step's setting is computed once
and shared by every setting of the steps after it. A step marked ``joint = False`` (costly
per setting, like local matching) starts a new stage searched on the best setting of the
steps before it; the steps of later stages are off while an earlier stage is scored.

Several parts (cross-validation folds, each in its own model's embeddings) are searched
together: every setting is scored within each part and the parts' per-identity scores are
pooled (:func:`~jaguar_kit.metrics.pooled_score`), so a choice rests on every part's identities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..metrics import RetrievalScore, identity_balanced_map, pooled_score
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


@dataclass
class Part:
    """Labelled images scored among themselves: one validation set (a fold) and its embeddings."""

    variants: Mapping[str, Sequence[np.ndarray]]  # name (e.g. the TTA) -> per-model embeddings
    labels: np.ndarray
    ctx: Context


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
    return search_parts([Part(variants, np.asarray(labels, dtype=object), ctx)], steps, grid, searched, progress,
                        desc)


def search_parts(
    parts: Sequence[Part],
    steps: Sequence[Step],
    grid: Mapping[str, Sequence],
    searched: Sequence[bool],
    progress: bool = False,
    desc: str = "tune",
) -> tuple[Scored, list[Scored]]:
    """:func:`search` over several parts with the same variant names, their per-identity scores pooled.

    A step fitted on labels is fitted within each part; the returned steps are the first part's.
    """
    n = min(len(p.labels) for p in parts)
    names = list(parts[0].variants)
    scored: list[Scored] = []
    chosen: Scored | None = None
    for lo, hi in _stages(steps, searched):
        later = tuple(s.off() for s in steps[hi:])
        cands = [steps[i].candidates(grid, n) if searched[i] else [{}] for i in range(lo, hi)]
        prefix: tuple[Step, ...] = () if chosen is None else chosen.steps[:lo]
        roots_per_part = 1 if chosen is not None else len(names)
        bar = tqdm(total=len(parts) * roots_per_part * int(np.prod([len(c) for c in cands])), desc=desc,
                   disable=not progress, leave=False)
        results: dict[tuple, list[RetrievalScore]] = {}
        first: dict[tuple, tuple[str, tuple[Step, ...]]] = {}  # the first part's fitted steps

        def walk(state: State, i: int, done: tuple, where: tuple, variant: str, rank: int, y: np.ndarray) -> None:
            if i == hi:
                for s in later:
                    state = _advance(s, state)
                key = (rank, *where)
                results.setdefault(key, []).append(identity_balanced_map(state.similarity("the end of the pipeline"),
                                                                         y))
                first.setdefault(key, (variant, prefix + done + later))
                bar.update()
                return
            for pos, cand in enumerate(cands[i - lo]):
                step = steps[i].with_settings(**cand).fit(state, y)
                walk(_advance(step, state), i + 1, done + (step,), where + (pos,), variant, rank, y)

        for j, part in enumerate(parts):
            y = np.asarray(part.labels, dtype=object)
            if chosen is None:
                roots = [(v, names.index(v), start(part.variants[v], part.ctx)) for v in names]
            else:
                state = start(part.variants[chosen.variant], part.ctx)
                for s in prefix:  # the first part's fit is the chosen one; the others fit their own
                    state = _advance(s if j == 0 else s.fit(state, y), state)
                roots = [(chosen.variant, names.index(chosen.variant), state)]
            for variant, rank, root in roots:
                walk(root, lo, (), (), variant, rank, y)
        bar.close()
        stage = []
        for key, (variant, fitted) in first.items():
            r = pooled_score(results[key])
            stage.append(Scored(variant, fitted, key, r.map, r.rank1))
        chosen = best(stage)
        seen = {tuple(s.row().items()) for s in scored}
        scored += [s for s in stage if tuple(s.row().items()) not in seen]
    assert chosen is not None
    return chosen, scored


__all__ = ["Part", "Scored", "best", "search", "search_parts"]
