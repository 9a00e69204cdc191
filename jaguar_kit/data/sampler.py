"""PK batches for metric learning: P identities x K images each.

Batch-hard triplet loss needs several images of each identity in a batch; ArcFace does not
mind. Identities are visited evenly: they are drawn from a stream of shuffled passes over
all identities, so each is used about as often as any other in an epoch. Within an identity
the K images are drawn without replacement, or - for identities with fewer than K images -
all of them plus random repeats.

Batches are a pure function of ``(seed, epoch, rank)``: a run resumed mid-epoch skips
``start_batch`` batches and gets exactly the rest of the uninterrupted epoch. Under DDP
each rank draws its own batches (the rank is part of the RNG seed), the same number on
every rank.

Use directly (``for batch in sampler.iter_epoch(epoch, start)``) or as a DataLoader
``batch_sampler`` after ``sampler.set_epoch(epoch, start_batch)``.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import numpy as np

from ..errors import JaguarKitError
from .folds import group_by_identity


class PKSampler:
    """P distinct identities x K indices per batch, deterministic per (seed, epoch, rank).

    ``steps_per_epoch`` defaults to ``len(labels) // (p * k * world_size)`` (at least 1):
    all ranks together see about as many images per epoch as there are.
    If there are fewer than ``p`` identities, each batch uses all of them.
    """

    def __init__(
        self,
        labels: Sequence,
        p: int,
        k: int,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if p < 1 or k < 1:
            raise JaguarKitError(f"PK sampler: p and k must be >= 1, got p={p}, k={k}")
        if not 0 <= rank < world_size:
            raise JaguarKitError(f"PK sampler: rank {rank} out of range for world size {world_size}")
        if seed < 0:
            raise JaguarKitError(f"PK sampler: seed must be >= 0, got {seed}")
        self.identities, self.members = group_by_identity(labels, "PK sampler")
        self.p, self.k = int(p), int(k)
        self.p_eff = min(self.p, len(self.identities))
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        if steps_per_epoch is None or steps_per_epoch <= 0:
            steps_per_epoch = max(1, len(labels) // (self.p * self.k * self.world_size))
        self.steps_per_epoch = int(steps_per_epoch)
        self._epoch, self._start = 0, 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _pick(self, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if len(members) >= self.k:
            return rng.choice(members, self.k, replace=False)
        # Every image once, then random repeats to reach K.
        return np.concatenate([rng.permutation(members), rng.choice(members, self.k - len(members))])

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch for this rank (lists of dataset indices)."""
        if epoch < 0:
            raise JaguarKitError(f"PK sampler: epoch must be >= 0, got {epoch}")
        rng = np.random.default_rng([self.seed, int(epoch), self.rank])
        n_ids = len(self.members)
        stream: deque[int] = deque()
        out: list[list[int]] = []
        for _ in range(self.steps_per_epoch):
            chosen: list[int] = []
            deferred: list[int] = []
            while len(chosen) < self.p_eff:
                if not stream:
                    stream.extend(rng.permutation(n_ids).tolist())
                i = stream.popleft()
                # Across the seam of two passes an identity may come twice: keep it for later.
                (deferred if i in chosen else chosen).append(i)
            stream.extendleft(reversed(deferred))
            out.append([int(j) for i in chosen for j in self._pick(self.members[i], rng)])
        return out

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[int]]:
        """The batches of ``epoch`` from ``start_batch`` on (resume mid-epoch)."""
        if not 0 <= start_batch <= self.steps_per_epoch:
            raise JaguarKitError(
                f"PK sampler: start_batch {start_batch} out of range (0 to {self.steps_per_epoch})"
            )
        yield from self.batches(epoch)[start_batch:]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose what ``iter(sampler)`` yields (for use as a DataLoader batch_sampler)."""
        self._epoch, self._start = int(epoch), int(start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_epoch(self._epoch, self._start)


__all__ = ["PKSampler"]
