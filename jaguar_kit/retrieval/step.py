"""What every post-processing step is: its parameters, its search space and what it does.

A step is a frozen dataclass. Its fields are its parameters; the built-in steps name them
exactly like the :class:`~jaguar_kit.config.RetrievalConfig` fields they come from, so
:meth:`Step.from_config` and :meth:`Step.to_config` need no table. ``space`` holds the values
``jaguar-kit tune`` tries (the first of each is the simplest, preferred on ties) and
:meth:`Step.candidates` turns them into the settings to score. A step transforms a
:class:`State` (per-model embeddings, then one similarity matrix) and may be fitted on
labelled images first (:meth:`Step.fit`, e.g. a calibration).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..config import RetrievalConfig
from ..errors import JaguarKitError


@dataclass
class Context:
    """What steps may need besides the vectors: image names and files, caches, the device.

    ``memo`` outlives one run: work keyed by image name (local features, matches) is shared
    by every run on the same images, e.g. by all the settings ``tune`` tries.
    """

    names: Sequence[str] | None = None  # one per row of the embeddings
    images: Mapping[str, str | Path] | None = None  # name -> source image, for steps that look at pixels
    local_cache: str | Path | None = None  # where local features are cached
    workers: int = 0
    progress: bool = False
    device: str | None = None  # torch device for steps that use one (re-ranking)
    memo: dict = field(default_factory=dict)


@dataclass
class State:
    """What flows through the steps: per-model embeddings, then a similarity (higher = closer).

    ``cache`` belongs to this state only: a step given this state stores there what its
    settings would each recompute from it (one re-ranking distance for several blends, one
    shortlist's matches for several fusion weights).
    """

    ctx: Context
    embeddings: list[np.ndarray]  # per model, (N, D) float32, rows aligned with ctx.names
    sim: np.ndarray | None = None  # (N, N)
    cache: dict = field(default_factory=dict)

    def then(self, **changes: Any) -> "State":
        """The state a step hands on (a fresh cache)."""
        return dataclasses.replace(self, cache={}, **changes)

    def cached(self, what: Any, make):
        if what not in self.cache:
            self.cache[what] = make()
        return self.cache[what]

    def similarity(self, step: str) -> np.ndarray:
        if self.sim is None:
            raise JaguarKitError(f"retrieval: step {step!r} needs a similarity; put a similarity step before it")
        return self.sim


@dataclass(frozen=True)
class Step:
    """Base of the post-processing steps (subclass as a frozen dataclass)."""

    name: ClassVar[str] = "step"
    space: ClassVar[Mapping[str, Sequence]] = {}  # parameter -> values tune tries, simplest first
    joint: ClassVar[bool] = True  # False: tune searches it on the best settings of the steps before it
    needs_images: ClassVar[bool] = False  # looks at the image files (off where there are none)

    @property
    def active(self) -> bool:
        """False when the step leaves the state as it is (it is then skipped)."""
        return True

    def off(self) -> "Step":
        """This step switched off (the plain baseline); a step that cannot be off returns itself."""
        return self

    def apply(self, state: State) -> State:
        raise NotImplementedError

    def fit(self, state: State, labels: np.ndarray) -> "Step":
        """This step with whatever it learns from labelled images (``labels`` aligned with the rows)."""
        return self

    def prepare(self, ctx: Context) -> None:
        """Per-image work done once for all the images of ``ctx`` before a search (default: none)."""

    def report(self, state: State, labels: np.ndarray) -> dict | None:
        """Quality of what :meth:`fit` learnt, on ``state`` (the input of this step); None: nothing to say."""
        return None

    def describe(self) -> dict:
        """The settings that matter for a report (all parameters unless overridden)."""
        return dataclasses.asdict(self)

    def candidates(self, grid: Mapping[str, Sequence], n: int) -> list[dict]:
        """Settings to try on a set of ``n`` images, simplest first: the product of the space's values.

        ``grid`` overrides a parameter's values.
        """
        names = list(self.space)
        values = [tuple(grid.get(k, self.space[k])) for k in names]
        return [dict(zip(names, combo)) for combo in itertools.product(*values)]

    def with_settings(self, **settings: Any) -> "Step":
        return dataclasses.replace(self, **settings)

    @classmethod
    def from_config(cls, cfg: RetrievalConfig) -> "Step":
        """The step with the values of the config fields named like its parameters."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)})

    def to_config(self, cfg: RetrievalConfig) -> RetrievalConfig:
        """A copy of ``cfg`` holding this step's parameters (those the config has a field for)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if hasattr(cfg, f.name)}
        return dataclasses.replace(cfg, **own)


def check_embeddings(emb: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """``emb`` as float32 (N, D), N >= 2, finite, no zero row; else a one-line error naming the row."""
    e = np.asarray(emb)
    if e.ndim != 2 or e.shape[0] < 2 or e.shape[1] < 1:
        raise JaguarKitError(f"retrieval: {what} must be an (N, D) array with N >= 2, got shape {e.shape}")
    e = e.astype(np.float32, copy=False)
    bad = np.flatnonzero(~np.isfinite(e).all(axis=1))
    if len(bad):
        raise JaguarKitError(f"retrieval: {what} row {bad[0]} has NaN or inf")
    norms = np.linalg.norm(e, axis=1)
    if (norms == 0).any():
        raise JaguarKitError(f"retrieval: {what} row {int(np.argmax(norms == 0))} is all zeros")
    return e


def normalise(e: np.ndarray) -> np.ndarray:
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


def start(embeddings: Sequence[np.ndarray], ctx: Context) -> State:
    """The first state of a run: every model's embeddings checked, all with the same rows."""
    if len(embeddings) == 0:
        raise JaguarKitError("retrieval: needs at least one model's embeddings")
    checked = []
    for m, emb in enumerate(embeddings):
        e = check_embeddings(emb, what=f"model {m} embeddings")
        if checked and e.shape[0] != checked[0].shape[0]:
            raise JaguarKitError(f"retrieval: model {m} has {e.shape[0]} embeddings but model 0 has "
                                 f"{checked[0].shape[0]}")
        checked.append(e)
    if ctx.names is not None and len(ctx.names) != checked[0].shape[0]:
        raise JaguarKitError(f"retrieval: {len(ctx.names)} names for {checked[0].shape[0]} embeddings")
    return State(ctx, checked)


__all__ = ["Context", "State", "Step", "check_embeddings", "normalise", "start"]
